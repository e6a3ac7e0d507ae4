"""Where zoo models live, and the `zoo:NAME` model references that configs use."""

from __future__ import annotations

import os
from pathlib import Path

ZOO_MODEL_NAMES = ("base", "num", "rev", "col")
ZOO_REF_PREFIX = "zoo:"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The project's cache folder: explicit argument, else $AUTO_MERGE_CACHE, else ~/.cache/auto-merge."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("AUTO_MERGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "auto-merge"


def zoo_root(seed: int = 0, cache_dir: str | os.PathLike | None = None, build: bool = True) -> Path:
    """Folder holding one built zoo (one subfolder per model); built first when missing or stale."""
    from auto_merge.zoo.build import ensure_zoo

    return ensure_zoo(seed=seed, cache_dir=cache_dir, build=build)


def zoo_model_path(name: str, seed: int = 0, cache_dir: str | os.PathLike | None = None, build: bool = True) -> Path:
    """Path of one zoo model (`base`, `num`, `rev` or `col`), building the zoo on first use."""
    if name not in ZOO_MODEL_NAMES:
        raise ValueError(f"unknown zoo model {name!r}; allowed: {', '.join(ZOO_MODEL_NAMES)}")
    return zoo_root(seed=seed, cache_dir=cache_dir, build=build) / name
