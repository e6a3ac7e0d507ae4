"""What every search's winner is compared with: simple merges a user could make without searching, scored at the
full budget like the winner, and the compute the search spent.

- Uniform task arithmetic, θ = θ_base + λ·Σ τ_i, with λ tuned on a small grid (the merge that most reliably
  gains in large studies of merging);
- TIES at common defaults (density 0.5, λ 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

UNIFORM_TA_LAMBDAS = (0.3, 0.5, 0.7, 1.0)
TIES_DEFAULTS = {"density": 0.5, "lambda": 1.0}


def uniform_task_arithmetic(base_model: str, models: Sequence[str], lam: float) -> dict:
    return {"base_model": base_model, "merge_method": "task_arithmetic", "parameters": {"lambda": lam},
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}


def ties_defaults(base_model: str, models: Sequence[str]) -> dict:
    return {"base_model": base_model, "merge_method": "ties", "parameters": {"lambda": TIES_DEFAULTS["lambda"]},
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": TIES_DEFAULTS["density"]}}
                       for m in models]}


def score_baselines(base_model: str, models: Sequence[str], scored: Callable[[str, dict], dict | None]) -> dict:
    """``scored(what, recipe)`` gives a full-budget entry ({scores, mean_score, ...}) or None when it failed (it
    records why). Returns the entries that could be scored: the best λ of the grid with every λ's mean, and TIES."""
    result = {}
    grid = {}
    for lam in UNIFORM_TA_LAMBDAS:
        entry = scored(f"baseline: uniform task arithmetic λ={lam}", uniform_task_arithmetic(base_model, models, lam))
        if entry is not None:
            grid[lam] = entry
    if grid:
        best = max(grid, key=lambda lam: grid[lam]["mean_score"])
        result["uniform_task_arithmetic"] = {"lambda": best, **grid[best],
                                             "grid": {str(lam): entry["mean_score"] for lam, entry in grid.items()}}
    ties = scored("baseline: TIES", ties_defaults(base_model, models))
    if ties is not None:
        result["ties"] = {**TIES_DEFAULTS, **ties}
    return result


def compute_spent(trials: Sequence[dict], full_evaluation: int | None, stratify_examples: int = 0) -> dict:
    """What the search's trials cost: trials, examples evaluated (cache hits excluded; with `evaluation.stratify:
    sources`, the sources' scoring before the search included) and, given the number of examples of one full
    evaluation, that as full evaluations."""
    evaluated = sum(int(t.get("evaluated_examples") or 0) for t in trials) + stratify_examples
    spent = {"trials": len(trials), "examples_evaluated": evaluated,
             "examples_from_cache": sum(int(t.get("cached_examples") or 0) for t in trials)}
    if stratify_examples:
        spent["stratify_examples"] = stratify_examples
    if full_evaluation:
        spent["full_evaluation_examples"] = full_evaluation
        spent["full_evaluations"] = round(evaluated / full_evaluation, 2)
    return spent


def comparison_lines(final: dict) -> list[str]:
    """The winner against the best expert, the baselines and the compute, as the console summary and the model card
    say it."""
    best = max(w["mean_score"] for w in final["winners"])
    lines = []
    if final.get("experts"):
        label, entry = max(final["experts"].items(), key=lambda item: item[1]["mean_score"])
        lines.append(f"best merge {best:.3f} vs best expert ({label}, {entry['mean_score']:.3f}): "
                     f"{100 * (best - entry['mean_score']):+.1f} points of mean score")
    baselines = final.get("baselines") or {}
    if "uniform_task_arithmetic" in baselines:
        ta = baselines["uniform_task_arithmetic"]
        tried = "/".join(ta["grid"])
        lines.append(f"best merge vs uniform task arithmetic (λ {ta['lambda']}, the best of {tried}; "
                     f"{ta['mean_score']:.3f}): {100 * (best - ta['mean_score']):+.1f} points")
    if "ties" in baselines:
        ties = baselines["ties"]
        lines.append(f"best merge vs TIES (density {ties['density']}, λ {ties['lambda']}; {ties['mean_score']:.3f}): "
                     f"{100 * (best - ties['mean_score']):+.1f} points")
    spent = final.get("compute")
    if spent:
        full = (f" (≈ {spent['full_evaluations']} full evaluations of {spent['full_evaluation_examples']} examples)"
                if "full_evaluations" in spent else "")
        baseline_runs = len(baselines.get("uniform_task_arithmetic", {}).get("grid", {})) + ("ties" in baselines)
        took = f"; the baselines took {baseline_runs} full evaluations" if baseline_runs else ""
        sources = (f" ({spent['stratify_examples']} of them scoring the sources first, evaluation.stratify)"
                   if spent.get("stratify_examples") else "")
        lines.append(f"search compute: {spent['trials']} trials, {spent['examples_evaluated']} examples evaluated"
                     f"{sources}{full}{took}")
    return lines
