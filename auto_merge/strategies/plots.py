"""Plots of a winning recipe, one kind per strategy family (PNG, drawn without a display; matplotlib is imported
only here, when a run ends): per layer group and parameter family for LFS, per output layer for the depth strategies.
"""

from __future__ import annotations

from pathlib import Path


def recipe_plot(path: Path, recipe: dict, strategy) -> Path:
    """Per layer group: the method, and each expert's weight per parameter family (the winning recipe at a glance)."""
    import matplotlib.pyplot as plt
    import numpy as np

    slices = recipe.get("slices") or []
    families = list(strategy.families)
    models = list(strategy.models)
    grid = np.full((len(models) * len(families), len(slices)), np.nan)
    for g, slice_ in enumerate(slices):
        for source in slice_["sources"]:
            if source["model"] not in models:
                continue
            row0 = models.index(source["model"]) * len(families)
            weight = (source.get("parameters") or {}).get("weight", 1.0)
            for f, family in enumerate(families):
                grid[row0 + f, g] = _family_value(weight, family)
        if slice_.get("merge_method") == "slerp":  # t is the share of the second model of the pair
            t = slice_["parameters"]["t"]
            first = models.index(slice_["base_model"])
            for f, family in enumerate(families):
                grid[first * len(families) + f, g] = 1.0 - _family_value(t, family)
                second = models.index(slice_["sources"][0]["model"])
                grid[second * len(families) + f, g] = _family_value(t, family)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(slices), 1.0 + 0.35 * grid.shape[0]))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(slices)), [f"g{g}\n{s.get('merge_method')}" for g, s in enumerate(slices)], fontsize=8)
    ax.set_yticks(range(grid.shape[0]), [f"{m} · {f}" for m in models for f in families], fontsize=7)
    for (row, col), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(image, ax=ax, label="weight (slerp: share)")
    ax.set_title("winning recipe per layer group")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_plot(path: Path, recipe: dict, strategy) -> Path:
    """Per output layer (depth strategies): which models supply it, from which source layer, and its output scale."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [strategy.base_model] + [m for m in strategy.models if m != strategy.base_model]
    columns = []  # per output layer: ({model: source layer}, method, scale)
    for slice_ in recipe.get("slices") or []:
        sources = slice_["sources"]
        length = sources[0]["layer_range"][1] - sources[0]["layer_range"][0]
        scale = _family_value((slice_.get("parameters") or {}).get("output_scale", 1.0), strategy.scale_filter)
        for k in range(length):
            columns.append(({s["model"]: s["layer_range"][0] + k for s in sources}, slice_.get("merge_method"),
                            scale))
    grid = np.full((len(rows), len(columns)), np.nan)
    fig, ax = plt.subplots(figsize=(2.0 + 0.45 * len(columns), 1.6 + 0.4 * len(rows)))
    for col, (supplied, method, scale) in enumerate(columns):
        for model, layer in supplied.items():
            row = rows.index(model)
            grid[row, col] = scale
            ax.text(col, row, str(layer), ha="center", va="center", fontsize=7, color="white")
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0, float(np.nanmax(grid))))
    ax.set_xticks(range(len(columns)), [f"{i}\n{'TA' if m == 'task_arithmetic' else ''}"
                                        for i, (_, m, _) in enumerate(columns)], fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("output layer (cell: source layer; TA: task arithmetic)", fontsize=8)
    fig.colorbar(image, ax=ax, label="output scale (MLP branch)")
    ax.set_title(f"winning {strategy.name} model: {len(columns)} layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _family_value(setting, family: str) -> float:
    """The value a parameter setting gives one family (filtered entries, the unfiltered one for `rest`)."""
    if isinstance(setting, (int, float)):
        return float(setting)
    fallback = None
    for entry in setting:
        if entry.get("filter") == family:
            return float(entry["value"])
        if entry.get("filter") is None:
            fallback = float(entry["value"])
    return fallback if fallback is not None else float("nan")
