"""Benchmark: the demo LFS search (multi-fidelity BO) against random search and CMA-ES at equal compute, on the zoo.

    .venv/bin/python bench/search_efficiency.py [--seeds 0 1 2 3 4] [--full-evals 40] [--out DIR]
        [--variants successive_halving random cmaes successive_halving:sources successive_halving+seeded]

A variant is OPTIMIZER[:STRATIFY][+contested|+seeded]: evaluation.stratify, and evaluation.contested_first set on or
off (otherwise the demo config's, on).

Compute is counted in evaluated examples (cached examples are free, so a promotion pays only for its new examples;
with `:sources`, scoring the sources before the search is counted from the start). Every run gets the same total:
`--full-evals` times the examples of one full evaluation. Prints, per variant, the best full-budget score reached at
each compute level (mean over seeds), each run's winner re-scored on all examples against the best expert, the best
uniform task-arithmetic and TIES merges of `auto-merge zoo report`, and the Spearman rank correlation between scores
at the lowest and the highest budget (configurations evaluated at both); then issue 15's goals S1-S4 for the first
variant: S1 its winner vs the best expert, S2 vs tuned-λ uniform task arithmetic, S3 the compute it needs to reach
random search's and CMA-ES's final best (same seed), S4 the rank correlation. Writes a plot of the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml
from demo_config import demo_lfs_config

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("hyperband", "successive_halving", "random", "bo", "cmaes")


def write_config(folder: Path, variant: str, seed: int, total_examples: float, full_examples: int) -> Path:
    """`variant`: an optimizer, or OPTIMIZER:STRATIFY (evaluation.stratify, e.g. successive_halving:sources), either
    with +contested (evaluation.contested_first: true) or +seeded (false; otherwise the demo config's setting)."""
    variant_name = variant
    variant, _, order = variant.partition("+")
    optimizer, _, stratify = variant.partition(":")
    config, base = demo_lfs_config(folder)
    # total_budget is in budget units: one full evaluation = max_budget units = full_examples examples.
    base.update(optimizer=optimizer, n_trials=0,
                total_budget=total_examples / full_examples * base["max_budget"],
                run_name=f"{variant_name.replace(':', '-').replace('+', '-')}-seed{seed}")
    # The reference points come from `auto-merge zoo report`; the search's own baselines would only repeat them.
    config["global_params"].update(random_seed=seed, baselines=False)
    config["global_params"]["evaluation"]["stratify"] = stratify or "none"
    if order:
        config["global_params"]["evaluation"]["contested_first"] = order == "contested"
    config["strategies"] = {"lfs": base}
    path = folder / f"{base['run_name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def curve(trials: list[dict], max_budget: float, spent_first: int = 0) -> list[tuple[int, float]]:
    """(examples spent, best score among trials at the highest budget so far) after each trial; `spent_first`: what
    the run spent before its first trial (evaluation.stratify: sources)."""
    spent, best, points = spent_first, None, []
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


def reach(points: list[tuple[int, float]], target: float) -> int | None:
    """Examples spent when the curve first reaches `target`."""
    return next((spent for spent, best in points if best is not None and best >= target - 1e-9), None)


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":  # SMAC's suggestions depend on the hash seed
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--full-evals", type=float, default=40, help="compute per run, in full evaluations")
    parser.add_argument("--variants", nargs="+", default=["successive_halving", "random", "cmaes"],
                        help=f"optimizers ({', '.join(OPTIMIZERS)}), each optionally with :STRATIFY "
                             "(evaluation.stratify, e.g. successive_halving:sources) and +contested or +seeded "
                             "(evaluation.contested_first on or off); the first is the one S1-S4 judge")
    parser.add_argument("--out", type=Path, default=Path("/tmp/auto-merge-search-efficiency"))
    args = parser.parse_args()
    for variant in args.variants:
        if variant.partition("+")[0].partition(":")[0] not in OPTIMIZERS:
            parser.error(f"unknown optimizer in {variant!r}: one of {', '.join(OPTIMIZERS)}")
        if variant.partition("+")[2] not in ("", "contested", "seeded"):
            parser.error(f"unknown order in {variant!r}: +contested or +seeded")

    from auto_merge.search.driver import run_search
    from auto_merge.search.outputs import STRATA_RECORD, read_trials
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

    runs = {variant: [] for variant in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            config = write_config(args.out, variant, seed, total, full_examples)
            started = time.perf_counter()
            result = run_search(config, overwrite=True, show_progress=False, write_model=False)
            trials = read_trials(result.run_dir / "trials.jsonl")
            strata = result.run_dir / STRATA_RECORD
            spent_first = json.loads(strata.read_text())["examples_evaluated"] if strata.exists() else 0
            winner = max(w["mean_score"] for w in result.final_scores["winners"])
            runs[variant].append({
                "seed": seed,
                "seconds": time.perf_counter() - started,
                "trials": len(trials),
                "curve": curve(trials, block["max_budget"], spent_first),
                "winner_full": winner,
                "rank_correlation": low_high_correlation(trials),
            })
            print(f"{variant} seed {seed}: {len(trials)} trials, winner {winner:.3f} (full budget), "
                  f"{runs[variant][-1]['seconds']:.0f} s, low/high rank correlation "
                  f"{runs[variant][-1]['rank_correlation']}", flush=True)

    levels = [total * f for f in (0.1, 0.2, 1 / 3, 0.5, 0.75, 1.0)]
    print(f"\nbest score at the highest budget, mean over seeds {args.seeds}, by compute (examples; one full "
          f"evaluation = {full_examples}):")
    width = max(12, *(len(v) + 2 for v in runs))
    print("variant ".ljust(width) + "".join(f"{int(c):>10}" for c in levels))
    means = {}
    for variant, items in runs.items():
        row = []
        for c in levels:
            values = [best_at(r["curve"], c) for r in items]
            values = [v for v in values if v is not None]
            row.append(statistics.fmean(values) if values else None)
        means[variant] = row
        print(variant.ljust(width) + "".join(f"{v:10.3f}" if v is not None else f"{'-':>10}" for v in row))
    print(f"\nreference points (zoo report, seed 0): best expert {best_expert:.3f}, best uniform TA {uniform.mean:.3f}"
          f" ({uniform.label}), best TIES {ties.mean:.3f} ({ties.label})")
    for variant, items in runs.items():
        winners = [r["winner_full"] for r in items]
        correlations = [r["rank_correlation"] for r in items if r["rank_correlation"] is not None]
        print(f"{variant}: winner (full budget) mean {statistics.fmean(winners):.3f}, min {min(winners):.3f}; "
              f"lead over best expert {100 * (statistics.fmean(winners) - best_expert):+.1f} points; "
              f"beats uniform TA in {sum(w > uniform.mean for w in winners)}/{len(winners)}, TIES in "
              f"{sum(w > ties.mean for w in winners)}/{len(winners)}"
              + (f"; low/high budget rank correlation mean {statistics.fmean(correlations):.2f} "
                 f"(per seed {', '.join(f'{c:.2f}' for c in correlations)})" if correlations else ""))

    judged = args.variants[0]
    items = runs[judged]
    winners = [r["winner_full"] for r in items]
    gains = [100 * (w - best_expert) for w in winners]
    print(f"\ngoals for {judged} (issue 15), over seeds {args.seeds}:")
    print(f"S1 winner - best expert: mean {statistics.fmean(gains):+.1f} points (goal >= +8), min {min(gains):+.1f} "
          f"(goal >= +5 on every seed): {'met' if statistics.fmean(gains) >= 8 and min(gains) >= 5 else 'NOT met'}")
    over_ta = 100 * (statistics.fmean(winners) - uniform.mean)
    print(f"S2 winner - tuned-lambda uniform TA ({uniform.label}): {over_ta:+.1f} points (goal >= +3): "
          f"{'met' if over_ta >= 3 else 'NOT met'}")
    # The S3: random search's final best with <= 1/3 of its compute on every seed; CMA-ES's with <= 1/2 of
    # its compute, which the issue states without "on every seed", so under its goals' rule (the mean of the seeds).
    # Both readings are printed for CMA-ES.
    for rival, share in (("random", 1 / 3), ("cmaes", 1 / 2)):
        if rival not in runs or rival == judged:
            continue
        shares = []
        for mine, theirs in zip(items, runs[rival]):  # same seed
            target = theirs["curve"][-1][1]
            needed = reach(mine["curve"], target) if target is not None else None
            their_total = theirs["curve"][-1][0]
            shares.append(needed / their_total if needed is not None and their_total else None)
        text = ", ".join(f"{x:.3f}" if x is not None else "never" for x in shares)
        every = all(x is not None and x <= share + 1e-9 for x in shares)
        if rival == "random":
            print(f"S3 compute to reach {rival}'s final best (same seed), as a share of {rival}'s compute: {text} "
                  f"(goal <= {share:.2f} on every seed): {'met' if every else 'NOT met'}")
        else:
            mean = statistics.fmean(shares) if None not in shares else None
            ok = mean is not None and mean <= share + 1e-9
            print(f"S3 compute to reach {rival}'s final best (same seed), as a share of {rival}'s compute: {text}; "
                  f"mean {'never' if mean is None else f'{mean:.3f}'} (goal <= {share:.2f}, the mean of the seeds): "
                  f"{'met' if ok else 'NOT met'}; <= {share:.2f} on every seed: {'met' if every else 'NOT met'}")
        # Context, not the goal: near the zoo's ceiling (0.9987) one example of 768 decides "reached".
        near = [reach(mine["curve"], theirs["curve"][-1][1] - 0.005) for mine, theirs in zip(items, runs[rival])]
        print("   within 0.5 points of it: "
              + ", ".join(f"{n / theirs['curve'][-1][0]:.3f}" if n is not None else "never"
                          for n, theirs in zip(near, runs[rival])))
    correlations = [r["rank_correlation"] for r in items if r["rank_correlation"] is not None]
    if correlations:
        mean = statistics.fmean(correlations)
        print(f"S4 low/high budget rank correlation at the lowest budget: mean {mean:.2f} (goal >= 0.6): "
              f"{'met' if mean >= 0.6 else 'NOT met'}")
    (args.out / "summary.json").write_text(json.dumps({"runs": runs, "levels": levels, "means": means}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, row in means.items():
        ax.plot(levels, [v if v is not None else float("nan") for v in row], "o-", label=variant)
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
