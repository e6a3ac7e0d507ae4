"""Benchmark: the zoo's quality bar across seeds (builds each seed's zoo, then runs `auto-merge zoo report`).

    .venv/bin/python bench/zoo_seeds.py --seeds 0 1 2 3 [--samples 30] [--out bench/results/zoo_seeds.json]

Prints, per seed, the build time, each report table, and a summary line: whether each expert beats the base and
the other experts on its own task by the margin, and the best merge's lead over the best single expert.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from auto_merge.zoo.build import ensure_zoo
    from auto_merge.zoo.report import run_report

    summary = []
    for seed in args.seeds:
        started = time.perf_counter()
        root = ensure_zoo(seed=seed, show_progress=False)
        build_seconds = json.loads((root / "zoo.json").read_text())["build_seconds"]
        report = run_report(seed=seed, samples=args.samples)
        print(report.render(), flush=True)
        print(f"seed {seed}: build {build_seconds:.0f} s (as recorded when built), report {report.seconds:.0f} s, "
              f"wall {time.perf_counter() - started:.0f} s\n", flush=True)
        ta = [r for r in report.rows if r.kind == "task_arithmetic"]
        best_ta = max(ta, key=lambda r: r.mean)
        summary.append({
            "seed": seed,
            "build_seconds": build_seconds,
            "base": report.row("base").mean,
            "best_expert": [report.best_expert.label, report.best_expert.mean],
            "best_uniform_ta": [best_ta.label, best_ta.mean],
            "best_merge": [report.best_merge.label, report.best_merge.mean],
            "lead_points": 100 * (report.best_merge.mean - report.best_expert.mean),
            "expert_margins": report.expert_margins(),
            "quality_bar_met": report.quality_bar_met,
        })
    print("seed  base   best expert  best uniform TA     best merge                    lead    bar")
    for s in summary:
        print(f"{s['seed']:>4}  {s['base']:.3f}  {s['best_expert'][1]:.3f} ({s['best_expert'][0]})  "
              f"{s['best_uniform_ta'][1]:.3f} ({s['best_uniform_ta'][0]})  "
              f"{s['best_merge'][1]:.3f} ({s['best_merge'][0]})  {s['lead_points']:+.1f}  "
              f"{'met' if s['quality_bar_met'] else 'NOT met'}")
    met = sum(s["quality_bar_met"] for s in summary)
    print(f"quality bar met on {met} of {len(summary)} seeds")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
