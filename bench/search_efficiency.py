"""Benchmark: multi-fidelity BO (Hyperband) against random search and full-fidelity BO at equal compute, on the zoo.

    .venv/bin/python bench/search_efficiency.py [--seeds 0 1 2 3 4] [--full-evals 40] [--out bench/results/se]

Compute is counted in evaluated examples (cached examples are free, so a Hyperband promotion pays only for its new
examples). Every run gets the same total: `--full-evals` times the examples of one full evaluation. Prints, per
optimizer, the best full-budget score reached at each compute level (mean over seeds), each run's winner re-scored on
all examples against the best expert, the best uniform task-arithmetic and TIES merges of `auto-merge zoo report`,
the compute MF-BO needs to reach random search's final best, and per run the Spearman rank correlation between
scores at the lowest and the highest budget (configurations evaluated at both). Writes a plot of the curves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("hyperband", "successive_halving", "random", "bo", "cmaes")


def write_config(folder: Path, optimizer: str, seed: int, total_examples: float, full_examples: int) -> Path:
    base = yaml.safe_load((REPO / "exp_config" / "lfs.yaml").read_text())
    # total_budget is in budget units: one full evaluation = max_budget units = full_examples examples.
    base.update(optimizer=optimizer, n_trials=0,
                total_budget=total_examples / full_examples * base["max_budget"],
                run_name=f"{optimizer}-seed{seed}")
    config = yaml.safe_load((REPO / "exp_config" / "config_lfs.yaml").read_text().replace("!include", ""))
    config["global_params"].update(random_seed=seed, output_path=str(folder))
    config["global_params"]["evaluation"]["include_path"] = str(REPO / "custom_tasks")
    config["strategies"] = {"lfs": base}
    path = folder / f"{optimizer}-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def curve(trials: list[dict], max_budget: float) -> list[tuple[int, float]]:
    """(examples spent, best score among trials at the highest budget so far) after each trial."""
    spent, best, points = 0, None, []
    for trial in trials:
        spent += trial.get("evaluated_examples") or 0
        at_top = trial["budget"] is None or trial["budget"] >= max_budget - 1e-9
        if trial["status"] == "success" and at_top and (best is None or trial["score"] > best):
            best = trial["score"]
        points.append((spent, best))
    return points


def best_at(points: list[tuple[int, float]], compute: float) -> float | None:
    reached = [b for spent, b in points if spent <= compute and b is not None]
    return reached[-1] if reached else None


def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else None


def low_high_correlation(trials: list[dict]) -> float | None:
    """Spearman correlation of scores at the lowest and the highest budget used (configurations run at both)."""
    budgets = [t["budget"] for t in trials if t["budget"] is not None]
    if not budgets:
        return None
    min_budget, max_budget = min(budgets), max(budgets)
    low, high = {}, {}
    for t in trials:
        if t["status"] != "success" or t["budget"] is None:
            continue
        key = json.dumps(t["configuration"], sort_keys=True)
        if abs(t["budget"] - min_budget) < 1e-6:
            low[key] = t["score"]
        elif abs(t["budget"] - max_budget) < 1e-6:
            high[key] = t["score"]
    both = sorted(set(low) & set(high))
    return spearman([low[k] for k in both], [high[k] for k in both])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--full-evals", type=float, default=40, help="compute per run, in full evaluations")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS[:4]), choices=OPTIMIZERS,
                        help="cmaes (CMA-ES over the weights, as mergekit-evolve) is run only when named")
    parser.add_argument("--out", type=Path, default=Path("/tmp/auto-merge-search-efficiency"))
    args = parser.parse_args()

    from auto_merge.search.driver import run_search
    from auto_merge.search.outputs import read_trials
    from auto_merge.zoo.report import run_report
    from auto_merge.zoo.tasks import HEADLINE_TASKS
    from auto_merge.zoo.world import build_world, eval_docs

    world = build_world(0)
    full_examples = sum(len(eval_docs(world, t.removeprefix("zoo_"))) for t in HEADLINE_TASKS)
    total = args.full_evals * full_examples
    block = yaml.safe_load((REPO / "exp_config" / "lfs.yaml").read_text())
    args.out.mkdir(parents=True, exist_ok=True)

    report = run_report(seed=0, samples=0)
    uniform = max((r for r in report.rows if r.kind == "task_arithmetic"), key=lambda r: r.mean)
    ties = max((r for r in report.rows if r.kind == "ties"), key=lambda r: r.mean)
    best_expert = report.best_expert.mean

    runs = {opt: [] for opt in args.optimizers}
    for seed in args.seeds:
        for optimizer in args.optimizers:
            config = write_config(args.out, optimizer, seed, total, full_examples)
            started = time.perf_counter()
            result = run_search(config, overwrite=True, show_progress=False, write_model=False)
            trials = read_trials(result.run_dir / "trials.jsonl")
            winner = max(w["mean_score"] for w in result.final_scores["winners"])
            runs[optimizer].append({
                "seed": seed,
                "seconds": time.perf_counter() - started,
                "trials": len(trials),
                "curve": curve(trials, block["max_budget"]),
                "winner_full": winner,
                "rank_correlation": low_high_correlation(trials),
            })
            print(f"{optimizer} seed {seed}: {len(trials)} trials, winner {winner:.3f} (full budget), "
                  f"{runs[optimizer][-1]['seconds']:.0f} s, low/high rank correlation "
                  f"{runs[optimizer][-1]['rank_correlation']}", flush=True)

    levels = [total * f for f in (0.1, 0.2, 1 / 3, 0.5, 0.75, 1.0)]
    print(f"\nbest score at the highest budget, mean over seeds {args.seeds}, by compute (examples; one full "
          f"evaluation = {full_examples}):")
    print("optimizer ".ljust(12) + "".join(f"{int(c):>10}" for c in levels))
    means = {}
    for optimizer, items in runs.items():
        row = []
        for c in levels:
            values = [best_at(r["curve"], c) for r in items]
            values = [v for v in values if v is not None]
            row.append(statistics.fmean(values) if values else None)
        means[optimizer] = row
        print(optimizer.ljust(12) + "".join(f"{v:10.3f}" if v is not None else f"{'-':>10}" for v in row))
    print(f"\nreference points (zoo report, seed 0): best expert {best_expert:.3f}, best uniform TA {uniform.mean:.3f}"
          f" ({uniform.label}), best TIES {ties.mean:.3f} ({ties.label})")
    for optimizer, items in runs.items():
        winners = [r["winner_full"] for r in items]
        correlations = [r["rank_correlation"] for r in items if r["rank_correlation"] is not None]
        print(f"{optimizer}: winner (full budget) mean {statistics.fmean(winners):.3f}, min {min(winners):.3f}; "
              f"lead over best expert {100 * (statistics.fmean(winners) - best_expert):+.1f} points; "
              f"beats uniform TA in {sum(w > uniform.mean for w in winners)}/{len(winners)}, TIES in "
              f"{sum(w > ties.mean for w in winners)}/{len(winners)}"
              + (f"; low/high budget rank correlation mean {statistics.fmean(correlations):.2f}" if correlations
                 else ""))
    for multi_fidelity in ("hyperband", "successive_halving"):
        if multi_fidelity not in runs or "random" not in runs:
            continue
        target = statistics.fmean(best_at(r["curve"], total) or 0 for r in runs["random"])
        needed = []
        for r in runs[multi_fidelity]:
            reached = [spent for spent, b in r["curve"] if b is not None and b >= target]
            needed.append(reached[0] / total if reached else None)
        text = ", ".join(f"{n:.2f}" if n is not None else "never" for n in needed)
        print(f"compute {multi_fidelity} needs to reach random search's final best ({target:.3f}), as a share of "
              f"the budget: {text}")
    (args.out / "summary.json").write_text(json.dumps({"runs": runs, "levels": levels, "means": means}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for optimizer, row in means.items():
        ax.plot(levels, [v if v is not None else float("nan") for v in row], "o-", label=optimizer)
    ax.axhline(best_expert, color="gray", linestyle="--", label="best expert")
    ax.axhline(uniform.mean, color="tab:red", linestyle=":", label="best uniform TA")
    ax.set_xlabel("examples evaluated")
    ax.set_ylabel("best score at max budget (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "search_efficiency.png", dpi=110)
    print(f"plot: {args.out / 'search_efficiency.png'}")


if __name__ == "__main__":
    main()
