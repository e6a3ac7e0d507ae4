"""Benchmark: how well a low budget's score ranks candidates as the full budget does, per `evaluation.stratify` option.

    .venv/bin/python bench/low_fidelity.py [--configs 80] [--order-seeds 0 1 2 3 4] [--budgets 28 85]

Samples `--configs` configurations of the demo LFS space (exp_config/config_lfs.yaml; seeded), scores each on every
example once (per-example results), and then, without running the model again, scores each at the given budgets as
each option would select the examples: `none` (a seeded random prefix of each task), `sources` (strata by how the
base and each expert answer, `auto_merge/evaluation/budget.py`) and `irt` (`none`'s prefix, each example weighted by
its discrimination as estimated from the candidates scored before: `irt_scores`) and `neighbours` (`none`'s prefix,
the other examples filled in from the most similar earlier candidate's cached answers: `neighbour_scores`), for each
order seed (the run's random_seed).
Prints the Spearman rank correlation between the low-budget and the full-budget scores over all sampled
configurations and over the best third (by full score: the close calls a late rung decides), mean and range over
the order seeds, and the mean absolute error of the low-budget score.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from search_efficiency import spearman as spearman_or_none  # the benchmarks' one rank correlation

REPO = Path(__file__).resolve().parents[1]


def spearman(xs: list[float], ys: list[float]) -> float:
    value = spearman_or_none(xs, ys)
    return 0.0 if value is None else value  # a constant column counts as no information


# `irt`: the prefix of `none`, each example weighted by its discrimination (the slope of a 2PL item response model,
# whose sufficient statistic for a candidate's ability is the discrimination-weighted sum of its answers), estimated
# as the point-biserial correlation of the example's answers with the rest of the task's score over the candidates
# scored before (as a search would know them), floored at IRT_FLOOR; uniform until HISTORY_WARMUP candidates are known
# and for examples that every earlier candidate answered alike.
HISTORY_WARMUP = 8
IRT_FLOOR = 0.05


def irt_scores(values: list[dict], selection: dict) -> list[float]:
    scores = []
    for index, per_task in enumerate(values):
        task_scores = []
        for task, refs in selection.items():
            answers = [float(per_task[task][ref]) for ref in refs]
            weights = [1.0] * len(refs)
            if index >= HISTORY_WARMUP:
                earlier = [[float(v[task][ref]) for ref in refs] for v in values[:index]]
                totals = [sum(row) for row in earlier]
                for column in range(len(refs)):
                    item = [row[column] for row in earlier]
                    rest = [total - value for total, value in zip(totals, item)]
                    if len(set(item)) > 1 and len(set(rest)) > 1:
                        weights[column] = max(IRT_FLOOR, statistics.correlation(item, rest))
            task_scores.append(sum(w * a for w, a in zip(weights, answers)) / sum(weights))
        scores.append(statistics.fmean(task_scores))
    return scores


def neighbour_scores(values: list[dict], selection: dict, documents: dict) -> list[float]:
    """`neighbours`: the prefix of `none`, and each task's examples outside it filled in with the answers of the
    earlier candidate that agrees most with this one on the prefix (the cached results of the most related
    configuration). Optimistic: here every earlier candidate has every answer, in a search only the promoted ones."""
    scores = []
    for index, per_task in enumerate(values):
        neighbour = None
        if index >= HISTORY_WARMUP:
            agreement = [sum(float(v[task][ref]) == float(per_task[task][ref])
                             for task, refs in selection.items() for ref in refs) for v in values[:index]]
            neighbour = values[max(range(index), key=lambda j: (agreement[j], j))]
        task_scores = []
        for task, refs in selection.items():
            if neighbour is None:
                task_scores.append(statistics.fmean(float(per_task[task][ref]) for ref in refs))
                continue
            chosen = set(refs)
            task_scores.append(statistics.fmean(float((per_task if ref in chosen else neighbour)[task][ref])
                                                for ref in documents[task]))
        scores.append(statistics.fmean(task_scores))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=80)
    parser.add_argument("--order-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budgets", type=float, nargs="+", default=[28.444444444444443, 85.33333333333333])
    args = parser.parse_args()

    from auto_merge.config import load_experiment
    from auto_merge.evaluation.budget import NestedSubsets
    from auto_merge.search.trial import TrialRunner, TrialSpec, recipe_fingerprint
    from auto_merge.strategies import build_strategy

    config = load_experiment(REPO / "exp_config" / "config_lfs.yaml")
    strategy = build_strategy(config)
    space = strategy.build_space(seed=0)
    with tempfile.TemporaryDirectory() as work:
        spec = TrialSpec(run_id="low-fidelity", strategy=strategy.describe(),
                         model_paths={ref: str(path) for ref, path in config.model_paths.items()},
                         evaluation=config.global_params.evaluation, config_dir=str(REPO / "exp_config"),
                         cache_path=str(Path(work) / "cache.sqlite"), seed=0)
        runner = TrialRunner(spec)
        strata, _ = runner.source_strata()
        evaluator = runner.evaluator
        rule = evaluator.subsets.rule
        documents = evaluator.subsets.order
        values = []
        for configuration in space.sample_configuration(args.configs):
            recipe = strategy.decode(dict(configuration))
            runner.merger.apply(recipe, seed=0)
            per_task, _ = evaluator.document_values(recipe_fingerprint(recipe, 0))
            values.append(per_task)
        runner.close()

    def score(per_task, selection) -> float:
        return statistics.fmean(statistics.fmean(float(per_task[task][ref]) for ref in refs)
                                for task, refs in selection.items())

    full = [score(v, documents) for v in values]
    top = sorted(range(len(values)), key=lambda i: full[i], reverse=True)[: max(3, len(values) // 3)]
    print(f"{len(values)} configurations of the demo LFS space; full-budget score mean {statistics.fmean(full):.3f}, "
          f"range {min(full):.3f}-{max(full):.3f}; best third {min(full[i] for i in top):.3f}-{max(full):.3f}")
    print("option      budget   rank corr. (all): mean [min, max]   rank corr. (best third): mean [min, max]   "
          "mean |low - full|")
    for option in ("none", "sources", "irt", "neighbours"):
        for budget in args.budgets:
            all_corr, top_corr, errors = [], [], []
            for seed in args.order_seeds:
                subsets = NestedSubsets(documents, seed, rule, strata if option == "sources" else None)
                selection = subsets.select(budget)
                if option == "irt":
                    low = irt_scores(values, selection)
                elif option == "neighbours":
                    low = neighbour_scores(values, selection, documents)
                else:
                    low = [score(v, selection) for v in values]
                all_corr.append(spearman(low, full))
                top_corr.append(spearman([low[i] for i in top], [full[i] for i in top]))
                errors.append(statistics.fmean(abs(a - b) for a, b in zip(low, full)))
            print(f"{option:10} {budget:7.1f}   {statistics.fmean(all_corr):.2f} [{min(all_corr):.2f}, "
                  f"{max(all_corr):.2f}]{'':18}{statistics.fmean(top_corr):.2f} [{min(top_corr):.2f}, "
                  f"{max(top_corr):.2f}]{'':24}{statistics.fmean(errors):.3f}", flush=True)


if __name__ == "__main__":
    main()
