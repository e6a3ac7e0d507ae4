"""Benchmark: the LFS-MO Pareto front against random search's at equal compute, by hypervolume (issue 15).

    .venv/bin/python bench/mo_hypervolume.py [--seeds 0 1 2] [--full-evals 20] [--variants successive_halving random]

Runs the demo's `lfs_multiobj` search (exp_config/lfs.yaml, one objective per zoo task) once per variant and seed,
each with the same compute (`--full-evals` full evaluations' worth of examples, as `total_budget`; the multi-fidelity
run's trial count is estimated from it, and the per-example cache makes it spend somewhat less), and prints the
hypervolume of each run's front: the front members re-scored on every example (final_scores.json), in the space of
the three task scores, against the reference point 0 (the largest possible is 1). The best single expert's and all
experts' hypervolumes are printed for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import yaml
from demo_config import demo_lfs_config



def hypervolume(points: list[tuple[float, ...]]) -> float:
    """Volume dominated by `points` (maximised, every coordinate >= 0) above the origin: exact, by slicing along the
    last coordinate (fine for the tens of points a front has)."""
    points = [tuple(p) for p in points]
    if not points:
        return 0.0
    if len(points[0]) == 1:
        return max(p[0] for p in points)
    levels = sorted({p[-1] for p in points}, reverse=True)
    volume = 0.0
    for index, level in enumerate(levels):
        below = levels[index + 1] if index + 1 < len(levels) else 0.0
        slab = [p[:-1] for p in points if p[-1] >= level]
        volume += hypervolume(slab) * (level - below)
    return volume


def write_config(folder: Path, optimizer: str, seed: int, total_examples: float, full_examples: int) -> Path:
    config, block = demo_lfs_config(folder)
    block.update(optimizer=optimizer, n_trials=0, total_budget=total_examples / full_examples * block["max_budget"],
                 run_name=f"mo-{optimizer}-seed{seed}")
    config["strategy"] = "lfs_multiobj"
    config["global_params"].update(random_seed=seed, baselines=False)
    config["strategies"] = {"lfs_multiobj": block}
    path = folder / f"{block['run_name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":  # SMAC's suggestions depend on the hash seed
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--full-evals", type=float, default=20)
    parser.add_argument("--variants", nargs="+", default=["successive_halving", "random"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/auto-merge-mo-hypervolume"))
    args = parser.parse_args()

    from auto_merge.search.driver import run_search
    from auto_merge.zoo.tasks import HEADLINE_TASKS
    from auto_merge.zoo.world import build_world, eval_docs

    world = build_world(0)
    full_examples = sum(len(eval_docs(world, t.removeprefix("zoo_"))) for t in HEADLINE_TASKS)
    args.out.mkdir(parents=True, exist_ok=True)
    volumes: dict[str, list[float]] = {v: [] for v in args.variants}
    experts = None
    for seed in args.seeds:
        for variant in args.variants:
            config = write_config(args.out, variant, seed, args.full_evals * full_examples, full_examples)
            result = run_search(config, overwrite=True, show_progress=False, write_model=False)
            final = result.final_scores
            tasks = sorted(final["winners"][0]["scores"])
            front = [tuple(w["scores"][t] for t in tasks) for w in final["winners"]]
            volumes[variant].append(hypervolume(front))
            spent = final["compute"]
            print(f"{variant} seed {seed}: {len(front)} front members, hypervolume {volumes[variant][-1]:.3f}; "
                  f"{spent['trials']} trials, {spent.get('full_evaluations')} full evaluations", flush=True)
            if experts is None:
                experts = {name: tuple(e["scores"][t] for t in tasks) for name, e in final["experts"].items()}
    print(f"\nhypervolume of the full-budget front (task scores {', '.join(tasks)}; reference point 0; at most 1), "
          f"mean over seeds {args.seeds}, {args.full_evals:g} full evaluations each:")
    for variant, values in volumes.items():
        print(f"{variant}: mean {statistics.fmean(values):.3f} (per seed {', '.join(f'{v:.3f}' for v in values)})")
    best = max(experts.values(), key=lambda point: hypervolume([point]))
    print(f"for scale: the best single expert {hypervolume([best]):.3f}, all experts together "
          f"{hypervolume(list(experts.values())):.3f}")
    (args.out / "summary.json").write_text(json.dumps({"volumes": volumes, "experts": experts}, indent=1))


if __name__ == "__main__":
    main()
