"""Where a zoo's models are: the shipped zoo for its seed, else one built into the cache (on first use)."""

from __future__ import annotations

import os
from pathlib import Path

from auto_merge.zoo.paths import ZOO_MODEL_NAMES, shipped_zoo_dir


def zoo_root(seed: int = 0, cache_dir: str | os.PathLike | None = None, build: bool = True) -> Path:
    """Folder holding one zoo (one subfolder per model): the shipped one, else one built in the cache (built first
    when missing or stale, unless ``build`` is False)."""
    shipped = shipped_zoo_dir(seed)
    if shipped is not None:
        return shipped
    from auto_merge.zoo.build import ensure_zoo  # lazy: building pulls in torch

    return ensure_zoo(seed=seed, cache_dir=cache_dir, build=build)


def zoo_model_path(name: str, seed: int = 0, cache_dir: str | os.PathLike | None = None, build: bool = True) -> Path:
    """Path of one zoo model (`base`, `num`, `col`, `wrd` or `cap`): shipped for seed 0, else built on first use."""
    if name not in ZOO_MODEL_NAMES:
        raise ValueError(f"unknown zoo model {name!r}; allowed: {', '.join(ZOO_MODEL_NAMES)}")
    return zoo_root(seed=seed, cache_dir=cache_dir, build=build) / name
