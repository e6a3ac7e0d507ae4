"""Benchmark: the demo LFS search with its merges and evaluations on a CUDA GPU, beside the CPU demo's figures.

    python bench/gpu_search.py [--device cuda] [--dtype float32] [--trials N] [--out DIR] [--json PATH]
    .venv/bin/python bench/gpu_search.py --device cpu --trials 6     # the same code on the CPU: a check of the script

Runs `merge.py` on `exp_config/config_lfs.yaml` (the shipped zoo, 90 trials, 2 dask workers) with
`evaluation.device` set to `--device`, so the live model, every in-memory merge, every lm-eval forward pass and the
final scoring run there. Prints how the trials ended, the winner's full-budget score against the best expert and the
best uniform task arithmetic, and the wall time. On the CPU the demo gives the winner +33.2 points over the best
expert (README, "Quick start"); a GPU's float kernels differ, so its trials may differ, but a healthy run ends with
every trial a success and a winner far above the experts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from demo_config import demo_lfs_config

REPO = Path(__file__).resolve().parents[1]
CPU_DEMO_LEAD_POINTS = 33.2  # README, `python merge.py --config exp_config/config_lfs.yaml` on the 2-core CPU machine


def write_config(out: Path, device: str, dtype: str, trials: int | None) -> Path:
    config, strategy = demo_lfs_config(out)
    if trials is not None:
        strategy.update(n_trials=trials, total_budget=0)
    config["global_params"]["evaluation"].update(device=device, torch_dtype=dtype)
    config["strategies"] = {"lfs": strategy}
    path = out / f"config_lfs_{device.replace(':', '_')}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--trials", type=int, default=None, help="n_trials (default: the demo's)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/auto-merge-gpu-search"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = write_config(args.out, args.device, args.dtype, args.trials)
    run_name = f"lfs-{args.device.replace(':', '_')}-{args.dtype}"
    environment = {**os.environ, "PYTHONHASHSEED": "0"}  # as the demo: SMAC's suggestions depend on the hash seed
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "merge.py"), "--config", str(config), "--run-name", run_name,
                           "--overwrite", "--no-model"], env=environment, cwd=REPO)
    seconds = time.perf_counter() - started
    run_dir = args.out / run_name
    trials = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "trials.jsonl").exists() else []
    statuses: dict[str, int] = {}
    for trial in trials:
        statuses[trial["status"]] = statuses.get(trial["status"], 0) + 1
    errors = sorted({str(t.get("error"))[:200] for t in trials if t["status"] != "success"})
    result = {"device": args.device, "dtype": args.dtype, "exit": done.returncode, "seconds": round(seconds, 1),
              "trials": len(trials), "statuses": statuses, "errors": errors}
    final_path = run_dir / "final_scores.json"
    if final_path.exists():
        final = json.loads(final_path.read_text())
        winner = final["winners"][0]["mean_score"]
        experts = {ref: entry["mean_score"] for ref, entry in final.get("experts", {}).items()}
        best_expert = max(experts.values()) if experts else None
        baselines = {name: entry.get("mean_score") for name, entry in (final.get("baselines") or {}).items()
                     if isinstance(entry, dict)}
        result.update(winner=winner, best_expert=best_expert, baselines=baselines,
                      lead_points=None if best_expert is None else round(100 * (winner - best_expert), 1))
    print(f"\n{args.device} ({args.dtype}): exit {done.returncode} after {seconds:.0f} s; {len(trials)} trials "
          f"{statuses}")
    for error in errors:
        print(f"  failed trial: {error}")
    if "winner" in result:
        print(f"winner {result['winner']:.3f} vs best expert {result['best_expert']:.3f}: "
              f"{result['lead_points']:+.1f} points (the CPU demo: {CPU_DEMO_LEAD_POINTS:+.1f})")
        for name, score in result["baselines"].items():
            if score is not None:
                print(f"  baseline {name}: {score:.3f}")
        if trials:
            print(f"  mean trial time {statistics.fmean(t.get('seconds') or 0 for t in trials):.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
