"""Benchmark: time per in-memory merge candidate (LFS-style recipe) against the memory-bandwidth roofline.

    .venv/bin/python bench/materialise.py                       # CPU, the ~170M bench models, fp32
    .venv/bin/python bench/materialise.py --device cuda         # GPU, a Llama-2-7B-shaped model in bf16, synthetic
    options: --config {170m,7b,tiny} --dtype {float32,bfloat16} --source {disk,synthetic} --candidates 5
             --methods linear task_arithmetic ties dare_ties della --paths recipe plan --granularity 2 --threads N

Sources (base + 3 experts) are made resident once, then each candidate is an LFS decode (`auto_merge.strategies.lfs`):
one slice per layer group, each with the method under test and its own freshly drawn parameters per parameter family
(self_attn / mlp / the rest), so every tensor is recomputed for every candidate. Two in-memory paths are timed:

- ``recipe``: :class:`auto_merge.merge.live.LiveMerger` ``.apply(recipe)`` (plan compiled per candidate, as the
  search does);
- ``plan``: :func:`auto_merge.merge.live.materialise_into` with a per-tensor :class:`TensorSpec` plan (no recipe
  compilation), over :class:`ResidentSources`.

The roofline of one candidate is the bytes it must touch at the least (each source tensor read once in its resident
dtype, base included for the methods that use it, and each output tensor written once in the live model's dtype)
divided by a copy bandwidth measured in the same run (``dst.copy_(src)`` over a buffer far larger than the caches,
counted as bytes read + bytes written). The ratio column is measured time ÷ roofline time (1.0 = at the roofline).

On CUDA the sources are generated on the GPU (`bench/make_models.py:synthetic_state`), since four 7B checkpoints do
not fit the disk; base + 3 experts in bf16 (~54 GB) and the live bf16 model (~13.5 GB) are resident on one GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_models  # noqa: E402
import torch  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "della")
FILTERS = ("self_attn", "mlp")
GOALS_MS_CUDA_7B = {"linear": 50, "task_arithmetic": 50, "ties": 250, "dare_ties": 250, "della": 250}
CPU_ROOFLINE_GOAL = 2.0  # within 2x of the roofline on the CPU
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REFS = ("bench:base",) + tuple(f"bench:{name}" for name in make_models.EXPERTS)


# ---------------------------------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def profile_candidate(merger, recipe: dict, device: torch.device, method: str, top: int = 18) -> None:
    """One candidate under torch.profiler: the operators with the most self time (device time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    merger.invalidate()
    with profile(activities=activities) as prof:
        merger.apply(recipe)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"  profile of one {method} candidate, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=48))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=48))


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 7) -> float:
    """Best `dst.copy_(src)` bandwidth in bytes/s, counting bytes read + bytes written."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - started)
    del src, dst
    return 2 * n * 4 / best


# ---------------------------------------------------------------------------------------------------- candidates

def lfs_strategy(n_layers: int, granularity: int, method: str, models: dict[str, Path | None]):
    from auto_merge.strategies.lfs import LFSStrategy

    refs = list(models)
    return LFSStrategy(base_model=refs[0], models=tuple(refs[1:]), num_layers=n_layers,
                       layer_granularity=granularity, filters=FILTERS, method_ranges={method: {}})


def draw_values(strategy, method: str, rng: random.Random) -> dict:
    """One LFS configuration: every group on `method`, every searched parameter drawn uniformly in its range."""
    values = {}
    n_models = len(strategy.models)
    for g in range(strategy.n_groups):
        values[f"g{g}:method"] = method
        for param, (low, high) in strategy.searched_params(method):
            for family in strategy.families:
                names = ([f"g{g}:{family}:{method}:{param.name}:m{i}" for i in range(n_models)]
                         if param.per_model else [f"g{g}:{family}:{method}:{param.name}"])
                for name in names:
                    values[name] = rng.uniform(low, high)
    return values


def tensor_plan(recipe: dict, n_layers: int, granularity: int):
    """The per-tensor plan equivalent of an LFS recipe (for `materialise_into`): group by layer, family by filter."""
    from auto_merge.merge.live import TensorSpec, layer_index

    n_groups = n_layers // granularity
    specs = []  # specs[g][family]
    for slice_ in recipe["slices"]:
        method = slice_["merge_method"]
        by_family = {}
        for family_index, family in enumerate(FILTERS + ("rest",)):
            pick = lambda v: v[family_index]["value"] if isinstance(v, list) else v
            global_params = {k: pick(v) for k, v in slice_.get("parameters", {}).items()}
            per_model = tuple({k: pick(v) for k, v in source.get("parameters", {}).items()}
                              for source in slice_["sources"])
            by_family[family] = TensorSpec(method, global_params, per_model)
        specs.append(by_family)

    def plan(name: str):
        layer = layer_index(name)
        if layer is None:
            group = 0 if "embed" in name else n_groups - 1
        else:
            group = layer // granularity
        family = next((f for f in FILTERS if f in name), "rest")
        return specs[group][family]

    return plan


# ---------------------------------------------------------------------------------------------------- sources

def load_sources(args, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], dict[str, Path | None]]:
    """Four state dicts (base, expert1..3) resident on `device` in `dtype`, and each model's folder (None when
    synthetic)."""
    if args.source == "disk":
        from safetensors import safe_open

        root = make_models.ensure_models(args.config, args.seed, args.models_root)
        folders = [root / "base"] + [root / name for name in make_models.EXPERTS]
        states = []
        for folder in folders:
            state = {}
            with safe_open(str(folder / "model.safetensors"), framework="pt", device=str(device)) as handle:
                for name in handle.keys():
                    state[name] = handle.get_tensor(name).to(dtype)
            states.append(state)
        return states, dict(zip(REFS, folders))
    states = [make_models.synthetic_state(args.config, args.seed, expert=e, device=device, dtype=dtype)
              for e in range(1 + len(make_models.EXPERTS))]
    return states, dict.fromkeys(REFS)


def build_catalog(models: dict[str, Path | None], states: list[dict], config: dict):
    """A catalog that knows the four models: from their folders, or (synthetic) from the in-memory tensors."""
    from auto_merge.merge.io import TensorInfo
    from auto_merge.merge.plan import ModelCatalog, SourceModel

    catalog = ModelCatalog(build_zoo=False)
    for (ref, folder), state in zip(models.items(), states):
        if folder is not None:
            catalog.add(SourceModel.from_folder(ref, folder))
        else:
            infos = {name: TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()}
            catalog.add(SourceModel(ref=ref, path=Path(f"/nonexistent/{ref}"), config=config, tensors=infos))
    return catalog


def resident_models(states: list[dict], device: torch.device, dtype: torch.dtype):
    """LiveMerger's resident store filled with the tensors already in memory (no second copy, no disk read).

    Uses ResidentModels' private fields (`_states`, `_deltas`); with ``anchor=None`` every model is kept as is in
    ``dtype``, so bf16 sources stay bf16 weights (the LiveMerger default would keep an fp32 base + bf16 deltas,
    which does not fit one H100 for a 7B model)."""
    from auto_merge.merge.live import ResidentModels

    resident = ResidentModels(device=device, dtype=dtype, anchor=None)
    for ref, state in zip(REFS, states):
        resident._states[ref] = state
        resident._deltas[ref] = set()
    return resident


def live_model(config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A LlamaForCausalLM with uninitialised weights on `device` (every candidate overwrites all of them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- main

def bytes_touched(states: list[dict], model: torch.nn.Module, method: str) -> int:
    from auto_merge.merge.methods import get_method

    takes_base = get_method(method).base_model != "none"
    sources = states if takes_base else states[1:]
    read = sum(t.numel() * t.element_size() for state in sources for t in state.values())
    params = dict(model.named_parameters())
    written = sum(params[name].numel() * params[name].element_size() for name in states[0])
    return read + written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--config", choices=sorted(make_models.CONFIGS), default=None,
                        help="model shape (default: 170m on cpu, 7b on cuda)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="resident sources and live model (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--source", choices=("disk", "synthetic"), default=None,
                        help="disk: the bench models (built once); synthetic: generated on the device "
                             "(default: disk for 170m/tiny on cpu, synthetic otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models-root", type=Path, default=make_models.DEFAULT_ROOT)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--paths", nargs="+", choices=("recipe", "plan"), default=["recipe", "plan"])
    parser.add_argument("--candidates", type=int, default=5, help="timed candidates per method and path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed candidates first")
    parser.add_argument("--granularity", type=int, default=None, help="layers per LFS group (default: depth/8 "
                        "rounded to a divisor)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--bandwidth-bytes", type=float, default=None,
                        help="buffer size of the copy-bandwidth measurement (default 1 GiB cpu, 4 GiB cuda)")
    parser.add_argument("--check-parity", action="store_true",
                        help="once per method: the recipe and plan paths must write identical weights")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more candidate per method (torch.profiler) and print the top operators")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    args.config = args.config or ("7b" if device.type == "cuda" else "170m")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    args.source = args.source or ("disk" if device.type == "cpu" and args.config != "7b" else "synthetic")
    torch.set_num_threads(args.threads)
    config = make_models.hf_config(args.config)
    n_layers = config["num_hidden_layers"]
    granularity = args.granularity or next(k for k in range(max(1, n_layers // 8), n_layers + 1) if n_layers % k == 0)

    load_avg = [os.getloadavg()]
    bw_bytes = int(args.bandwidth_bytes or (4 * 2**30 if device.type == "cuda" else 2**30))
    bandwidth = copy_bandwidth(device, bw_bytes)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    started = time.perf_counter()
    states, models = load_sources(args, device, dtype)
    sync(device)
    load_s = time.perf_counter() - started
    model = live_model(config, device, dtype)
    catalog = build_catalog(models, states, config)
    resident_bytes = sum(t.numel() * t.element_size() for s in states for t in s.values())
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} threads'})"
          f", {args.config} Llama ({make_models.n_params(args.config) / 1e6:.1f}M params), {str(dtype)[6:]}, "
          f"sources {args.source}: {resident_bytes / 2**30:.2f} GiB resident (made in {load_s:.1f} s); "
          f"LFS groups of {granularity} layers ({n_layers // granularity} groups) x families {FILTERS + ('rest',)}; "
          f"copy bandwidth {bandwidth / 1e9:.2f} GB/s (read+write, {bw_bytes / 2**30:.1f} GiB buffer)", flush=True)

    from auto_merge.merge.live import LiveMerger, ResidentSources, materialise_into

    sources = ResidentSources(states[0], states[1:])
    merger = LiveMerger(model, catalog, device=str(device), dtype=dtype)
    merger.resident = resident_models(states, device, dtype)

    rows, results = [], []
    for method in args.methods:
        strategy = lfs_strategy(n_layers, granularity, method, models)
        touched = bytes_touched(states, model, method)
        roofline_s = touched / bandwidth
        if args.check_parity:
            recipe = strategy.decode(draw_values(strategy, method, random.Random(f"parity-{method}")))
            merger.invalidate()
            merger.apply(recipe, seed=args.seed)
            written = {name: t.detach().clone() for name, t in model.named_parameters()}
            materialise_into(model, sources, tensor_plan(recipe, n_layers, granularity), seed=args.seed)
            worst = max(float((t.float() - written[name].float()).abs().max()) for name, t in model.named_parameters())
            print(f"  {method:16s} parity recipe vs plan: max abs diff {worst:.3g}", flush=True)
            del written
        for path in args.paths:
            rng = random.Random(f"{args.seed}-{method}")
            times = []
            for k in range(args.warmup + args.candidates):
                recipe = strategy.decode(draw_values(strategy, method, rng))
                seed = args.seed + k
                sync(device)
                t0 = time.perf_counter()
                if path == "recipe":
                    merger.invalidate()  # parameters all changed anyway; make sure nothing is skipped
                    update = merger.apply(recipe, seed=seed)
                    assert not update.reused, "a candidate reused tensors: parameters did not change"
                else:
                    materialise_into(model, sources, tensor_plan(recipe, n_layers, granularity), seed=seed)
                sync(device)
                if k >= args.warmup:
                    times.append(time.perf_counter() - t0)
            if args.profile:
                profile_candidate(merger, strategy.decode(draw_values(strategy, method, rng)), device, method)
            load_avg.append(os.getloadavg())
            med, best = statistics.median(times), min(times)
            ratio = med / roofline_s
            goal = ""
            if device.type == "cuda" and args.config == "7b" and dtype == torch.bfloat16:
                goal = f"<= {GOALS_MS_CUDA_7B[method]} ms: " + ("met" if med * 1e3 <= GOALS_MS_CUDA_7B[method]
                                                               else "MISSED")
            elif device.type == "cpu":
                goal = f"<= {CPU_ROOFLINE_GOAL:g}x roofline: " + ("met" if ratio <= CPU_ROOFLINE_GOAL else "MISSED")
            rows.append([method, path, f"{ms(med)} (min {ms(best)})", f"{touched / 1e9:.4g} GB",
                         f"{bandwidth / 1e9:.2f}", ms(roofline_s), f"{ratio:.1f}x",
                         f"{load_avg[-1][0]:.1f}", goal])
            results.append({"method": method, "path": path, "times_s": times, "bytes_touched": touched,
                            "copy_bytes_per_s": bandwidth, "roofline_s": roofline_s, "load": load_avg[-1]})
            print(f"  {method:16s} {path:6s}: median {med * 1e3:8.1f} ms, min {best * 1e3:8.1f} ms over "
                  f"{len(times)} candidates; roofline {roofline_s * 1e3:.1f} ms; load {load_avg[-1][0]:.2f}",
                  flush=True)

    header = ["method", "path", "ms per candidate (median)", "bytes touched", "measured copy GB/s", "roofline ms",
              "ratio", "load", "goal"]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print(f"\nload average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load_avg[0])}, at end "
          f"{tuple(round(x, 2) for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": str(device), "config": args.config, "dtype": str(dtype),
                                         "threads": args.threads, "granularity": granularity,
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
