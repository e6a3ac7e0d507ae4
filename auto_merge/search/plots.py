"""Plots of a finished search (PNG, drawn without a display)."""

from __future__ import annotations

from pathlib import Path


def draw_plots(run_dir: Path, records: list[dict], recipe: dict, strategy, final: dict,
               objectives: tuple[str, ...]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    paths = [progress_plot(folder / "progress.png", records, final)]
    winner = strategy.plot_winner(folder, recipe)  # each strategy draws its own recipe (None: no such plot)
    if winner is not None:
        paths.append(winner)
    if objectives:
        paths.append(front_plot(folder / "front.png", records, final, objectives))
    return paths


def progress_plot(path: Path, records: list[dict], final: dict) -> Path:
    """The best score at the highest budget reached so far against evaluation examples spent (the search's cost).
    Trials at lower budgets are drawn apart: their scores are estimates on fewer examples, never the best so far."""
    import matplotlib.pyplot as plt

    from auto_merge.search.progress import best_so_far

    ordered = sorted(records, key=lambda r: r["trial"])
    overall = best_so_far(ordered)
    top = overall[0] if overall else None
    spent, curve, at_top, lower = 0, [], [], []
    for index, record in enumerate(ordered):
        spent += sum((record.get("examples") or {}).values())
        best = best_so_far(ordered[: index + 1])
        curve.append((spent, None if best is None else best[1]))
        if record.get("score") is not None:
            (at_top if record["budget"] == top else lower).append((spent, record["score"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step([x for x, _ in curve], [y for _, y in curve], where="post", color="tab:blue",
            label="best so far at the highest budget reached")
    top_label = "all examples" if top is None else f"budget {top:g}"
    ax.scatter([x for x, _ in at_top], [y for _, y in at_top], s=14, c="black", label=f"trials at {top_label}")
    ax.scatter([x for x, _ in lower], [y for _, y in lower], s=8, alpha=0.4, c="gray",
               label="trials at lower budgets (estimates)")
    if final["experts"]:  # none when every expert failed to score
        best_expert = max(s["mean_score"] for s in final["experts"].values())
        ax.axhline(best_expert, color="tab:red", linestyle="--", label=f"best expert (full) {best_expert:.3f}")
    ax.set_xlabel("evaluation examples spent")
    ax.set_ylabel("mean score")
    ax.set_title("search progress")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def front_plot(path: Path, records: list[dict], final: dict, objectives: tuple[str, ...]) -> Path:
    """All evaluated points and the Pareto front, on the first two objectives' scores."""
    import matplotlib.pyplot as plt

    x_task, y_task = objectives[0], objectives[1]
    fig, ax = plt.subplots(figsize=(5, 5))
    seen = [(r["scores"][x_task], r["scores"][y_task]) for r in records if r.get("scores")]
    ax.scatter([p[0] for p in seen], [p[1] for p in seen], s=10, c="gray", alpha=0.5, label="evaluated (any budget)")
    front = sorted((w["scores"][x_task], w["scores"][y_task]) for w in final["winners"])
    ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="tab:blue", label="Pareto front (full budget)")
    for name, entry in final["experts"].items():
        ax.scatter(entry["scores"][x_task], entry["scores"][y_task], marker="x", s=60, label=f"expert {name}")
    ax.set_xlabel(x_task)
    ax.set_ylabel(y_task)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
