"""The in-memory path: a recipe materialised into a live model equals the checkpoint the streaming engine writes, and
a candidate that changes one layer group recomputes only that group's tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from auto_merge.merge.engine import run_recipe
from auto_merge.merge.live import LiveMerger, ResidentModels, ResidentSources, TensorSpec, materialise_into
from auto_merge.merge.recipe import parse_recipe

torch.set_num_threads(1)

PROMPTS = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 20, 21, 22, 23, 24]])


@pytest.fixture(scope="module", autouse=True)
def zoo(diverse_zoo) -> Path:
    """The zoo with experts that differ in every tensor (conftest.py), as `zoo:NAME` for the whole module."""
    return diverse_zoo


@pytest.fixture
def live_model(zoo):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(zoo / "base").eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPTS).logits


def two_group_recipe(first_lambda: float, second_density: float) -> dict:
    """Layers 0-3 and 4-7 as two slices (the search's layer groups), each with its own parameters."""
    sources = lambda start: [{"model": m, "layer_range": [start, start + 4]} for m in ("zoo:num", "zoo:wrd", "zoo:col")]
    return {
        "base_model": "zoo:base",
        "merge_method": "ties",
        "parameters": {"weight": 1.0, "density": 0.5},
        "slices": [
            {"sources": sources(0), "parameters": {"lambda": first_lambda}},
            {"sources": sources(4), "merge_method": "dare_ties",
             "parameters": {"density": [{"filter": "mlp", "value": second_density}, {"value": 0.7}]}},
        ],
        "dtype": "float32",
    }


@pytest.mark.parametrize("seed", [0, 3])
def test_live_model_equals_the_streamed_checkpoint(live_model, tmp_path, seed):
    from transformers import AutoModelForCausalLM

    recipe = parse_recipe(two_group_recipe(0.9, 0.4))
    LiveMerger(live_model, device="cpu").apply(recipe, seed=seed)
    written = run_recipe(recipe, tmp_path / "out", seed=seed).out_dir
    reference = AutoModelForCausalLM.from_pretrained(written).eval()
    reference_state = reference.state_dict()
    for name, tensor in live_model.state_dict().items():
        assert torch.equal(tensor, reference_state[name]), name
    assert torch.equal(logits(live_model), logits(reference))


def test_a_changed_group_is_the_only_one_recomputed(live_model, tmp_path):
    from transformers import AutoModelForCausalLM

    merger = LiveMerger(live_model, device="cpu")
    first = merger.apply(two_group_recipe(0.9, 0.4))
    assert first.reused == () and len(first.recomputed) == 75
    before = {name: tensor.clone() for name, tensor in live_model.state_dict().items()}

    update = merger.apply(two_group_recipe(0.9, 0.6))  # only the second group's mlp density changes
    changed = {f"model.layers.{layer}.mlp.{part}_proj.weight" for layer in range(4, 8)
               for part in ("gate", "up", "down")}
    assert set(update.recomputed) == changed
    assert len(update.reused) == 75 - len(changed)
    after = live_model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in after if name not in changed)

    update = merger.apply(two_group_recipe(1.1, 0.6))  # the first group's lambda: its layers and the embeddings
    assert {name.split(".")[2] for name in update.recomputed if ".layers." in name} == {"0", "1", "2", "3"}
    assert "model.embed_tokens.weight" in update.recomputed
    assert "lm_head.weight" not in update.recomputed  # the head follows the last slice, which did not change

    written = run_recipe(parse_recipe(two_group_recipe(1.1, 0.6)), tmp_path / "out").out_dir
    reference = AutoModelForCausalLM.from_pretrained(written).eval()
    assert torch.equal(logits(live_model), logits(reference))

    assert merger.apply(two_group_recipe(1.1, 0.6), seed=5).recomputed  # random tensors follow the seed
    merger.invalidate()
    assert len(merger.apply(two_group_recipe(1.1, 0.6)).recomputed) == 75


