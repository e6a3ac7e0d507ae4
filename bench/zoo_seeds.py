"""Benchmark: the zoo's quality bar across build seeds and CPU kernels (builds each zoo, then `auto-merge zoo report`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/zoo_seeds.py --seeds 0 1 2 3 4 --out-dir /tmp/zoos \\
        [--samples 30] [--json bench/results/zoo_seeds_native.json]
    ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 .venv/bin/python bench/zoo_seeds.py ... (the other variant)

Each zoo is built with the project's recipe into ``OUT_DIR/seed<N>-<variant>`` (variant: ``default`` under
``ATEN_CPU_CAPABILITY=default``, torch's portable kernels, else ``native``; a finished build is reused) and scored
there. Prints each report table and a summary line per seed: the weakest expert on its own task (bar ≥ 0.95), the
best random per-group merge against the best expert (bar ≥ +10 points) and against the best uniform task arithmetic
(bar ≥ +5), and the depth bar on the four tasks: the layer expert `cap` on its own task (≥ 0.95), the best stack
deeper than the base against the best expert (≥ +5), with the best same-depth stack beside it for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def state_hash(weights: Path) -> str:
    """sha256 over (name, bytes) of every tensor in name order, first 12 hex digits: the hash the design experiment
    (bench/zoo_round4/z4.py `sd_hash`) printed, so a build can be matched with its table."""
    import hashlib

    from safetensors.torch import load_file

    state = load_file(weights)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--out-dir", type=Path, required=True, help="where the zoos are built (one folder each)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()

    import torch

    from auto_merge.zoo.build import ensure_zoo
    from auto_merge.zoo.report import EXPERTS, LAYER_EXPERT, OWN_TASK, run_report

    variant = "default" if os.environ.get("ATEN_CPU_CAPABILITY") == "default" else "native"
    print(f"kernels: {variant} ({torch.backends.cpu.get_cpu_capability()})", flush=True)
    summary = []
    for seed in args.seeds:
        started = time.perf_counter()
        root = ensure_zoo(seed=seed, out=args.out_dir / f"seed{seed}-{variant}", show_progress=False)
        build_seconds = json.loads((root / "zoo.json").read_text())["build_seconds"]
        report = run_report(seed=seed, samples=args.samples, root=root)
        print(report.render(), flush=True)
        print(f"seed {seed} {variant}: build {build_seconds:.0f} s (as recorded when built), report "
              f"{report.seconds:.0f} s, wall {time.perf_counter() - started:.0f} s\n", flush=True)
        summary.append({
            "seed": seed,
            "variant": variant,
            "base_state_hash": state_hash(root / "base" / "model.safetensors"),
            "build_seconds": build_seconds,
            "own": {name: report.row(name).scores[OWN_TASK[name]] for name in EXPERTS},
            "base": report.row("base").mean,
            "best_expert": [report.best_expert.label, report.best_expert.mean],
            "best_uniform_ta": [report.best_uniform_ta.label, report.best_uniform_ta.mean],
            "best_random": [report.best_random.label, report.best_random.mean],
            "merge_gain_points": 100 * report.merge_gain,
            "search_gain_points": 100 * report.search_gain,
            "layer_expert_own": report.row(LAYER_EXPERT).scores[OWN_TASK[LAYER_EXPERT]],
            "best_expert_of_four": [report.best_expert_of_four.label, report.best_expert_of_four.depth_mean],
            "best_deeper_stack": [report.best_deeper_stack.label, report.best_deeper_stack.depth_mean],
            "best_same_depth_stack": max(([r.label, r.depth_mean] for r in report.stacks
                                          if r.setting["depth"] == r.setting["base_depth"]), key=lambda x: x[1]),
            "depth_gain_points": 100 * report.depth_gain,
            "depth_pays": report.depth_pays,
            "quality_bar_met": report.quality_bar_met,
        })
    print("seed  variant  base hash     weakest own  best expert   best uniform TA       best random             "
          "vs expert  vs TA   bar")
    for s in summary:
        print(f"{s['seed']:>4}  {s['variant']:7s}  {s['base_state_hash']}  {min(s['own'].values()):.3f}        "
              f"{s['best_expert'][1]:.3f} ({s['best_expert'][0]})  "
              f"{s['best_uniform_ta'][1]:.3f} ({s['best_uniform_ta'][0]})  "
              f"{s['best_random'][1]:.3f} ({s['best_random'][0]})  {s['merge_gain_points']:+6.1f}  "
              f"{s['search_gain_points']:+6.1f}  {'met' if s['quality_bar_met'] else 'NOT met'}")
    print("\nseed  variant  cap own  best expert (4 tasks)  best deeper stack              same-depth stack"
          "               depth gain  bar")
    for s in summary:
        print(f"{s['seed']:>4}  {s['variant']:7s}  {s['layer_expert_own']:.3f}    "
              f"{s['best_expert_of_four'][1]:.3f} ({s['best_expert_of_four'][0]})          "
              f"{s['best_deeper_stack'][1]:.3f} ({s['best_deeper_stack'][0]})  "
              f"{s['best_same_depth_stack'][1]:.3f} ({s['best_same_depth_stack'][0]})  "
              f"{s['depth_gain_points']:+6.1f}      {'met' if s['depth_pays'] else 'NOT met'}")
    met = sum(s["quality_bar_met"] for s in summary)
    print(f"quality bar met on {met} of {len(summary)} seeds ({variant} kernels)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
