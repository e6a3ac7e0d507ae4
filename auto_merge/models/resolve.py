"""Model references → local folders, offline only.

A reference is, tried in this order: a key of the alias map (its target is itself a reference, so aliases may chain);
`zoo:NAME` (the demo zoo); an existing local folder; a Hugging Face hub id already in the local cache. Nothing is
ever downloaded: a hub id that is not cached is an error that suggests `global_params.model_aliases`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from auto_merge.errors import AutoMergeError
from auto_merge.models.gguf import is_gguf_reference

ZOO_PREFIX = "zoo:"


class ModelResolutionError(AutoMergeError, ValueError):
    """A model reference that cannot be turned into a local folder."""


def resolve_model_ref(
    ref: str,
    *,
    aliases: Mapping[str, str] | None = None,
    zoo_seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    build_zoo: bool = True,
    search_dirs: Sequence[str | os.PathLike] = (),
) -> Path:
    """Local folder of the model `ref` names.

    `search_dirs`: folders that relative local paths are tried against, in order (e.g. the config's folder);
    the working directory is always tried last. `cache_dir` is the project cache for the zoo and the Hugging Face
    cache root (its `hub/` subfolder, or itself) for hub ids; None = the defaults."""
    aliases = aliases or {}
    chain: list[str] = []
    current = ref
    while current in aliases:
        if current in chain:
            raise ModelResolutionError(f"alias cycle: {' -> '.join(chain + [current])}")
        chain.append(current)
        current = aliases[current]
    via = f" (via alias {' -> '.join(chain + [current])})" if chain else ""

    if current.startswith(ZOO_PREFIX):
        return _resolve_zoo(current[len(ZOO_PREFIX):], zoo_seed=zoo_seed, cache_dir=cache_dir, build=build_zoo,
                            via=via)
    if is_gguf_reference(current):
        return _resolve_gguf(current, search_dirs, cache_dir, via)
    local = _find_local_folder(current, search_dirs)
    if local is not None:
        return local
    if Path(current).expanduser().is_file():
        raise ModelResolutionError(f"model {current!r}{via} is a file; give the model's folder (with config.json "
                                   f"and the weights)")
    cached = _find_in_hub_cache(current, cache_dir)
    if cached is not None:
        return cached
    raise ModelResolutionError(
        f"model {current!r}{via} is not available offline: not a local folder and not in the local Hugging Face "
        f"cache; map it to a local folder with global_params.model_aliases")


def _resolve_zoo(name: str, *, zoo_seed: int, cache_dir, build: bool, via: str) -> Path:
    from auto_merge.zoo import ZOO_MODEL_NAMES, zoo_model_path  # lazy: building the zoo pulls in torch

    if name not in ZOO_MODEL_NAMES:
        raise ModelResolutionError(f"unknown zoo model {name!r}{via}; zoo models: {', '.join(ZOO_MODEL_NAMES)}")
    try:
        path = Path(zoo_model_path(name, seed=zoo_seed, cache_dir=cache_dir or None, build=build))
    except (ValueError, OSError) as error:
        raise ModelResolutionError(f"zoo model {name!r}{via} (seed {zoo_seed}) is not available: {error}") from error
    if not path.is_dir():
        raise ModelResolutionError(f"zoo model {name!r}{via} (seed {zoo_seed}) is not built (expected {path}); "
                                   f"build it with `auto-merge zoo build --seed {zoo_seed}`")
    return path


def _resolve_gguf(ref: str, search_dirs: Sequence[str | os.PathLike], cache_dir, via: str) -> Path:
    from auto_merge.models.gguf import gguf_model_folder

    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [Path(folder) / path for folder in [*search_dirs, Path.cwd()]]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        raise ModelResolutionError(f"model {ref!r}{via}: no such GGUF file (looked in "
                                   f"{', '.join(str(c.parent) for c in candidates)})")
    return gguf_model_folder(found, cache_dir)


def _find_local_folder(ref: str, search_dirs: Sequence[str | os.PathLike]) -> Path | None:
    path = Path(ref).expanduser()
    if path.is_absolute():
        return path.resolve() if path.is_dir() else None
    for folder in [*search_dirs, Path.cwd()]:
        candidate = Path(folder) / path
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _find_in_hub_cache(repo_id: str, cache_dir) -> Path | None:
    """The cached snapshot of `repo_id`, never touching the network (local_files_only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache_candidates: list[Path | None] = [None]
    if cache_dir:
        # The reference pointed HF_HOME at cache_dir, so the hub cache is cache_dir/hub; accept cache_dir itself too.
        cache_candidates = [Path(cache_dir).expanduser() / "hub", Path(cache_dir).expanduser(), None]
    for candidate in cache_candidates:
        try:
            snapshot = snapshot_download(repo_id, cache_dir=candidate, local_files_only=True)
        except (LocalEntryNotFoundError, HFValidationError):
            continue
        return Path(snapshot)
    return None
