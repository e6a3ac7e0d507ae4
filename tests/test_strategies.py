"""LFS strategy: the space (conditions), decoding into recipes, the initial design, and the reference import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from auto_merge.merge.recipe import check_recipe, parse_recipe
from auto_merge.strategies.lfs import LFSStrategy, StrategyError
from auto_merge.formats.reference_lfs import import_reference_lfs

REPO = Path(__file__).resolve().parents[1]
# Byte-for-byte copies of the reference implementation's configs (shared/reference), kept with the tests.
REFERENCE_CONFIGS = REPO / "tests" / "data" / "reference" / "exp_config"
REFERENCE_SEARCH = REPO / "tests" / "data" / "reference" / "search_config"
EXPERTS = ("zoo:num", "zoo:wrd", "zoo:col")


def zoo_strategy(**overrides) -> LFSStrategy:
    settings = dict(base_model="zoo:base", models=EXPERTS, num_layers=8, layer_granularity=2,
                    filters=("self_attn", "mlp"), method_ranges={})
    settings.update(overrides)
    return LFSStrategy(**settings)


def test_only_the_chosen_methods_parameters_are_active():
    strategy = zoo_strategy()
    space = strategy.build_space(seed=0)
    for configuration in space.sample_configuration(40):
        values = dict(configuration)
        for g in range(strategy.n_groups):
            method = values[f"g{g}:method"]
            active = [k for k in values if k.startswith(f"g{g}:") and k != f"g{g}:method"]
            assert active, "the chosen method must have parameters"
            for key in active:
                assert key.split(":")[2] == method or key == f"g{g}:slerp:pair", (key, method)
            if method == "slerp":
                assert f"g{g}:slerp:pair" in values


def test_space_is_seeded():
    first = [dict(c) for c in zoo_strategy().build_space(seed=3).sample_configuration(5)]
    second = [dict(c) for c in zoo_strategy().build_space(seed=3).sample_configuration(5)]
    assert first == second


def test_slerp_t_spans_the_unit_interval_and_pairs_cover_every_two_experts():
    space = zoo_strategy().build_space()
    t = space["g0:self_attn:slerp:t"]
    assert (t.lower, t.upper) == (0.0, 1.0)
    assert list(space["g0:slerp:pair"].choices) == ["0-1", "0-2", "1-2"]


def test_configured_ranges_are_used_and_mask_rate_becomes_density():
    strategy = zoo_strategy(method_ranges={
        "ties": {"param_value_mask_rate": {"min": 0.2, "max": 0.9}, "scaling_coefficient": {"min": 0.5, "max": 1.5}},
        "task_arithmetic": {"scaling_coefficient": {"min": 0.0, "max": 1.6}},
    })
    space = strategy.build_space()
    density = space["g1:mlp:ties:density"]
    assert density.lower == pytest.approx(0.1) and density.upper == pytest.approx(0.8)
    assert (space["g1:mlp:ties:lambda"].lower, space["g1:mlp:ties:lambda"].upper) == (0.5, 1.5)
    assert space["g3:rest:task_arithmetic:weight:m2"].upper == 1.6
    assert set(space["g0:method"].choices) == {"ties", "task_arithmetic"}


def _fixed(strategy: LFSStrategy, method: str, **params) -> dict:
    """A configuration with every group on `method` and the given parameter values everywhere."""
    space = strategy.build_space()
    values = {}
    for g in range(strategy.n_groups):
        values[f"g{g}:method"] = method
        for name in space:
            parts = name.split(":")
            if parts[0] == f"g{g}" and len(parts) >= 4 and parts[2] == method:
                param = parts[3]
                value = params[param]
                values[name] = value[int(parts[4][1:])] if isinstance(value, (list, tuple)) else value
    if method == "slerp":
        for g in range(strategy.n_groups):
            values[f"g{g}:slerp:pair"] = params["pair"]
    from ConfigSpace import Configuration

    return dict(Configuration(space, values=values))


def test_decode_task_arithmetic_gives_per_expert_weights_per_family():
    strategy = zoo_strategy()
    recipe = strategy.decode(_fixed(strategy, "task_arithmetic", weight=[0.2, 0.5, 0.9]))
    assert recipe["base_model"] == "zoo:base" and len(recipe["slices"]) == 4
    third = recipe["slices"][2]
    assert third["merge_method"] == "task_arithmetic" and third["parameters"]["lambda"] == 1.0
    assert [s["layer_range"] for s in third["sources"]] == [[4, 6]] * 3
    assert [s["model"] for s in third["sources"]] == list(EXPERTS)
    weights = third["sources"][1]["parameters"]["weight"]
    assert weights == [{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": 0.5}, {"value": 0.5}]
    check_recipe(parse_recipe(recipe))


def test_decode_ties_shares_density_and_fixes_unit_weights():
    strategy = zoo_strategy()
    recipe = strategy.decode(_fixed(strategy, "ties", density=0.3, **{"lambda": 1.4}))
    first = recipe["slices"][0]
    assert first["parameters"]["lambda"][-1] == {"value": 1.4}
    for source in first["sources"]:
        assert source["parameters"]["weight"] == 1.0
        assert source["parameters"]["density"][0] == {"filter": "self_attn", "value": 0.3}
    check_recipe(parse_recipe(recipe))


def test_decode_slerp_uses_the_pair_in_order():
    strategy = zoo_strategy()
    recipe = strategy.decode(_fixed(strategy, "slerp", t=0.25, pair="0-2"))
    group = recipe["slices"][1]
    assert group["base_model"] == "zoo:num" and [s["model"] for s in group["sources"]] == ["zoo:col"]
    assert group["parameters"]["t"][-1] == {"value": 0.25}
    check_recipe(parse_recipe(recipe))


def test_della_density_is_kept_inside_its_window():
    strategy = zoo_strategy(method_ranges={"della": {"density": {"min": 0.05, "max": 0.95}}})
    recipe = strategy.decode(_fixed(strategy, "della", density=0.95, **{"lambda": 1.0}))
    density = recipe["slices"][0]["sources"][0]["parameters"]["density"][0]["value"]
    assert 0.15 < density < 0.85
    check_recipe(parse_recipe(recipe))


def test_every_sampled_configuration_decodes_to_a_valid_recipe():
    strategy = zoo_strategy()
    for configuration in strategy.build_space(seed=1).sample_configuration(30):
        check_recipe(parse_recipe(strategy.decode(configuration)))


def test_initial_design_has_each_expert_alone_and_uniform_merges():
    strategy = zoo_strategy()
    space = strategy.build_space()
    designs = [strategy.decode(c) for c in strategy.initial_configurations(space)]
    for i, expert in enumerate(EXPERTS):
        alone = designs[i]
        for slice_ in alone["slices"]:
            assert slice_["merge_method"] == "linear"
            weights = [s["parameters"]["weight"][-1]["value"] for s in slice_["sources"]]
            assert weights == [float(j == i) for j in range(len(EXPERTS))]
    methods = [{s["merge_method"] for s in d["slices"]} for d in designs[len(EXPERTS):]]
    assert {"linear"} in methods and {"task_arithmetic"} in methods


def test_initial_design_starts_every_other_method_at_its_defaults_but_slerp():
    from auto_merge.search.baselines import TIES_DEFAULTS

    strategy = zoo_strategy()
    designs = [strategy.decode(c) for c in strategy.initial_configurations(strategy.build_space())]
    uniform = {d["slices"][0]["merge_method"]: d for d in designs[len(EXPERTS):]
               if len({s["merge_method"] for s in d["slices"]}) == 1}
    # linear and task arithmetic have their own uniform designs; slerp merges a searched pair, not every expert
    assert set(uniform) == {"linear", "task_arithmetic", "ties", "dare_ties", "della", "fourier"}
    for slice_ in uniform["ties"]["slices"]:  # TIES at the defaults of the baseline it is judged against
        assert [v["value"] for v in slice_["parameters"]["lambda"]] == [TIES_DEFAULTS["lambda"]] * 3
        for source in slice_["sources"]:
            assert source["parameters"]["weight"] == 1.0
            assert [v["value"] for v in source["parameters"]["density"]] == [TIES_DEFAULTS["density"]] * 3
    only_ties = zoo_strategy(method_ranges={"ties": {"density": {"min": 0.6, "max": 0.9}}})
    ties_design = next(d for d in map(only_ties.decode, only_ties.initial_configurations(only_ties.build_space()))
                       if d["slices"][0]["merge_method"] == "ties")
    assert ties_design["slices"][0]["sources"][0]["parameters"]["density"][0]["value"] == 0.6  # clipped into range


def test_bad_strategy_settings_are_refused():
    with pytest.raises(StrategyError, match="does not divide"):
        zoo_strategy(layer_granularity=3)
    with pytest.raises(StrategyError, match="cannot search"):
        zoo_strategy(method_ranges={"passthrough": {}})


def test_description_round_trips():
    strategy = zoo_strategy(method_ranges={"ties": {"density": {"min": 0.2, "max": 0.8}}})
    again = LFSStrategy.from_description(json.loads(json.dumps(strategy.describe())))
    assert again.describe() == strategy.describe()
    assert list(again.build_space(seed=0)) == list(strategy.build_space(seed=0))


# ------------------------------------------------------------------------------------------------ reference import

def reference_strategy() -> LFSStrategy:
    block = yaml.safe_load((REFERENCE_CONFIGS / "lfs.yaml").read_text())
    return LFSStrategy(base_model=block["base_model"], models=tuple(block["models"]), num_layers=40,
                       layer_granularity=block["layer_granularity"], filters=tuple(block["filters"]),
                       method_ranges=block["merging_method"])


def test_reference_single_objective_lfs_imports_to_the_golden_slerp_group():
    from ConfigSpace import Configuration

    strategy = reference_strategy()
    flat = json.loads((REFERENCE_SEARCH / "lfs" / "single-obj" / "lm-lfs.json").read_text())
    values = import_reference_lfs(flat, strategy)
    configuration = Configuration(strategy.build_space(), values=values)  # fits the space: ranges and conditions
    recipe = strategy.decode(configuration)
    assert [s["merge_method"] for s in recipe["slices"]] == ["linear", "linear", "slerp", "slerp"]
    group = recipe["slices"][2]
    # Reference: slerp from code-alpaca (t=0) to WizardLM (t=1) over layers [20, 30), t = 0.385 / 0.600 / 0.354.
    # Here the pair is in index order (WizardLM first), so t is measured from the other end.
    assert group["base_model"] == "WizardLMTeam/WizardLM-13B-V1.2"
    assert [s["model"] for s in group["sources"]] == ["layoric/llama-2-13b-code-alpaca"]
    assert group["sources"][0]["layer_range"] == [20, 30]
    t = {e.get("filter", "rest"): e["value"] for e in group["parameters"]["t"]}
    assert t["self_attn"] == pytest.approx(1 - 0.385, abs=1e-3)
    assert t["mlp"] == pytest.approx(1 - 0.600, abs=1e-3)
    assert t["rest"] == pytest.approx(1 - 0.354, abs=1e-3)
    check_recipe(parse_recipe(recipe))


@pytest.mark.parametrize("name, methods", [
    ("1.json", ["linear", "task_arithmetic", "ties", "linear"]),
    ("2.json", ["task_arithmetic", "task_arithmetic", "ties", "linear"]),
    ("3.json", ["task_arithmetic", "task_arithmetic", "ties", "task_arithmetic"]),
    ("4.json", ["task_arithmetic", "task_arithmetic", "ties", "task_arithmetic"]),
])
def test_reference_multi_objective_lfs_files_import(name, methods):
    from ConfigSpace import Configuration

    strategy = reference_strategy()
    flat = json.loads((REFERENCE_SEARCH / "lfs" / "multi-obj" / name).read_text())
    values = import_reference_lfs(flat, strategy)
    recipe = strategy.decode(Configuration(strategy.build_space(), values=values))
    assert [s["merge_method"] for s in recipe["slices"]] == methods
    ties = recipe["slices"][2]
    ps = "self_attn"
    mask_rate = flat[f"layer_2_paramset_{ps}_method_ties_param_param_value_mask_rate"]
    density = ties["sources"][0]["parameters"]["density"][0]
    assert density == {"filter": ps, "value": pytest.approx(1 - mask_rate)}
    if methods[0] == "task_arithmetic":
        lam = flat["layer_0_paramset_mlp_method_task_arithmetic_param_scaling_coefficient"]
        for source in recipe["slices"][0]["sources"]:
            assert source["parameters"]["weight"][1] == {"filter": "mlp", "value": pytest.approx(lam)}
    # the one way the replayed merge departs from the reference's: TIES's trim count (said, not hidden)
    (note,) = strategy.reference_departures(values)
    assert note.startswith("TIES in group(s) 2:") and "n - floor(r * n) + 1" in note


def test_reference_import_rejects_a_file_for_other_models():
    strategy = zoo_strategy()
    flat = json.loads((REFERENCE_SEARCH / "lfs" / "single-obj" / "lm-lfs.json").read_text())
    with pytest.raises(StrategyError, match="not among the configured models"):
        import_reference_lfs(flat, strategy)
