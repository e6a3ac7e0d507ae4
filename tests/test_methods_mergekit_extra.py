"""mergekit 0.1.5's nearswap, ram, ramplus_tl and arcee_fusion: closed forms on hand-made tensors, parameter
validation, the config/export name lists, and one recipe per method merged on the shipped demo zoo.

Expected values are written out by hand or computed by short float64 formulas written here, never by calling the
implementation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from auto_merge.cli import main
from auto_merge.config.blocks import config_parameter_names, merge_methods
from auto_merge.formats.mergekit import MERGEKIT_METHODS, to_mergekit
from auto_merge.merge.methods import get_method, list_methods, merge_tensor, validate_params
from auto_merge.merge.recipe import parse_recipe

torch.set_num_threads(1)

NEW_METHODS = ("nearswap", "ram", "ramplus_tl", "arcee_fusion")


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------- registry
def test_specs_match_mergekit():
    assert set(NEW_METHODS) <= set(list_methods())
    for name in NEW_METHODS:
        assert get_method(name).requires_base  # mergekit: BasePolicy.REQUIRED for all four
    assert (get_method("nearswap").min_models, get_method("nearswap").max_models) == (1, 1)
    assert (get_method("arcee_fusion").min_models, get_method("arcee_fusion").max_models) == (1, 1)
    assert (get_method("ram").min_models, get_method("ram").max_models) == (1, None)
    assert (get_method("ramplus_tl").min_models, get_method("ramplus_tl").max_models) == (1, None)
    assert get_method("arcee_fusion").is_random  # quantiles are sampled above 10^6 elements
    assert not any(get_method(name).is_random for name in ("nearswap", "ram", "ramplus_tl"))
    assert get_method("nearswap").param("t").required
    assert validate_params("ram", {}, [{}, {}]).global_params == {"epsilon": 1e-5}
    assert validate_params("ramplus_tl", {}, [{}]).global_params == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    assert validate_params("arcee_fusion", {}, [{}]).global_params == {}


# --------------------------------------------------------------------------------------------------- nearswap
def test_nearswap_takes_close_entries_whole_and_pulls_far_ones_towards_the_base():
    base = vec(0, 0, 0, 0, 0, 1)
    other = vec(0.5, 1, 2, -4, 0, 1 + 8)
    # t = 1: w = clamp(1 / max(|d|, 1e-6), 0, 1) = [1, 1, 0.5, 0.25, 1, 0.125]; out = w*other + (1-w)*base
    out = merge_tensor("nearswap", [other], base, {"t": 1.0})
    assert_close(out, [0.5, 1, 1, -1, 0, 2])
    # t = 0 keeps the base; a t above every distance takes the other model
    assert_close(merge_tensor("nearswap", [other], base, {"t": 0.0}), base)
    assert_close(merge_tensor("nearswap", [other], base, {"t": 10.0}), other)


def test_nearswap_closed_form_on_a_matrix():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(6, 7, generator=generator)
    other = base + 0.3 * torch.randn(6, 7, generator=generator)
    t = 0.2
    b64, o64 = base.double(), other.double()
    weight = (t / (b64 - o64).abs().clamp(min=1e-6)).clamp(0, 1)
    expected = weight * o64 + (1 - weight) * b64
    assert_close(merge_tensor("nearswap", [other], base, {"t": t}), expected.float(), atol=1e-6)


# --------------------------------------------------------------------------------------------------------- ram
BASE = vec(1, 1, 1, 1, 1, 1)
DELTAS = (vec(0.5, 0, 0.3, 1e-6, -2, 0), vec(0.1, 0, -0.3, 0, 0, 0.7), vec(0, 0, 0.6, 0, 4, 0))


def test_ram_averages_over_the_models_that_change_each_entry():
    models = [BASE + delta for delta in DELTAS]
    # epsilon 1e-5: contributors per entry [2, 0, 3, 0, 2, 1] (1e-6 does not count) →
    # [(0.5+0.1)/2, 0, (0.3-0.3+0.6)/3, 0, (-2+4)/2, 0.7 undiluted]
    assert_close(merge_tensor("ram", models, BASE), BASE + vec(0.3, 0, 0.2, 0, 1, 0.7))
    # epsilon 0.4 drops the smaller entries: contributors [1, 0, 1, 0, 2, 1]
    assert_close(merge_tensor("ram", models, BASE, {"epsilon": 0.4}), BASE + vec(0.5, 0, 0.6, 0, 1, 0.7))
    # epsilon 0 counts every nonzero entry, the 1e-6 included
    assert_close(merge_tensor("ram", models, BASE, {"epsilon": 0.0}), BASE + vec(0.3, 0, 0.2, 1e-6, 1, 0.7))


def ram_reference(models: list[torch.Tensor], base: torch.Tensor, epsilon: float, boosts=None) -> torch.Tensor:
    """Element by element in float64: mean of the counting entries; a lone contributor i is scaled by boosts[i]."""
    base64 = base.double().reshape(-1)
    deltas = [(model.double().reshape(-1) - base64) for model in models]
    out = base64.clone()
    for j in range(base64.numel()):
        counting = [i for i, delta in enumerate(deltas) if abs(float(delta[j])) > epsilon]
        if len(counting) == 1 and boosts is not None:
            out[j] += float(deltas[counting[0]][j]) * boosts[counting[0]]
        elif counting:
            out[j] += sum(float(deltas[i][j]) for i in counting) / len(counting)
    return out.reshape(base.shape).float()


def test_ram_matches_an_elementwise_reference_on_sparse_random_task_vectors():
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(9, 11, generator=generator)
    models = []
    for _ in range(3):
        delta = torch.randn(9, 11, generator=generator) * (torch.rand(9, 11, generator=generator) < 0.5)
        models.append(base + delta)
    assert_close(merge_tensor("ram", models, base, {"epsilon": 0.1}), ram_reference(models, base, 0.1), atol=1e-5)


# -------------------------------------------------------------------------------------------------- ramplus_tl
def test_ramplus_tl_boosts_unique_entries_by_the_models_shared_to_unique_ratio():
    base = torch.zeros(8)
    models = [vec(1, 1, 0, 0, 0, 0, 0, 0), vec(1, 0, 2, 3, 4, 0, 0, 0), vec(0, 1, 0, 0, 0, 5, 0, 0)]
    # contributors [2, 2, 1, 1, 1, 1, 0, 0]. Model 2: shared 1, unique 3 → rho 1/3 → lambda 1 + 0.3/3 = 1.1.
    # Model 3: shared 1, unique 1 → rho 1, capped at alpha 0.5 → lambda 1.15. Model 1 has no unique entry.
    out = merge_tensor("ramplus_tl", models, base, {"r": 0.3, "alpha": 0.5})
    assert_close(out, [1, 1, 2.2, 3.3, 4.4, 5.75, 0, 0])
    # r = 0 is ram
    assert_close(merge_tensor("ramplus_tl", models, base, {"r": 0.0}), [1, 1, 2, 3, 4, 5, 0, 0])
    assert_close(merge_tensor("ram", models, base), [1, 1, 2, 3, 4, 5, 0, 0])


def test_ramplus_tl_floors_the_unique_count_at_epsilon():
    # mergekit divides by max(unique_count, epsilon): with epsilon 1.5 one unique entry counts as 1.5.
    base = torch.zeros(3)
    models = [vec(2, 2, 0), vec(2, 0, 0)]
    # model 1: shared 1, unique 1 → rho = 1 / 1.5 → lambda = 1 + 0.3 * 2/3 = 1.2 → entry 1: 2.4
    out = merge_tensor("ramplus_tl", models, base, {"r": 0.3, "alpha": 1.0, "epsilon": 1.5})
    assert_close(out, [2, 2.4, 0])


def test_ramplus_tl_matches_an_elementwise_reference():
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(7, 13, generator=generator)
    models = [base + torch.randn(7, 13, generator=generator) * (torch.rand(7, 13, generator=generator) < p)
              for p in (0.2, 0.5, 0.8)]
    r, alpha, epsilon = 0.7, 0.9, 0.05
    deltas = [(model - base).reshape(-1) for model in models]
    counts = [sum(abs(float(d[j])) > epsilon for d in deltas) for j in range(base.numel())]
    boosts = []
    for delta in deltas:
        counting = [j for j in range(base.numel()) if abs(float(delta[j])) > epsilon]
        shared = sum(counts[j] > 1 for j in counting)
        unique = sum(counts[j] == 1 for j in counting)
        boosts.append(1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha))
    expected = ram_reference(models, base, epsilon, boosts)
    out = merge_tensor("ramplus_tl", models, base, {"r": r, "alpha": alpha, "epsilon": epsilon})
    assert_close(out, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ arcee_fusion
def fusion_reference(other: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(importance, mask, threshold) in float64: |d| * KL(softmax(other) || softmax(base)) per last-dim slice;
    threshold median + 1.5 IQR with quantile k = floor(q (n - 1)) of the sorted values."""
    o64, b64 = other.double(), base.double()
    p = torch.exp(o64 - o64.max(dim=-1, keepdim=True).values)
    p = p / p.sum(dim=-1, keepdim=True) + 1e-8
    q = torch.exp(b64 - b64.max(dim=-1, keepdim=True).values)
    q = q / q.sum(dim=-1, keepdim=True) + 1e-8
    kl = (p * (p / q).log()).sum(dim=-1, keepdim=True)
    importance = (o64 - b64).abs() * kl
    ordered = sorted(importance.reshape(-1).tolist())
    n = len(ordered)
    q1, median, q3 = (ordered[math.floor(fraction * (n - 1))] for fraction in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    return importance, importance >= threshold, threshold


def test_arcee_fusion_keeps_only_the_outlier_changes_of_a_vector():
    # One vector = one KL factor, so the mask is |d| >= median + 1.5 IQR of |d|: sorted |d| (n = 9) gives
    # q1 = |d|[2] = 0.3, median = |d|[4] = 0.5, q3 = |d|[6] = 0.7 → threshold 1.1: only the 5.0 change is kept.
    base = vec(0.2, -0.1, 0.4, 0.0, 0.3, -0.2, 0.1, 0.5, -0.3)
    change = vec(0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8, 5.0)
    out = merge_tensor("arcee_fusion", [base + change], base)
    expected = base.clone()
    expected[8] = (base + change)[8]
    assert_close(out, expected, atol=0)


def test_arcee_fusion_keeps_everything_when_the_threshold_is_zero():
    # A constant shift leaves the softmax unchanged, so KL = 0 and its importance is 0; with most importances 0 the
    # threshold is 0 and `importance >= threshold` keeps every change, the shift included (mergekit's >=).
    base = torch.zeros(3, 4)
    other = base.clone()
    other[0] += 1.0
    other[1, 3] = 2.0
    assert torch.equal(merge_tensor("arcee_fusion", [other], base), other)


def test_arcee_fusion_matches_the_reference_per_row():
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(12, 9, generator=generator)
    other = base + torch.randn(12, 9, generator=generator) * torch.linspace(0.01, 1.0, 12).unsqueeze(1)
    importance, mask, threshold = fusion_reference(other, base)
    assert 0 < int(mask.sum()) < mask.numel()
    clear = ((importance - threshold).abs() > 1e-6 * max(abs(threshold), 1e-12)).float()  # off the boundary
    assert int(clear.sum()) == clear.numel()
    expected = torch.where(mask, other.double(), base.double())
    assert_close(merge_tensor("arcee_fusion", [other], base), expected, atol=1e-6)


def test_arcee_fusion_samples_quantiles_only_above_a_million_elements():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(1000, 1000, generator=generator)  # exactly 10^6: exact quantiles, no randomness
    other = base + 0.1 * torch.randn(1000, 1000, generator=generator)
    first = merge_tensor("arcee_fusion", [other], base, seed=0, tensor_name="w")
    assert torch.equal(first, merge_tensor("arcee_fusion", [other], base, seed=1, tensor_name="w"))

    big_base = torch.cat([base.reshape(-1), torch.zeros(50)]).reshape(-1)  # 10^6 + 50: sampled
    big_other = torch.cat([other.reshape(-1), torch.zeros(50)]).reshape(-1)
    sampled = merge_tensor("arcee_fusion", [big_other], big_base, seed=0, tensor_name="w")
    again = merge_tensor("arcee_fusion", [big_other], big_base, seed=0, tensor_name="w")
    assert torch.equal(sampled, again)  # the per-(seed, tensor) generator makes it reproducible
    kept_exact = float((first != base).float().mean())
    kept_sampled = float((sampled[:-50] != big_base[:-50]).float().mean())
    assert 0 < kept_exact < 0.2
    assert abs(kept_sampled - kept_exact) < 0.01  # 10^6 draws estimate the quartiles closely


# -------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("method, global_params, per_model, fragment", [
    ("nearswap", {}, [{}], "missing required parameter 't'"),
    ("nearswap", {"t": -0.1}, [{}], "out of range"),
    ("nearswap", {"t": float("inf")}, [{}], "finite"),
    ("nearswap", {"t": "small"}, [{}], "must be a number"),
    ("nearswap", {"t": 0.1, "weight": 1.0}, [{}], "unknown parameter 'weight'"),
    ("nearswap", {"t": 0.1}, [{}, {}], "exactly 1 non-base"),
    ("ram", {"epsilon": -1e-5}, [{}], "out of range"),
    ("ram", {"r": 0.1}, [{}], "unknown parameter 'r'"),
    ("ram", {}, [{"epsilon": 0.1}], "global and cannot be set per model"),
    ("ramplus_tl", {"epsilon": 0.0}, [{}], "out of range"),
    ("ramplus_tl", {"r": -0.5}, [{}], "out of range"),
    ("ramplus_tl", {"alpha": -1}, [{}], "out of range"),
    ("ramplus_tl", {"alpha": True}, [{}], "must be a number"),
    ("arcee_fusion", {"t": 0.5}, [{}], "unknown parameter 't'"),
    ("arcee_fusion", {}, [{}, {}], "exactly 1 non-base"),
])
def test_bad_parameters_raise_value_error(method, global_params, per_model, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate_params(method, global_params, per_model)


@pytest.mark.parametrize("method, params", [
    ("nearswap", {"t": 0.1}), ("ram", {}), ("ramplus_tl", {}), ("arcee_fusion", {}),
])
def test_a_base_is_required(method, params):
    with pytest.raises(ValueError, match="requires a base"):
        merge_tensor(method, [vec(1, 2)], None, params)


# ------------------------------------------------------------------------------------- config and export lists
def test_experiment_configs_and_the_mergekit_export_know_the_new_methods():
    for name in NEW_METHODS:
        assert name in merge_methods() and name in MERGEKIT_METHODS
        spec = get_method(name)
        assert {param.name for param in spec.params} <= set(config_parameter_names(name))
    recipe = parse_recipe(yaml.safe_load("models: [{model: zoo:num}]\nmerge_method: nearswap\n"
                                         "base_model: zoo:base\nparameters: {t: 0.001}\n"))
    (document,) = to_mergekit(recipe)
    assert document["merge_method"] == "nearswap" and document["base_model"] == "zoo:base"
    assert document["parameters"] == {"t": 0.001}


# ------------------------------------------------------------------------------------------- recipes on the zoo
ZOO_RECIPES = {
    "nearswap": "models:\n  - model: zoo:base\n  - model: zoo:num\nmerge_method: nearswap\nbase_model: zoo:base\n"
                "parameters:\n  t: 0.003\ndtype: float32\n",
    "ram": "models:\n  - model: zoo:num\n  - model: zoo:wrd\n  - model: zoo:col\nmerge_method: ram\n"
           "base_model: zoo:base\nparameters:\n  epsilon: 0.003\ndtype: float32\n",
    "ramplus_tl": "models:\n  - model: zoo:num\n  - model: zoo:wrd\n  - model: zoo:col\nmerge_method: ramplus_tl\n"
                  "base_model: zoo:base\nparameters:\n  r: 0.5\n  alpha: 1.0\n  epsilon: 0.003\ndtype: float32\n",
    "arcee_fusion": "models:\n  - model: zoo:num\nmerge_method: arcee_fusion\nbase_model: zoo:base\ndtype: float32\n",
}
CHECKED = "model.layers.2.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def zoo_state(diverse_zoo) -> dict[str, dict[str, torch.Tensor]]:
    """`zoo:NAME` in this module is the zoo whose experts differ in every tensor (conftest.py)."""
    zoo = diverse_zoo
    return {name: load_file(zoo / name / "model.safetensors") for name in ("base", "num", "wrd", "col")}


def merge_with_cli(method: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    recipe = tmp_path / f"{method}.yml"
    recipe.write_text(ZOO_RECIPES[method])
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # the output loads as a checkpoint
    assert model.dtype == torch.float32
    return load_file(out / "model.safetensors")


def test_nearswap_recipe_on_the_zoo(zoo_state, tmp_path):
    out = merge_with_cli("nearswap", tmp_path)
    base, num = zoo_state["base"][CHECKED].double(), zoo_state["num"][CHECKED].double()
    weight = (0.003 / (base - num).abs().clamp(min=1e-6)).clamp(0, 1)
    expected = weight * num + (1 - weight) * base
    assert 0 < float((weight < 1).float().mean()) < 1  # both regimes occur
    torch.testing.assert_close(out[CHECKED].double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_recipes_on_the_zoo(method, zoo_state, tmp_path):
    out = merge_with_cli(method, tmp_path)
    base = zoo_state["base"][CHECKED]
    models = [zoo_state[name][CHECKED] for name in ("num", "wrd", "col")]
    epsilon, boosts = 0.003, None
    if method == "ramplus_tl":
        deltas = [(model - base).reshape(-1) for model in models]
        kept = [delta.abs() > epsilon for delta in deltas]
        counts = sum(mask.long() for mask in kept)
        boosts = []
        for mask in kept:
            shared, unique = int((mask & (counts > 1)).sum()), int((mask & (counts == 1)).sum())
            boosts.append(1 + 0.5 * min(shared / max(unique, epsilon), 1.0))
        assert all(boost > 1 for boost in boosts)
    expected = ram_reference(models, base, epsilon, boosts)
    torch.testing.assert_close(out[CHECKED], expected, atol=1e-6, rtol=0)


def test_arcee_fusion_recipe_on_the_zoo(zoo_state, tmp_path):
    out = merge_with_cli("arcee_fusion", tmp_path)
    base, num = zoo_state["base"][CHECKED], zoo_state["num"][CHECKED]
    importance, mask, threshold = fusion_reference(num, base)
    # The zoo's task vectors are small, so KL(p || q) is a difference of nearly equal terms and its fp32 value (what
    # the method, like mergekit, computes) is off by up to a few percent: compare the entries outside that band.
    clear = (importance - threshold).abs() > 0.05 * abs(threshold)
    assert int(clear.sum()) > 0.9 * clear.numel()
    assert 0 < int(mask.sum()) < mask.numel()
    changed = base + (num - base)  # a kept change, in fp32 (not always bit-equal to num)
    expected = torch.where(mask, changed, base)
    assert torch.equal(out[CHECKED][clear], expected[clear])
    assert bool(((out[CHECKED] == base) | (out[CHECKED] == changed)).all())  # each entry: the base or base + delta
