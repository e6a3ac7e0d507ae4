"""SMAC's ask/tell loop over dask workers, with every worker kept fed.

SMAC's own `optimize()` asks for the next trial only once a worker is free, so each worker idles while the driver
tells SMAC the result it just returned and SMAC picks the next trial (fitting its model, optimising the acquisition).
On short trials that is much of the time: on the demo zoo a trial takes ~0.4 s and SMAC's step every few
configurations ~1 s (it was 2-3 s before the driver bounded the forest's leaves, `driver._surrogate`). Here each
worker also holds queued trials: SMAC is asked for them while the workers run, and a worker that finishes starts its
next trial at once. `queued_per_worker` is `auto` by default: the queue covers SMAC's slowest recent step with the
recent trials' typical length (1 for trials of minutes, up to 16 for trials of a fraction of a second). A deep queue
has a price: each queued new configuration opens successive-halving brackets early, so a run of fixed n_trials may
complete fewer of them (bench/results/parallel_workers.txt, demo zoo, 2 workers: 3-4 trials at max_budget with
`auto`, 5 with none queued; workers busy 93-95 % with `auto`, 72-78 % with none queued).

SMAC's own state files are saved every SAVE_EVERY_SECONDS and at the end rather than after every result (a resume
replays trials.jsonl). Nothing else changes: SMAC marks asked trials as running, so its intensifier neither repeats
nor loses them; a successive-halving rung still promotes only once all its trials are told, and new configurations
start meanwhile (SMAC's intensifier fills idle capacity with a new bracket rather than waiting). What differs from the
synchronous loop is the order in which results arrive (which a search with n_workers > 1 never fixed anyway) and that
a queued trial was chosen before the results of the trials ahead of it were known.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict, deque
from typing import Iterable

MAX_QUEUED = 16  # per worker, for `auto`: beyond this, queued trials know too little of the results ahead of them
START_QUEUED = 1  # for `auto`, until a turn and a trial have been timed: deepen only once the need is measured
HEADROOM = 1.5  # a worker's queue covers 1.5 slow turns: results wait in it untold while SMAC works
# `auto` looks at the slowest of the recent turns (SMAC refits its model every few configurations: a window that
# spans several refits) and at the median of the recent trials.
_TURNS, _TRIALS = 64, 16
# SMAC rewrites its whole run history as JSON on every tell: O(trials) per result, ~0.1 s per tell after 60 trials
# here. A resume rests on trials.jsonl, not on that state, so the loop saves it at most this often (and at the end).
SAVE_EVERY_SECONDS = 10.0


class QueueDepth:
    """Trials each worker holds queued beyond the one it runs: a fixed number, or (`auto`) enough to cover the
    driver's slowest recent turn (telling SMAC the results that came in, logging them, asking for the next trials)
    HEADROOM times over with the recent trials' median length, between 1 and MAX_QUEUED."""

    def __init__(self, setting: int | str):
        self.fixed = None if setting == "auto" else int(setting)
        self.turns: deque[float] = deque(maxlen=_TURNS)
        self.trials: deque[float] = deque(maxlen=_TRIALS)

    @property
    def value(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self.turns or not self.trials:
            return START_QUEUED
        typical = max(statistics.median(self.trials), 1e-3)
        return max(1, min(MAX_QUEUED, math.ceil(HEADROOM * max(self.turns) / typical)))


def worker_slots(client) -> int:
    """Trials the cluster runs at once: its worker threads (SMAC's own count)."""
    return max(1, sum(client.nthreads().values()))


def optimize_on_workers(smac, client, *, queued_per_worker: int | str = "auto") -> None:
    """Run `smac` (a facade built without a dask client) to the end of its trial budget on `client`'s workers.

    Results are told in the order they finish; a trial that raises is told as crashed by SMAC's runner wrapper, like
    any failing trial. Stops when SMAC's trial budget is spent or its intensifier has nothing left to suggest."""
    from dask.distributed import wait

    optimizer = smac.optimizer
    runner = smac._runner  # SMAC's TargetFunctionRunner: its run_wrapper times the trial and catches its errors
    for callback in optimizer._callbacks:
        callback.on_start(optimizer)
    pending: dict = {}
    exhausted = False
    depth = QueueDepth(queued_per_worker)
    turn_started = last_save = time.perf_counter()
    try:
        while True:
            capacity = worker_slots(client) * (1 + depth.value)
            # A callback that returns False (BudgetCap) stops new trials, as in SMAC's own loop; running ones finish.
            while not exhausted and len(pending) < capacity and optimizer.remaining_trials > 0 \
                    and not optimizer._stop:
                try:
                    info = smac.ask()
                except StopIteration:
                    exhausted = True
                    break
                # pure=False: two trials of one configuration (another budget or seed) are separate tasks.
                pending[client.submit(runner.run_wrapper, trial_info=info, pure=False)] = info
            if not pending:
                break
            depth.turns.append(time.perf_counter() - turn_started)
            done, _ = wait(list(pending), return_when="FIRST_COMPLETED")
            turn_started = time.perf_counter()
            # Results that arrive together are told in the order they were asked (keeps the log's order stable).
            for future in [f for f in pending if f in done]:
                pending.pop(future)
                info, value = future.result()
                if value.endtime > value.starttime:
                    depth.trials.append(value.endtime - value.starttime)
                smac.tell(info, value, save=False)
            if time.perf_counter() - last_save >= SAVE_EVERY_SECONDS:
                optimizer.save()
                last_save = time.perf_counter()
    finally:
        for future in pending:
            future.cancel()
        optimizer.save()
    for callback in optimizer._callbacks:
        callback.on_end(optimizer)


def worker_busy(records: Iterable[dict]) -> dict[str, float]:
    """Per worker (process id), the share of the trials' span (first start to last end, over all workers) during
    which it was running a trial, over the trials of the run's last start (a resumed run has other workers). Uses
    trials.jsonl's `started_unix`/`ended_unix`; empty when they are missing."""
    records = list(records)
    last_start = records[-1].get("driver_pid") if records else None
    spans = defaultdict(list)
    for record in records:
        if record.get("driver_pid") != last_start:
            continue
        start, end, worker = record.get("started_unix"), record.get("ended_unix"), record.get("worker_pid")
        if start is not None and end is not None and worker is not None and end >= start:
            spans[str(worker)].append((start, end))
    if not spans:
        return {}
    first = min(s for items in spans.values() for s, _ in items)
    last = max(e for items in spans.values() for _, e in items)
    if last <= first:
        return {}
    return {worker: sum(e - s for s, e in items) / (last - first) for worker, items in sorted(spans.items())}
