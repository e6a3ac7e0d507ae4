"""SMAC's ask/tell loop over dask workers, with every worker kept fed.

SMAC's own `optimize()` asks for the next trial only once a worker is free, so each worker idles while the driver
tells SMAC the result it just returned and SMAC picks the next trial (fitting its model, optimising the acquisition).
On short trials that is most of the time. Here each worker also holds `queued_per_worker` trials in its queue: SMAC is
asked for them while the workers run, and a worker that finishes starts its next trial at once.

Nothing else changes: SMAC marks asked trials as running, so its intensifier neither repeats nor loses them; a
successive-halving rung still promotes only once all its trials are told, and new configurations start meanwhile
(SMAC's intensifier fills idle capacity with a new bracket rather than waiting). What differs from the synchronous
loop is only the order in which results arrive, which a search with n_workers > 1 never fixed anyway.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable


def worker_slots(client) -> int:
    """Trials the cluster runs at once: its worker threads (SMAC's own count)."""
    return max(1, sum(client.nthreads().values()))


def optimize_on_workers(smac, client, *, queued_per_worker: int = 1) -> None:
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
    try:
        while True:
            capacity = worker_slots(client) * (1 + queued_per_worker)
            while not exhausted and len(pending) < capacity and optimizer.remaining_trials > 0:
                try:
                    info = smac.ask()
                except StopIteration:
                    exhausted = True
                    break
                # pure=False: two trials of one configuration (another budget or seed) are separate tasks.
                pending[client.submit(runner.run_wrapper, trial_info=info, pure=False)] = info
            if not pending:
                break
            done, _ = wait(list(pending), return_when="FIRST_COMPLETED")
            for future in sorted(done, key=lambda f: _order(pending, f)):
                pending.pop(future)
                info, value = future.result()
                smac.tell(info, value)
    finally:
        for future in pending:
            future.cancel()
    for callback in optimizer._callbacks:
        callback.on_end(optimizer)


def _order(pending: dict, future) -> int:
    """Results that arrive together are told in the order they were asked (keeps the log's order stable)."""
    return list(pending).index(future)


def worker_busy(records: Iterable[dict]) -> dict[str, float]:
    """Per worker (process id), the share of the trials' span (first start to last end, over all workers) during
    which it was running a trial. Uses trials.jsonl's `started_unix`/`ended_unix`; empty when they are missing."""
    spans = defaultdict(list)
    for record in records:
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
