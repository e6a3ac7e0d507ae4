"""Scoring at the end of a run (the search's winners, the one-shot merge, the experts and the base), shared by the
search and the one-shot path: one failure (a NaN expert, a task that raises on some documents, a full disk) must
not cost the run, so each scoring is tried on its own and what failed is kept with its reason for final_scores.json
and the summary."""

from __future__ import annotations

from typing import Callable


class FinalScoring:
    def __init__(self):
        self.failed: list[dict] = []

    def score(self, what: str, compute: Callable[[], dict]) -> dict | None:
        """`compute()`'s entry, or None after recording why it failed."""
        try:
            return compute()
        except Exception as error:  # recorded in final_scores.json and printed; the run goes on
            self.failed.append({"what": what, "error": f"{type(error).__name__}: {error}"})
            return None

    def record(self, what: str, error: BaseException) -> None:
        """A later step of the run's end that failed the same way (writing the model, drawing plots)."""
        self.failed.append({"what": what, "error": f"{type(error).__name__}: {error}"})