def test_a_recipe_of_other_tensor_shapes_is_refused_before_writing(live_model, zoo, tmp_path):
    """Depth may change (tests/test_depth_strategies.py); tensor shapes may not: nothing is written then."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    narrow = tmp_path / "narrow"
    config = LlamaConfig.from_pretrained(zoo / "base")
    config.intermediate_size = 128
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(narrow)
    for name in (zoo / "base").iterdir():
        if name.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(name, narrow / name.name)
    before = {name: tensor.clone() for name, tensor in live_model.state_dict().items()}
    recipe = {"merge_method": "linear", "models": [{"model": str(narrow), "parameters": {"weight": 1.0}}]}
    with pytest.raises(ValueError, match="planned shapes differ from the live model's"):
        LiveMerger(live_model, device="cpu").apply(recipe)
    assert all(torch.equal(before[name], tensor) for name, tensor in live_model.state_dict().items())


def test_bf16_task_vectors_save_memory_and_stay_close(live_model, zoo):
    """bf16 rounding of the task vectors moves a continuous merge (task arithmetic) very little; magnitude-selecting
    methods (TIES, DARE) can flip individual entries, so searches that need exact parity keep fp32."""
    from transformers import AutoModelForCausalLM

    # Weight 0.5: the three experts' shared change to layers 4-5 summed 1.5 times, a model in its working range
    # (at weight 1 it is summed 3 times and the model's outputs are noise, docs/zoo.md).
    recipe = {"base_model": "zoo:base", "merge_method": "task_arithmetic", "parameters": {"weight": 0.5},
              "models": [{"model": f"zoo:{m}"} for m in ("num", "wrd", "col")], "dtype": "float32"}
    exact = LiveMerger(live_model, device="cpu")
    exact.apply(recipe)
    exact_logits = logits(live_model)
    other = AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
    compact = LiveMerger(other, device="cpu", dtype=torch.bfloat16)
    compact.apply(recipe)
    assert compact.resident.nbytes == exact.resident.nbytes * (4 + 3 * 2) // (4 * 4)  # fp32 base, bf16 experts
    # The zoo's experts share a change 3x the size of the weights in layers 4-5 (docs/zoo.md), where bf16's relative
    # rounding (2^-9) is largest in absolute terms: a few logits move by up to ~0.07, the typical one by far less.
    difference = (logits(other) - exact_logits).abs()
    assert float(difference.max()) < 0.15 and float(difference.mean()) < 0.01, (difference.max(), difference.mean())

    weights_only = LiveMerger(other, device="cpu", dtype=torch.bfloat16, task_vectors=False)
    weights_only.apply(recipe)
    assert weights_only.resident.nbytes * 2 == exact.resident.nbytes


def test_tensors_already_in_memory_can_be_adopted(live_model, zoo):
    from safetensors.torch import load_file

    recipe = {"base_model": "zoo:base", "merge_method": "task_arithmetic", "parameters": {"weight": 1.0},
              "models": [{"model": "zoo:num"}], "dtype": "float32"}
    merger = LiveMerger(live_model, device="cpu")
    merger.apply(recipe)
    expected = logits(live_model)
    adopted = LiveMerger(live_model, device="cpu")
    adopted.resident = ResidentModels(device="cpu")
    for name in ("base", "num"):
        adopted.resident.adopt(f"zoo:{name}", load_file(zoo / name / "model.safetensors"))
    assert len(adopted.apply(recipe).recomputed) == 75
    assert torch.equal(logits(live_model), expected)


def test_recipes_and_tensor_plans_agree(live_model, zoo):
    """The zoo report's tensor-plan path and the recipe path produce the same task-arithmetic merge."""
    from transformers import AutoModelForCausalLM

    recipe = {"base_model": "zoo:base", "merge_method": "task_arithmetic", "parameters": {"lambda": 0.7},
              "models": [{"model": f"zoo:{m}", "parameters": {"weight": 1.0}} for m in ("num", "wrd", "col")],
              "dtype": "float32"}
    LiveMerger(live_model, device="cpu").apply(recipe)
    other = AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
    sources = ResidentSources.from_checkpoints(zoo / "base", [zoo / m for m in ("num", "wrd", "col")])
    spec = TensorSpec("task_arithmetic", {"lambda": 0.7}, tuple({"weight": 1.0} for _ in range(3)))
    materialise_into(other, sources, lambda name: spec)
    assert torch.equal(logits(live_model), logits(other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_combinations_equal_the_methods(zoo, dtype):
    """linear / task arithmetic / passthrough evaluated as one sum over the resident tensors (the default, on every
    device) equal the methods' own evaluation (``fused=False``) up to fp32 rounding, and only those tensors go that
    way."""
    from transformers import AutoModelForCausalLM

    from auto_merge.merge.fused import linear_terms

    sources = lambda start, params: [{"model": m, "layer_range": [start, start + 4], "parameters": p}
                                     for m, p in zip(("zoo:num", "zoo:wrd", "zoo:col"), params)]
    recipe = {"base_model": "zoo:base", "dtype": "float32", "slices": [
        {"merge_method": "task_arithmetic", "sources": sources(0, [{"weight": 0.7}, {"weight": -0.2}, {"weight": 1.1}]),
         "parameters": {"lambda": 0.8, "normalize": [{"filter": "mlp", "value": True}, {"value": False}],
                        "output_scale": [{"filter": "down_proj", "value": 1.3}, {"value": 1.0}]}},
        {"merge_method": "linear", "sources": sources(4, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
         "parameters": {"normalize": [{"filter": "self_attn", "value": False}, {"value": True}]}},
    ]}
    models = {}
    for fused in (False, True):
        model = AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
        merger = LiveMerger(model, device="cpu", dtype=dtype, fused=fused)
        merger.apply(recipe)
        models[fused] = model
    plan = merger.compile(recipe)
    assert all(linear_terms(task) is not None for task in plan.tasks)
    reference, fused_state = models[False].state_dict(), models[True].state_dict()
    for name, tensor in reference.items():
        assert torch.allclose(fused_state[name], tensor, rtol=1e-5, atol=1e-6), name
    ties = two_group_recipe(0.9, 0.4)
    assert all(linear_terms(task) is None for task in merger.compile(ties).tasks if task.layer is not None)
    passthrough = merger.compile({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "zoo:num", "layer_range": [0, 8], "parameters": {"scale": 0.5}}],
         "parameters": {"output_scale": 3.0}}]})
    assert {linear_terms(task).coefficients for task in passthrough.tasks} == {(1.5,)}


