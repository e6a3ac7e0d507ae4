"""Where zoo models live, and the `zoo:NAME` model references that configs use.

The zoo of seed 0 ships with the project (``auto_merge/zoo/shipped/seed0``): every recorded score rests on those
files, so `zoo:NAME` never depends on training done on this machine (training gives other weights on another CPU
or library version). Other seeds are built on first use into the cache by the project's recipe.
"""

from __future__ import annotations

import os
from pathlib import Path

ZOO_MODEL_NAMES = ("base", "num", "col", "wrd", "cap")
ZOO_REF_PREFIX = "zoo:"
SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"
SHIPPED_MANIFEST = "zoo.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The project's cache folder: explicit argument, else $AUTO_MERGE_CACHE, else ~/.cache/auto-merge."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("AUTO_MERGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "auto-merge"


def shipped_zoo_dir(seed: int = 0) -> Path | None:
    """The zoo shipped with the project for ``seed``, or None when none is shipped for it."""
    folder = SHIPPED_ROOT / f"seed{seed}"
    return folder if (folder / SHIPPED_MANIFEST).is_file() else None
