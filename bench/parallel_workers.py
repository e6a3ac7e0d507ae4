"""Benchmark: how busy each dask worker is during a search, with and without queued trials (issue 15 item 2).

    .venv/bin/python bench/parallel_workers.py [--workers 2] [--queued 0 1 auto] [--seeds 0] [--n-trials 90]

Runs the demo LFS search (exp_config/config_lfs.yaml, successive halving) with `n_workers` workers, once per
`queued_per_worker` value, and prints per run: wall time, each worker's busy share (time running a trial / the
trials' span, from trials.jsonl's started_unix/ended_unix), trials per budget (the successive-halving schedule) and
the winner's full-budget score. Busy shares are wall-clock figures: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import yaml
from demo_config import demo_lfs_config



def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":  # SMAC's suggestions depend on the hash seed
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queued", nargs="+", default=["0", "1", "auto"],
                        help="queued_per_worker values: a number (0 = only idle workers get a trial, as SMAC's own "
                             "loop) or auto")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n-trials", type=int, default=90)
    parser.add_argument("--out", type=Path, default=Path("/tmp/auto-merge-parallel-workers"))
    args = parser.parse_args()

    from auto_merge.search.driver import run_search
    from auto_merge.search.outputs import read_trials
    from auto_merge.search.parallel import worker_busy

    args.out.mkdir(parents=True, exist_ok=True)
    config, block = demo_lfs_config(args.out)
    config["global_params"]["baselines"] = False
    print(f"{os.cpu_count()} CPUs; {args.workers} workers; {args.n_trials} trials of the demo LFS search", flush=True)
    for seed in args.seeds:
        for queued in args.queued:
            name = f"seed{seed}-queued{queued}"
            config["global_params"]["random_seed"] = seed
            setting = queued if queued == "auto" else int(queued)
            config["strategies"] = {"lfs": {**block, "n_workers": args.workers, "queued_per_worker": setting,
                                            "n_trials": args.n_trials, "run_name": name}}
            path = args.out / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            started = time.perf_counter()
            result = run_search(path, overwrite=True, show_progress=False, write_model=False)
            seconds = time.perf_counter() - started
            trials = read_trials(result.run_dir / "trials.jsonl")
            busy = worker_busy(trials)
            per_budget = collections.Counter(round(t["budget"]) for t in trials if t["budget"] is not None)
            winner = max(w["mean_score"] for w in result.final_scores["winners"])
            keys = [(str(t["configuration"]), t["budget"]) for t in trials]
            print(f"queued_per_worker {queued}, seed {seed}: {len(trials)} trials ({len(set(keys))} distinct), "
                  f"{seconds:.0f} s in all; workers busy "
                  + ", ".join(f"{100 * share:.0f} %" for share in busy.values())
                  + f" of the trials' span; trials per budget {dict(sorted(per_budget.items()))}; "
                  f"winner {winner:.3f}", flush=True)


if __name__ == "__main__":
    main()
