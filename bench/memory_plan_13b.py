"""Benchmark: the memory plan of the reference's search setting (Llama-2-13B base + 3 experts, bf16) on one 80 GB
GPU, and on a CUDA GPU the time to materialise one candidate under that plan.

    .venv/bin/python bench/memory_plan_13b.py                     # prints the plan; times candidates on a GPU
    options: --gpu-memory 80GB --host-memory SIZE --methods linear task_arithmetic ties --candidates 3
             --warmup 1 --granularity 4 --experts 3 --shape {13b,tiny} --json PATH

The plan is :func:`auto_merge.merge.memory_plan.plan_live_memory` for four bf16 Llama-2-13B checkpoints (shapes only)
and a bf16 live model on the GPU: the same call the search's LiveMerger makes. Without a CUDA GPU the script prints it
and stops: the timing needs a GPU.

On a GPU: the process is held to ``--gpu-memory`` of the device (``torch.cuda.set_per_process_memory_fraction``), so
an H100/H200 behaves as the 80 GB GPU the plan is for and a plan that under-counts fails here with an out-of-memory
error. The live model is a ``LlamaForCausalLM`` with uninitialised bf16 weights on the GPU; the sources are synthetic
(base ~ N(0, 0.02²), each expert = base + N(0, 0.001²), generated on the GPU tensor by tensor and kept where the plan
says: for 13B × 4 on 80 GB, bf16 in pinned host memory, ~107 GB, so the host needs ~135 GB). Each candidate is an
LFS-style recipe: groups of ``--granularity`` layers, each with the method under test and fresh random parameters
per family (self_attn / mlp / rest), every tensor recomputed (the merger's cache is cleared). Printed per method:
time per candidate (median, min), the bytes staged to the GPU per candidate and the effective host-to-GPU rate, and
the GPU's peak allocation against the plan's GPU peak.

``--shape tiny`` runs the same code on a 4-layer model (on the CPU too, streamed, unpinned): a smoke test.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auto_merge.merge.memory_plan import (  # noqa: E402
    Capacity,
    LiveModel,
    format_bytes,
    host_capacity,
    llama_shapes,
    parse_memory,
    plan_live_memory,
)

SHAPES = {
    "13b": dict(layers=40, hidden=5120, intermediate=13824, vocab=32000, heads=40),
    "tiny": dict(layers=4, hidden=64, intermediate=128, vocab=512, heads=4),
}
METHODS = ("linear", "task_arithmetic", "ties")
FAMILIES = ("self_attn", "mlp")
BASE_STD, EXPERT_STD = 0.02, 0.001


def hf_config(shape: dict) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": shape["hidden"],
            "intermediate_size": shape["intermediate"], "num_hidden_layers": shape["layers"],
            "num_attention_heads": shape["heads"], "num_key_value_heads": shape["heads"],
            "vocab_size": shape["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def candidate(method: str, refs: list[str], layers: int, granularity: int, rng: random.Random) -> dict:
    """An LFS-style recipe: one slice per group, ``method`` everywhere, parameters drawn per family."""

    def per_family(low: float, high: float) -> list[dict]:
        return [{"filter": family, "value": rng.uniform(low, high)} for family in FAMILIES] + \
            [{"value": rng.uniform(low, high)}]

    slices = []
    for start in range(0, layers, granularity):
        sources = [{"model": ref, "layer_range": [start, start + granularity],
                    "parameters": {"weight": per_family(0.2, 1.0)}} for ref in refs[1:]]
        parameters = {}
        if method == "task_arithmetic":
            parameters = {"lambda": per_family(0.5, 1.2)}
        elif method == "ties":
            parameters = {"density": per_family(0.2, 0.8), "lambda": per_family(0.5, 1.5)}
        slices.append({"merge_method": method, "sources": sources, "parameters": parameters})
    # linear takes no base: base_model only names the template (config), as in the search's recipes
    return {"base_model": refs[0], "dtype": "bfloat16", "slices": slices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--gpu-memory", default="80GB", help="the GPU the plan is for (default 80GB)")
    parser.add_argument("--host-memory", default=None, help="host memory (default: this machine's)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--granularity", type=int, default=4, help="layers per LFS group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    shape = SHAPES[args.shape]
    refs = ["bench:base"] + [f"bench:expert{i + 1}" for i in range(args.experts)]
    sizes = {k: shape[k] for k in ("layers", "hidden", "intermediate", "vocab")}
    models = [llama_shapes(ref, **sizes) for ref in refs]
    gpu_bytes = parse_memory(args.gpu_memory)
    host = host_capacity(parse_memory(args.host_memory) if args.host_memory else None)
    live = LiveModel(models[0].nbytes, "bfloat16", "cuda")
    plan = plan_live_memory(models, anchor=refs[0], live=live, device="cuda", gpu=Capacity(gpu_bytes, "given"),
                            host=host)
    print(f"Llama {args.shape} ({models[0].numel / 1e9:.2f}B parameters, {format_bytes(models[0].nbytes)} in bf16) "
          f"x (base + {args.experts} experts), bf16 live model:")
    print(plan.describe(), flush=True)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and args.shape != "tiny":
        print("\ntiming: needs a CUDA GPU (none here); the plan above is what a GPU run would follow. "
              "`--shape tiny` runs the same code on this CPU as a smoke test.")
        return
    if not plan.fits and cuda:
        print(f"\nthe plan does not fit this setting; not timing ({plan.advice})")
        return
    # An indexed device: set_per_process_memory_fraction refuses a bare "cuda".
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_bytes / total), device)
        print(f"\n{torch.cuda.get_device_name(device)}: {format_bytes(total)}, held to "
              f"{format_bytes(min(gpu_bytes, total))} for this run", flush=True)
    else:
        print("\nno CUDA GPU: smoke run on the CPU, sources streamed from (unpinned) host blocks", flush=True)
    results = time_candidates(args, shape, refs, models, device, gpu_bytes, host)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"shape": args.shape, "experts": args.experts, "gpu_memory": gpu_bytes,
                                         "plan": plan.describe(), "device": str(device), "results": results},
                                        indent=2) + "\n")


def time_candidates(args, shape: dict, refs: list[str], models, device, gpu_bytes: int, host: Capacity) -> list:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from auto_merge.merge.io import TensorInfo
    from auto_merge.merge.live import LiveMerger
    from auto_merge.merge.plan import ModelCatalog, SourceModel

    config = hf_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items()
                                               if k not in ("model_type", "architectures")}))
    model = model.to(dtype=torch.bfloat16).to_empty(device=device).eval().requires_grad_(False)

    catalog = ModelCatalog(build_zoo=False)
    sources = {}
    for shapes in models:
        infos = {name: TensorInfo(t.shape, t.dtype) for name, t in shapes.tensors.items()}
        sources[shapes.ref] = SourceModel(ref=shapes.ref, path=Path(f"/nonexistent/{shapes.ref}"), config=config,
                                          tensors=infos)
        catalog.add(sources[shapes.ref])
    on_gpu = device.type == "cuda"
    merger = LiveMerger(model, catalog, device=str(device), models=refs, gpu_memory=gpu_bytes if on_gpu else None,
                        host_memory=host.nbytes if host.source == "given" else None,
                        layout="auto" if on_gpu else "streamed")
    first = merger.compile(candidate(args.methods[0], refs, shape["layers"], args.granularity, random.Random(0)))
    merger.prepare(first)
    plan = merger.memory_plan
    print(f"the merger's own plan (capacities as it sees them): {plan.summary()}", flush=True)

    started = time.perf_counter()
    for index, ref in enumerate(refs):
        def synthetic(name: str, index=index, ref=ref) -> torch.Tensor:
            generator = torch.Generator(device=device).manual_seed(zlib.crc32(f"{args.seed}/{name}".encode()))
            info = sources[ref].tensors[name]
            base = torch.randn(info.shape, generator=generator, device=device, dtype=torch.float32) * BASE_STD
            if index:
                generator.manual_seed(zlib.crc32(f"{args.seed}/{name}/{index}".encode()))
                base += torch.randn(info.shape, generator=generator, device=device) * EXPERT_STD
            return base.to(torch.bfloat16)

        merger.resident.load(sources[ref], read=synthetic)
    sync(device)
    print(f"sources made and placed in {time.perf_counter() - started:.1f} s: {format_bytes(merger.resident.nbytes)} "
          f"held", flush=True)

    results, rows = [], []
    for method in args.methods:
        rng = random.Random(f"{args.seed}-{method}")
        times, staged = [], []
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        for k in range(args.warmup + args.candidates):
            recipe = candidate(method, refs, shape["layers"], args.granularity, rng)
            merger.invalidate()  # every tensor recomputed
            before = merger._staging.copied_bytes if merger._staging is not None else 0
            sync(device)
            t0 = time.perf_counter()
            update = merger.apply(recipe, seed=args.seed + k)
            sync(device)
            elapsed = time.perf_counter() - t0
            assert not update.reused
            if k >= args.warmup:
                times.append(elapsed)
                staged.append((merger._staging.copied_bytes if merger._staging is not None else 0) - before)
        peak = torch.cuda.max_memory_allocated(device) if on_gpu else None
        median = statistics.median(times)
        rate = statistics.median(staged) / median if staged and staged[0] else 0.0
        rows.append(f"{method:16s} {median * 1e3:9.0f} ms (min {min(times) * 1e3:.0f}), staged "
                    f"{format_bytes(statistics.median(staged))} per candidate ({rate / 1e9:.1f} GB/s effective)"
                    + (f", GPU peak allocated {format_bytes(peak)} (plan {format_bytes(plan.gpu_peak)})"
                       if peak is not None else ""))
        print(rows[-1], flush=True)
        results.append({"method": method, "times_s": times, "staged_bytes": staged, "gpu_peak_allocated": peak,
                        "plan_gpu_peak": plan.gpu_peak, "layout": plan.layout})
    return results


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
