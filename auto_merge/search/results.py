"""What a search hands back, and its run-level error: shared by the driver and the outputs it writes (kept apart so
that neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from auto_merge.errors import AutoMergeError


class SearchError(AutoMergeError, RuntimeError):
    """A problem with the run itself (not one trial): printed without a traceback by the CLI."""


@dataclass
class SearchResult:
    run_dir: Path
    best_configs: list[Path]
    best_model: Path | None
    final_scores: dict
    plots: list[Path]
