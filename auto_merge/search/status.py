"""`auto-merge status RUN_DIR`: where a search stands, running or finished, read from its run folder alone (never
locked or written: a running search is not disturbed)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from auto_merge.errors import AutoMergeError


class StatusError(AutoMergeError):
    """The folder is not a search's run folder."""


def run_status(run_dir: str | Path) -> str:
    from auto_merge.output_dirs import run_folder_busy
    from auto_merge.search.baselines import compute_spent
    from auto_merge.search.outputs import final_table, read_trials
    from auto_merge.search.parallel import worker_busy
    from auto_merge.search.progress import best_so_far, best_text

    run_dir = Path(run_dir)
    manifest = run_dir / "run.json"
    if not manifest.is_file():
        raise StatusError(f"{run_dir} is not a run folder (it has no run.json); allowed: a search's run folder, "
                          f"<output_path>/<run name>, e.g. runs/lfs")
    run = json.loads(manifest.read_text())
    trials = read_trials(run_dir / "trials.jsonl") if (run_dir / "trials.jsonl").is_file() else []
    final_path = run_dir / "final_scores.json"
    if run_folder_busy(run_dir):
        state = "running"
    elif final_path.is_file():
        state = "finished"
    else:
        state = "stopped before the end (rerun the same command to resume)"
    strategy = (run.get("strategy") or {}).get("strategy", "?")
    lines = [f"{run_dir}: {strategy}, {state}", f"config: {run.get('config_file')}", f"started: {run.get('started')}"]
    outcomes = Counter(t["status"] for t in trials)
    done = ", ".join(f"{count} {status}" for status, count in sorted(outcomes.items()))
    lines.append(f"trials: {len(trials)}" + (f" ({done})" if trials else ""))
    if trials:
        budgets = Counter("all" if t["budget"] is None else f"{t['budget']:g}" for t in trials)
        lines.append("budgets: " + ", ".join(f"{budget} ×{count}" for budget, count in budgets.items()))
        best = best_so_far(trials)
        lines.append(best_text(best) if best is not None else "no trial has succeeded yet")
        spent = compute_spent(trials, None)
        lines.append(f"examples evaluated: {spent['examples_evaluated']} (+{spent['examples_from_cache']} from the "
                     f"cache)")
        busy = worker_busy(trials)
        if len(busy) > 1:
            lines.append(f"workers: {len(busy)}, each busy " + " / ".join(f"{100 * share:.0f} %" for share in
                                                                    busy.values()) + " of the trials' span")
        last = trials[-1]
        ago = time.time() - last["finished_unix"] if last.get("finished_unix") else None
        lines.append(f"last trial: #{last['trial']} at {last['finished_at']}"
                     + (f" ({ago:.0f} s ago)" if ago is not None else ""))
    if final_path.is_file():
        final = json.loads(final_path.read_text())
        if final.get("winners"):
            lines += [""] + final_table(final)
        lines += [f"not scored: {f['what']}: {f['error']}" for f in final.get("failed", [])]
    return "\n".join(lines)
