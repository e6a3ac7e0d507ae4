"""What a running search shows: one live line with the trials done and the best score so far, where "best" is the
best at the highest budget any trial reached (a low-budget score is an estimate on a few examples)."""

from __future__ import annotations

import math
import sys


def _budget_rank(budget) -> float:
    return math.inf if budget is None else float(budget)


def best_so_far(records: list[dict]) -> tuple[float | None, float | None, float | None] | None:
    """(the highest budget any successful trial reached (None: every example), the best score at that budget, the
    best score at a lower budget when it is higher, else None), or None before any success. A low-budget score is an
    estimate on a few examples: it is never shown as the search's best."""
    scored = [r for r in records if r.get("score") is not None]
    if not scored:
        return None
    top = max((r["budget"] for r in scored), key=_budget_rank)
    best_top = max(r["score"] for r in scored if _budget_rank(r["budget"]) == _budget_rank(top))
    best_lower = max((r["score"] for r in scored if _budget_rank(r["budget"]) < _budget_rank(top)), default=None)
    return top, best_top, best_lower if best_lower is not None and best_lower > best_top else None


def best_text(best: tuple | None) -> str:
    """`best 0.997 @ 256` (and `, 0.999 @ a lower budget` when a lower budget's estimate is higher)."""
    if best is None:
        return ""
    top, best_top, best_lower = best
    text = f"best {best_top:.3f} @ {'all' if top is None else f'{top:g}'}"
    return text + (f", {best_lower:.3f} @ a lower budget" if best_lower is not None else "")


class ProgressLine:
    """One live line: trials done, the current budget, the best score so far (at the highest budget reached) and
    an ETA."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="search", unit="trial", disable=not enabled, dynamic_ncols=True,
                        file=sys.stderr)

    def update(self, done: int, budget, best: tuple | None) -> None:
        self.bar.n = min(done, self.bar.total)
        budget_text = "full" if budget is None else f"{budget:g}"
        self.bar.set_postfix_str(f"budget {budget_text}, {best_text(best)}" if best is not None else
                                 f"budget {budget_text}", refresh=False)
        self.bar.refresh()  # once per trial (in a log file every refresh is a new copy of the line)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
