"""The memory plan (auto_merge/merge/memory_plan.py): the reference's Llama-2-13B × (base + 3 experts) setting fits
one 80 GB GPU streamed, with peaks equal to closed forms; small models keep the resident layout; the dry runs print
the plan the live merger follows; the streamed path writes exactly the resident path's weights."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from auto_merge.cli import main
from auto_merge.merge.live import LiveMerger
from auto_merge.merge.memory_plan import (
    ALIGNMENT,
    Capacity,
    LiveModel,
    MemoryPlanError,
    ModelShapes,
    TensorShape,
    format_bytes,
    pack_blocks,
    parse_memory,
    plan_live_memory,
)

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).parent / "data" / "recipes"
GB = 10**9
GIB = 2**30

# Llama-2-13B
LAYERS, H, I, V = 40, 5120, 13824, 32000


def llama_13b(ref: str, dtype: str = "bfloat16") -> ModelShapes:
    """Llama-2-13B's checkpoint tensors (names as LlamaForCausalLM's), built here from the shapes alone."""
    shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
        shapes |= {p + f"self_attn.{x}_proj.weight": (H, H) for x in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                   p + "mlp.down_proj.weight": (H, I)}
    return ModelShapes(ref, {name: TensorShape(shape, dtype) for name, shape in shapes.items()})


# Closed forms: parameters per model, and the largest tensor (embeddings / head, V x H).
N = 2 * V * H + LAYERS * (4 * H * H + 3 * H * I + 2 * H) + H
E = V * H
REFS = ("base", "expert_a", "expert_b", "expert_c")


def plan_13b(live_dtype: str = "bfloat16", gpu: int = 80 * GB, host: int = 256 * GB, **options):
    return plan_live_memory([llama_13b(ref) for ref in REFS], anchor="base",
                            live=LiveModel(N * (2 if live_dtype == "bfloat16" else 4), live_dtype, "cuda"),
                            device="cuda", gpu=Capacity(gpu, "given"), host=Capacity(host, "given"), **options)


def test_the_13b_reference_setting_fits_one_80gb_gpu_streamed():
    assert N == 13_015_864_320  # Llama-2-13B's parameter count
    plan = plan_13b()
    assert (plan.layout, plan.compute_device, plan.source_device) == ("streamed", "cuda", "cpu")
    assert plan.form == "as_stored" and plan.pinned and plan.fits is True and plan.advice == ""
    # Staging: the four bf16 V x H inputs of the largest output tensor. Working memory of that tensor's merge: an
    # fp32 copy of each input (4), the method's 5 working copies of the fp32 inputs (20), the fp32 result (1).
    assert plan.staging_bytes == 4 * E * 2 == 1_310_720_000
    assert plan.working_bytes == (4 + 5 * 4 + 1) * E * 4 == 16_384_000_000
    assert plan.gpu_peak == 2 * N + 4 * E * 2 + 25 * E * 4 == 43_726_448_640  # live bf16 + staging + working
    assert plan.gpu_peak <= 0.8 * 80 * GB
    # Host: each model's 2N bytes packed first-fit-decreasing into 1 GiB pinned blocks. By hand: the two V x H
    # tensors (327.7 MB) and two MLP matrices (141.6 MB) in block 1; 7 MLP matrices in each of 16 blocks and 6 in
    # one more; the 160 attention matrices (52.4 MB) fill the gaps (2 + 16 x 1 + 4) and 7 more blocks (20 x 6 + 18);
    # the norms fit block 1: 1 + 16 + 1 + 7 = 25 blocks.
    assert plan.block_bytes == GIB and plan.host_peak == 4 * 25 * GIB
    assert 0 < plan.host_peak - 4 * 2 * N < 4 * GIB  # packing slack under a block per model
    sources = [row for row in plan.rows if row.role in ("base", "expert")]
    assert [row.name for row in sources] == list(REFS) and all(row.device == "host" for row in sources)
    assert all(row.where == "pinned CPU, streamed per tensor, bf16 as stored" for row in sources)
    live = next(row for row in plan.rows if row.role == "live model")
    assert (live.where, live.nbytes, live.device) == ("GPU bf16", 2 * N, "gpu")
    # The faster layouts were tried first and do not fit: fp32 sources (4 x 4N) or bf16 sources (4 x 2N) resident.
    assert len(plan.rejected) == 2
    resident_gpu = 2 * N + 4 * 4 * N + (5 * 4 + 1) * E * 4
    compact_gpu = 2 * N + 4 * 2 * N + 25 * E * 4
    assert f"GPU {resident_gpu / GB:.1f} GB > 64.0 GB usable" in plan.rejected[0]
    assert f"GPU {compact_gpu / GB:.1f} GB > 64.0 GB usable" in plan.rejected[1]
    text = plan.describe()
    assert "memory plan: streamed" in text and "GPU 43.7 GB of 64.0 GB usable" in text
    assert "host 107.4 GB of 204.8 GB usable" in text and text.splitlines()[-3].endswith(": fits")


def test_a_plan_that_does_not_fit_says_what_to_change():
    plan = plan_13b(live_dtype="float32", gpu=80 * GB, host=256 * GB)
    assert plan.fits is False and plan.layout == "streamed"
    assert plan.gpu_peak == 4 * N + 4 * E * 2 + 25 * E * 4
    assert "evaluation.torch_dtype: bfloat16" in plan.advice and "43.7 GB" in plan.advice
    small_host = plan_13b(host=100 * GB)
    assert small_host.fits is False
    assert f"host at least {4 * 25 * GIB / 0.8 / GB:.1f} GB" in small_host.advice
    tiny_gpu = plan_13b(gpu=40 * GB)
    assert f"a GPU of at least {math.ceil(2 * N + 4 * E * 2 + 25 * E * 4) / 0.8 / GB:.1f} GB" in tiny_gpu.advice
    assert "does NOT fit" in tiny_gpu.describe() and "to make it fit:" in tiny_gpu.describe()


def test_small_models_keep_the_resident_layout_and_16_bit_checkpoints_fit_compact():
    zoo = ROOT / "auto_merge" / "zoo" / "shipped" / "seed0"
    models = [ModelShapes.from_folder(f"zoo:{name}", zoo / name) for name in ("base", "num", "wrd", "col")]
    per_model = (zoo / "base" / "model.safetensors").stat().st_size
    assert per_model - 8 - 10_000 < models[0].nbytes < per_model  # the file is its header plus the fp32 data
    live = LiveModel(models[0].nbytes, "float32", "cuda")
    plan = plan_live_memory(models, anchor="zoo:base", live=live, device="cuda", gpu=Capacity(80 * GB, "given"),
                            host=Capacity(16 * GB, "given"))
    assert (plan.layout, plan.form, plan.source_device, plan.staging_bytes, plan.rejected) == \
        ("resident", "float32", "cuda", 0, ())
    assert plan.gpu_peak == 5 * models[0].nbytes + plan.working_bytes and plan.host_peak == 0

    # A 1.3B bf16 checkpoint x 4 on a 32 GB GPU: fp32 sources do not fit, the same values kept as stored do.
    shapes = dict(layers=24, hidden=2048, intermediate=5504, vocab=32000)
    from auto_merge.merge.memory_plan import llama_shapes

    models = [llama_shapes(ref, **shapes) for ref in REFS]
    n = models[0].numel
    plan = plan_live_memory(models, anchor="base", live=LiveModel(2 * n, "bfloat16", "cuda"), device="cuda",
                            gpu=Capacity(32 * GB, "given"), host=Capacity(64 * GB, "given"))
    assert (plan.layout, plan.form, plan.source_device) == ("compact", "as_stored", "cuda")
    assert plan.gpu_peak == 2 * n + 4 * 2 * n + plan.working_bytes and "resident on the GPU" in plan.rejected[0]
    # Without a GPU size the plan cannot say: it keeps the fastest layout and says so.
    unknown = plan_live_memory(models, anchor="base", live=LiveModel(2 * n, "bfloat16", "cuda"), device="cuda")
    assert unknown.fits is None and "pass --gpu-memory" in unknown.describe()


def test_tensors_pack_into_aligned_non_overlapping_blocks():
    sizes = [700, 300, 1000, 4, 0, 513]
    block, where, count = pack_blocks(sizes, block_bytes=1024)
    assert block == 1024 and count == 4  # 1000 | 700 + 4 | 513 | 300 (each rounded up to 256 bytes)
    spans = sorted((b, offset, offset + size) for (b, offset), size in zip(where, sizes) if size)
    assert all(offset % ALIGNMENT == 0 and end <= block for _, offset, end in spans)
    assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:]))
    # A tensor larger than the block: blocks of the next power of two; a model smaller than one block: blocks of
    # its largest tensor's power of two.
    assert pack_blocks([3000, 10], block_bytes=1024)[0] == 4096
    assert pack_blocks([300, 200, 100], block_bytes=1 << 20)[:3:2] == (512, 2)


def test_memory_sizes_parse_and_bad_flags_are_one_clear_error(tmp_path, capsys):
    assert parse_memory("80GB") == 80 * GB and parse_memory("80GiB") == 80 * GIB
    assert parse_memory("1.5 TB") == 1.5e12 and parse_memory("512MB") == 512 * 10**6
    for bad in ("eighty", "80 parsecs", "0GB", "-5GB", ""):
        with pytest.raises(MemoryPlanError, match="not a memory size"):
            parse_memory(bad)
    out = tmp_path / "out"
    assert main(["merge", str(RECIPES / "linear.yml"), str(out), "--dry-run", "--gpu-memory", "eighty"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --gpu-memory 'eighty' is not a memory size") and "e.g. 80GB, 80GiB" in error
    assert main(["search", "--config", str(ROOT / "exp_config" / "config_lfs.yaml"), "--dry-run",
                 "--host-memory", "lots"]) == 2
    assert "--host-memory 'lots' is not a memory size" in capsys.readouterr().err
    assert main(["merge", str(RECIPES / "linear.yml"), str(out), "--gpu-memory", "80GB"]) == 2
    assert "--gpu-memory plans memory for a machine you may not have: use it with --dry-run" in \
        capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ zoo
@pytest.fixture(scope="module", autouse=True)
def zoo(diverse_zoo) -> Path:
    """The zoo with experts that differ in every tensor (conftest.py), as `zoo:NAME` for the whole module."""
    return diverse_zoo


def base_model(zoo: Path, folder: str = "base"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(zoo / folder).eval()


def test_the_dry_runs_print_the_plan_the_live_merger_follows(zoo, tmp_path, capsys):
    from auto_merge.search.memory import search_memory_plan
    from auto_merge.config import load_experiment

    config_path = ROOT / "exp_config" / "config_lfs.yaml"
    assert main(["search", "--config", str(config_path), "--dry-run", "--gpu-memory", "80GB",
                 "--host-memory", "64GB"]) == 0
    printed = capsys.readouterr().out
    assert "memory plan: resident, each output tensor merged on the GPU (cuda); GPU 80.0 GB given, " \
           "host 64.0 GB given" in printed
    assert all(f"zoo:{name}" in printed for name in ("base", "num", "col", "wrd")) and "GPU, fp32" in printed
    assert ": fits" in printed

    # The CPU plan the dry run prints is the placement the trials' LiveMerger takes.
    config = load_experiment(config_path, check_models=True)
    printed = search_memory_plan(config, None, 64 * GB)
    model = base_model(zoo)
    merger = LiveMerger(model, device="cpu", models=list(config.model_paths), host_memory=64 * GB)
    merger.apply({"base_model": "zoo:base", "merge_method": "task_arithmetic",
                  "models": [{"model": "zoo:num", "parameters": {"weight": 1.0}}], "dtype": "float32"})
    plan = merger.memory_plan
    assert (plan.layout, plan.form, merger.resident.device.type, merger.resident.form) == \
        ("resident", "float32", "cpu", "float32")
    lines = printed.splitlines()
    for row in plan.rows:  # every model of the config, planned and printed alike
        if row.role in ("base", "expert"):
            line = next(line for line in lines if line.startswith(f"  {row.role} {row.name} "))
            assert row.where == "CPU, fp32" and row.where in line and line.endswith(f"{format_bytes(row.nbytes)} host")
    assert sorted(merger.resident.models) == ["zoo:base", "zoo:num"]  # read on first use, as planned
    assert sum(row.nbytes for row in plan.rows if row.role in ("base", "expert")) == \
        4 * merger.resident.nbytes // 2

    assert main(["merge", str(RECIPES / "ties.yml"), str(tmp_path / "out"), "--dry-run", "--gpu-memory", "24GiB"]) \
        == 0
    printed = capsys.readouterr().out
    assert "memory estimate" in printed and "memory plan: streaming merge on the GPU; GPU 25.8 GB given" in printed
    sources = [line.split()[1] for line in printed.splitlines() if line.startswith("  source ")]
    assert sources == ["zoo:base", "zoo:col", "zoo:num", "zoo:wrd"]
    assert "memory-mapped file" in printed and not (tmp_path / "out").exists()


def lfs_recipe(base: str, experts: list[str]) -> dict:
    """Three slices: TIES, DARE-TIES (random masks), task arithmetic, plus linear on the outer tensors' slice."""
    sources = lambda start, params: [{"model": m, "layer_range": [start, start + 3 if start < 6 else 8],
                                      "parameters": p} for m, p in zip(experts, params)]
    return {"base_model": base, "dtype": "float32", "slices": [
        {"merge_method": "ties", "sources": sources(0, [{"weight": 1.0}, {"weight": 0.6}, {"weight": 0.8}]),
         "parameters": {"density": 0.5, "lambda": 0.9}},
        {"merge_method": "dare_ties", "sources": sources(3, [{"weight": 1.0}] * 3), "parameters": {"density": 0.6}},
        {"merge_method": "task_arithmetic", "sources": sources(6, [{"weight": 0.7}, {"weight": -0.2},
                                                                   {"weight": 1.1}]),
         "parameters": {"lambda": 0.8}},
    ]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_streamed_path_writes_exactly_the_resident_paths_weights(zoo, dtype):
    """Every source in host blocks, each output tensor's inputs copied through the staging buffer: bit-identical to
    the resident layout (same stored values, same computation), for fp32 sources and for bf16 task vectors."""
    recipe = lfs_recipe("zoo:base", ["zoo:num", "zoo:wrd", "zoo:col"])
    states = {}
    for layout in ("resident", "streamed"):
        model = base_model(zoo)
        merger = LiveMerger(model, device="cpu", dtype=dtype, layout=layout)
        assert len(merger.apply(recipe, seed=3).recomputed) == 75
        assert merger.memory_plan.layout == layout and (merger._staging is not None) == (layout == "streamed")
        states[layout, 3] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        if layout == "streamed":
            staging, resident = merger._staging, merger.resident
            stored = sum(t.numel() * t.element_size() for ref in resident.models
                         for t in resident._states[ref].values())
            assert staging.copied_bytes == stored  # every stored tensor went through the staging buffer, once
            assert resident._blocks and resident.nbytes == sum(
                row.nbytes for row in merger.memory_plan.rows if row.role in ("base", "expert"))
        # Later candidates re-stage their inputs into the same buffer: the random slice follows the seed.
        assert {name.split(".")[2] for name in merger.apply(recipe, seed=4).recomputed} == {"3", "4", "5"}
        states[layout, 4] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        merger.apply(recipe, seed=3)
        assert all(torch.equal(tensor, states[layout, 3][name]) for name, tensor in model.state_dict().items())
    for seed in (3, 4):
        for name, tensor in states["resident", seed].items():
            assert torch.equal(states["streamed", seed][name], tensor), (seed, name)
    assert any(not torch.equal(states["resident", 3][name], states["resident", 4][name]) for name in states[
        "resident", 3])


def test_a_bf16_checkpoint_streamed_as_stored_equals_fp32_resident_sources(zoo, tmp_path):
    """16-bit checkpoints are kept 16-bit when streamed (half the host memory of fp32) and give the same weights
    exactly: a bf16 value widens to fp32 without rounding."""
    folders = {}
    for name in ("base", "num", "wrd", "col"):
        folder = tmp_path / name
        shutil.copytree(zoo / name, folder)
        state = load_file(folder / "model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        folders[name] = str(folder)
    recipe = lfs_recipe(folders["base"], [folders["num"], folders["wrd"], folders["col"]])
    states, mergers = {}, {}
    for layout in ("resident", "streamed"):
        model = base_model(zoo)
        mergers[layout] = merger = LiveMerger(model, device="cpu", layout=layout)
        merger.apply(recipe, seed=1)
        states[layout] = model.state_dict()
    assert mergers["resident"].memory_plan.form == "float32" and mergers["streamed"].memory_plan.form == "as_stored"
    kept = {layout: [t for state in merger.resident._states.values() for t in state.values()]
            for layout, merger in mergers.items()}
    assert {t.dtype for t in kept["streamed"]} == {torch.bfloat16} and {t.dtype for t in kept["resident"]} == \
        {torch.float32}
    assert 2 * sum(t.nbytes for t in kept["streamed"]) == sum(t.nbytes for t in kept["resident"])
    for name, tensor in states["resident"].items():
        assert torch.equal(states["streamed"][name], tensor), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_streamed_path_equals_the_resident_path(zoo):
    """Pinned host blocks, asynchronous copies into the staging buffer and the GPU kernels (Triton sums, fused TIES
    / DARE) over staged tensors give the resident layout's weights exactly."""
    recipe = lfs_recipe("zoo:base", ["zoo:num", "zoo:wrd", "zoo:col"])
    states = {}
    for layout in ("resident", "streamed"):
        model = base_model(zoo).cuda()
        merger = LiveMerger(model, device="cuda", layout=layout)
        merger.apply(recipe, seed=3)
        assert merger.memory_plan.layout == layout and merger.memory_plan.compute_device == "cuda"
        if layout == "streamed":
            assert merger.memory_plan.pinned and all(block.is_pinned() for blocks in merger.resident._blocks.values()
                                                     for block in blocks)
            assert merger._staging.buffer.is_cuda
        states[layout] = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    for name, tensor in states["resident"].items():
        assert torch.equal(states["streamed"][name], tensor), name
