"""Benchmark: the budgeted evaluator on the demo zoo — time per trial at each budget, the share of it spent outside
the model's forward passes, and what the per-document cache saves over a full Hyperband schedule.

    .venv/bin/python bench/eval_budget.py [--eta 3] [--brackets 4] [--trials 5] [--device cpu] [--out FILE.json]

Candidates are random per-layer-group task-arithmetic merges of the zoo's three experts, written into one live model
in place (as a search does); every trial gets a fresh candidate. The four zoo tasks are scored (zoo_num, zoo_wrd,
zoo_col: generation + exact match; zoo_col_mc: 8-way multiple choice). The largest task sets the reference size
(256 documents on the shipped zoo v3, where every task has 256): the largest budget is a full run of every task.

1. Time per trial at each Hyperband budget (`--trials` fresh candidates each, after one warm-up trial): wall time,
   documents run, time inside the model's forward passes/generation (`_model_call`/`_model_generate`), and the share
   outside them (lm-eval's request building, tokenisation, filters, metrics, the cache). Also the time of a trial
   served entirely from the cache.
2. A full Hyperband schedule (Li et al.: brackets s = s_max..0, successive halving by `eta`, promotions by the
   measured aggregate cost). Each trial runs twice, back to back on the same weights: with the cache, and from
   scratch (as the reference does: every trial re-evaluates all its documents); documents evaluated and time, each
   way, and whether their scores agree.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

ZOO_TASKS = {"zoo_num": "exact_match,none", "zoo_wrd": "exact_match,none", "zoo_col": "exact_match,none",
             "zoo_col_mc": "acc,none"}


def hyperband_brackets(max_budget: float, eta: int, n_brackets: int) -> list[list[tuple[int, float]]]:
    """Per bracket, its rungs as (number of configurations, budget), smallest budget first."""
    s_max = n_brackets - 1
    brackets = []
    for s in range(s_max, -1, -1):
        n = math.ceil((s_max + 1) / (s + 1) * eta ** s)
        brackets.append([(math.floor(n * eta ** -i), max_budget * eta ** (i - s)) for i in range(s + 1)])
    return brackets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--brackets", type=int, default=4, help="Hyperband brackets (min budget = max / eta^(b-1))")
    parser.add_argument("--trials", type=int, default=5, help="fresh candidates timed per budget")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from auto_merge.config.schema import EvaluationSettings
    from auto_merge.evaluation import BudgetedEvaluator, load_checkpoint
    from auto_merge.merge.live import ResidentSources, TensorSpec, materialise_into
    from auto_merge.zoo import zoo_root
    from auto_merge.zoo.report import EXPERTS, N_GROUPS, RANDOM_COEFFICIENT_RANGE, group_of

    root = zoo_root(0)
    model, tokenizer = load_checkpoint(root / "base", device=args.device)
    sources = ResidentSources.from_checkpoints(root / "base", [root / name for name in EXPERTS], device=args.device)
    n_layers = model.config.num_hidden_layers
    rng = random.Random(args.seed)

    def new_candidate() -> None:
        low, high = RANDOM_COEFFICIENT_RANGE
        specs = [TensorSpec("task_arithmetic", {"lambda": 1.0}, tuple({"weight": rng.uniform(low, high)}
                                                                      for _ in EXPERTS)) for _ in range(N_GROUPS)]
        materialise_into(model, sources, lambda name: specs[group_of(name, n_layers)])

    settings = EvaluationSettings.model_validate({
        "tasks": [{"task": task, "metric": metric} for task, metric in ZOO_TASKS.items()],
        "batch_size": args.batch_size, "device": args.device, "include_path": str(root / "tasks")})
    work = Path(tempfile.mkdtemp(prefix="eval_budget_"))
    started = time.perf_counter()
    evaluator = BudgetedEvaluator(settings, model, tokenizer, seed=args.seed, cache_path=work / "cache.sqlite")
    construct_seconds = time.perf_counter() - started
    max_budget = float(max(evaluator.sizes.values()))
    budgets = [rung[1] for rung in hyperband_brackets(max_budget, args.eta, args.brackets)[0]]
    print(f"device {evaluator.live.lm.device}, tasks {evaluator.sizes}, evaluator built in {construct_seconds:.2f} s")

    # ---- 1. time per trial at each budget
    counter = iter(range(10 ** 9))
    new_candidate()
    cold = evaluator.evaluate(f"warm-{next(counter)}", max_budget)
    print(f"first (cold) trial at budget {max_budget:g}: {cold.seconds:.2f} s for {cold.evaluated} documents "
          f"(prompt templates and tokenisation are cached after it)\n")
    rows = []
    for budget in budgets:
        trials = []
        for _ in range(args.trials):
            new_candidate()
            trials.append(evaluator.evaluate(f"t-{next(counter)}", budget))
        seconds = statistics.median(t.seconds for t in trials)
        forward = statistics.median(t.forward_seconds for t in trials)
        outside = statistics.median(t.overhead_seconds for t in trials)
        documents = trials[0].evaluated
        cached = evaluator.evaluate(trials[-1].fingerprint, budget)
        rows.append({"budget": budget, "documents": documents, "examples": trials[0].examples,
                     "seconds": seconds, "forward_seconds": forward, "outside_seconds": outside,
                     "outside_share": outside / seconds, "ms_per_document": 1000 * seconds / documents,
                     "outside_ms_per_document": 1000 * outside / documents,
                     "all_cached_seconds": cached.seconds})
    print(f"{'budget':>7} {'docs':>5} {'trial s':>8} {'forward s':>9} {'outside s':>9} {'outside':>8} "
          f"{'ms/doc':>7} {'outside ms/doc':>14} {'all-cached ms':>13}")
    for row in rows:
        print(f"{row['budget']:7.1f} {row['documents']:5d} {row['seconds']:8.3f} {row['forward_seconds']:9.3f} "
              f"{row['outside_seconds']:9.3f} {row['outside_share']:8.1%} {row['ms_per_document']:7.2f} "
              f"{row['outside_ms_per_document']:14.2f} {1000 * row['all_cached_seconds']:13.1f}")
    print(f"(median of {args.trials} fresh candidates per budget; per-task documents at each budget: "
          + "; ".join(f"{row['budget']:g}: {row['examples']}" for row in rows) + ")\n")

    # ---- 2. a full Hyperband schedule, with the cache
    schedule = hyperband_brackets(max_budget, args.eta, args.brackets)
    with_cache = without_cache = n_trials = mismatches = 0
    seconds = seconds_without_cache = 0.0
    configurations = 0
    for bracket in schedule:
        alive = []
        for _ in range(bracket[0][0]):
            configurations += 1
            alive.append((f"hb-{configurations}", [rng.uniform(*RANDOM_COEFFICIENT_RANGE)
                                                   for _ in range(N_GROUPS * len(EXPERTS))]))
        for rung, (count, budget) in enumerate(bracket):
            results = []
            for fingerprint, coefficients in alive[:count]:
                specs = [TensorSpec("task_arithmetic", {"lambda": 1.0},
                                    tuple({"weight": c} for c in coefficients[g * len(EXPERTS):(g + 1) * len(EXPERTS)]))
                         for g in range(N_GROUPS)]
                materialise_into(model, sources, lambda name: specs[group_of(name, n_layers)])
                scores = evaluator.evaluate(fingerprint, budget)
                # The same trial from scratch, back to back on the same weights (a fingerprint never seen before),
                # so that both timings see the same machine load.
                from_scratch = evaluator.evaluate(f"{fingerprint}/from-scratch-{n_trials}", budget)
                assert from_scratch.cached == 0
                mismatches += from_scratch.scores != scores.scores
                results.append((scores.cost, fingerprint, coefficients))
                with_cache += scores.evaluated
                without_cache += from_scratch.evaluated
                seconds += scores.seconds
                seconds_without_cache += from_scratch.seconds
                n_trials += 1
            results.sort()
            keep = bracket[rung + 1][0] if rung + 1 < len(bracket) else 0
            alive = [(fingerprint, coefficients) for _, fingerprint, coefficients in results[:keep]]
    print(f"Hyperband (eta {args.eta}, budgets {', '.join(f'{b:g}' for b in budgets)}; {len(schedule)} brackets, "
          f"{configurations} configurations, {n_trials} trials):")
    print(f"  documents evaluated without the cache: {without_cache}")
    print(f"  documents evaluated with the cache:    {with_cache}  (saves {1 - with_cache / without_cache:.1%})")
    print(f"  evaluation time with the cache: {seconds:.1f} s; without it: {seconds_without_cache:.1f} s "
          f"(saves {1 - seconds / seconds_without_cache:.1%})")
    print(f"  trials whose scores differ between the cached and the from-scratch run: {mismatches} of {n_trials} "
          f"(documents are batched differently; on a CPU the results should not differ)")

    figures = {"device": str(evaluator.live.lm.device), "sizes": evaluator.sizes, "construct_seconds": construct_seconds,
               "cold_trial_seconds": cold.seconds, "per_budget": rows,
               "hyperband": {"eta": args.eta, "budgets": budgets, "configurations": configurations,
                             "trials": n_trials, "documents_without_cache": without_cache,
                             "documents_with_cache": with_cache, "seconds_with_cache": seconds,
                             "seconds_without_cache": seconds_without_cache,
                             "score_mismatches": mismatches}}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))
    evaluator.close()


if __name__ == "__main__":
    main()