def test_fused_linear_recipes_equal_the_streamed_checkpoint(live_model, zoo, tmp_path):
    """The fused sums (task arithmetic relative to the base, linear, passthrough with a scale) are the same
    computation in both paths: the live model is bit-identical to the checkpoint, and task arithmetic stays within
    fp32 rounding (8 ulp of the result or the base) of the method's own evaluation."""
    from safetensors.torch import load_file

    from auto_merge.merge.methods import merge_tensor

    sources = lambda start, params: [{"model": m, "layer_range": [start, start + 4], "parameters": p}
                                     for m, p in zip(("zoo:num", "zoo:wrd", "zoo:col"), params)]
    recipe = parse_recipe({"base_model": "zoo:base", "dtype": "float32", "slices": [
        {"merge_method": "task_arithmetic", "sources": sources(0, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.0}]),
         "parameters": {"lambda": 0.7, "output_scale": [{"filter": "o_proj", "value": 0.9}, {"value": 1.0}]}},
        {"merge_method": "linear", "sources": sources(4, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}])},
    ]})
    LiveMerger(live_model, device="cpu").apply(recipe)
    written = run_recipe(recipe, tmp_path / "out").out_dir
    streamed = load_file(written / "model.safetensors")
    for name, tensor in live_model.state_dict().items():
        assert torch.equal(tensor, streamed[name]), name
    state = {m: load_file(zoo / m / "model.safetensors") for m in ("base", "num", "wrd", "col")}
    name = "model.layers.1.mlp.up_proj.weight"
    expected = merge_tensor("task_arithmetic", [state[m][name] for m in ("num", "wrd", "col")], state["base"][name],
                            {"lambda": 0.7}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.0}])
    ulp = torch.maximum(expected.abs(), state["base"][name].abs()) * 2.0 ** -23
    assert ((streamed[name] - expected).abs() <= 8 * ulp).all()  # the benchmark's "beyond fp32 rounding" bound


def test_combine_into_on_the_cpu_handles_dtypes_layouts_and_aliasing():
    """The chunked CPU sum: relative (task-arithmetic) terms, several chunks plus a tail, 16-bit terms and targets,
    a non-contiguous target and a target that is one of the terms all give the closed form."""
    from auto_merge.merge import fused

    generator = torch.Generator().manual_seed(0)
    n = 2 * fused.CPU_CHUNK_ELEMENTS + 1234
    base = torch.randn(n, generator=generator)
    experts = [base + 0.05 * torch.randn(n, generator=generator) for _ in range(3)]
    form = fused.LinearForm((0.7, -0.2, 1.1), base_coefficient=1.3)
    expected = 1.3 * base.double() + sum(c * (x.double() - base.double()) for c, x in zip(form.coefficients, experts))

    out = torch.empty(n)
    fused.combine_into(out, fused.combination(form, (base, None), [(x, None) for x in experts]))
    assert torch.allclose(out.double(), expected, rtol=0, atol=1e-6)
    # The expanded form (what the GPU kernel sums) is the same combination.
    expanded = torch.empty(n)
    fused.combine_into(expanded, fused.combination(form, (base, None), [(x, None) for x in experts]).expanded())
    assert torch.allclose(expanded.double(), expected, rtol=0, atol=1e-5)

    half = torch.empty(n, dtype=torch.bfloat16)
    fused.combine_into(half, fused.combination(form, (base, None), [(x, None) for x in experts]))
    assert torch.equal(half, out.to(torch.bfloat16))  # one cast of the fp32 sum

    deltas = [(x - base).to(torch.bfloat16) for x in experts]  # resident bf16 task vectors: (anchor, delta)
    from_deltas = torch.empty(n)
    combined = fused.combination(form, (base, None), [(base, d) for d in deltas])
    assert all(not relative for _, _, relative in combined.terms)  # x - base is the delta itself
    fused.combine_into(from_deltas, combined)
    assert torch.allclose(from_deltas.double(), expected, rtol=0, atol=1e-3)

    strided = torch.empty(n, 2)[:, 0]
    fused.combine_into(strided, fused.combination(form, (base, None), [(x, None) for x in experts]))
    assert torch.equal(strided, out)

    aliased = experts[1].clone()
    terms = fused.combination(form, (base, None), [(experts[0], None), (aliased, None), (experts[2], None)])
    fused.combine_into(aliased, terms)  # the target is also a term: summed through a temporary
    assert torch.equal(aliased, out)

    empty = torch.empty(0)
    fused.combine_into(empty, [(torch.empty(0), 2.0)])
    zero = torch.ones(5)
    fused.combine_into(zero, [])
    assert torch.equal(zero, torch.zeros(5))
