"""Per-document evaluation results, kept on disk across trials, processes and restarts.

One SQLite file (standard library, no server). A row is one document's metric values for one candidate:

    (fingerprint, task, context, doc_id) -> metrics (JSON: {"<metric>,<filter>": value, ...})

- `fingerprint` identifies the candidate's weights (given by the search driver).
- `task` is the lm-eval leaf task; `context` is a digest of everything else the values depend on: the task's
  resolved config and documents, the plugin code, lm-eval's version and the model's architecture and dtype
  (computed by the evaluator). Changing a task YAML or its data therefore never serves stale results.
- Writes are one transaction per trial (`BEGIN IMMEDIATE ... COMMIT`): a crash leaves either all of a trial's new
  documents or none. The database runs in WAL mode, so several processes (e.g. 2 dask workers) read while one
  writes; concurrent writers wait for each other (`busy_timeout`). WAL needs a local file system (not NFS).
- Each process opens its own connection, lazily and again after a fork; a pickled cache carries only its path.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    fingerprint TEXT NOT NULL,
    task TEXT NOT NULL,
    context TEXT NOT NULL,
    doc_id INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (fingerprint, task, context, doc_id)
) WITHOUT ROWID
"""


class CacheValueError(TypeError):
    """A per-document metric value that cannot be stored (not JSON-serialisable)."""


def _plain(value: Any) -> Any:
    # numpy scalars (lm-eval's metrics return np.float64) become Python numbers; anything else is refused.
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise CacheValueError(f"cannot store a per-document metric value of type {type(value).__name__}: {value!r}")


def encode_metrics(metrics: Mapping[str, Any]) -> str:
    return json.dumps(metrics, sort_keys=True, default=_plain, allow_nan=True)


def decode_metrics(text: str) -> dict[str, Any]:
    return json.loads(text)


def _is_contention(error: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): another connection holds a lock for now."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(error) or "busy" in str(error)


class ResultCache:
    """Per-document metric values by (candidate fingerprint, task, context, document id)."""

    def __init__(self, path: str | os.PathLike, timeout_s: float = 120.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._connection: sqlite3.Connection | None = None
        self._pid: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            # A connection inherited through fork must not be used: open a fresh one in this process.
            connection = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            connection.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            self._retry_while_contended(lambda: self._set_up(connection))
            self._connection, self._pid = connection, os.getpid()
        return self._connection

    @staticmethod
    def _set_up(connection: sqlite3.Connection) -> None:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute(SCHEMA)

    def _retry_while_contended(self, action: Callable[[], Any]) -> Any:
        # Switching a new database to WAL while another process does the same can fail at once with "database is
        # locked": SQLite skips the busy handler where waiting could deadlock. Retry until the timeout instead.
        deadline = time.monotonic() + self.timeout_s
        delay = 0.005
        while True:
            try:
                return action()
            except sqlite3.OperationalError as error:
                if not _is_contention(error) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(2 * delay, 0.25)

    def get(self, fingerprint: str, task: str, context: str, doc_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The stored values of those documents that are stored (document id → metrics)."""
        wanted = set(doc_ids)
        if not wanted:
            return {}
        rows = self._connect().execute(
            "SELECT doc_id, metrics FROM results WHERE fingerprint = ? AND task = ? AND context = ?",
            (fingerprint, task, context),
        )
        return {doc_id: decode_metrics(text) for doc_id, text in rows if doc_id in wanted}

    def put(self, fingerprint: str, entries: Mapping[tuple[str, str], Mapping[int, Mapping[str, Any]]]) -> int:
        """Store {(task, context): {doc_id: metrics}} in one transaction; returns the number of rows written."""
        now = time.time()
        rows = [(fingerprint, task, context, int(doc_id), encode_metrics(metrics), now)
                for (task, context), documents in entries.items() for doc_id, metrics in documents.items()]
        if not rows:
            return 0
        connection = self._connect()
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)", rows)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return len(rows)

    def spans(self, keys: Iterable[tuple[str, str]]) -> dict[str, tuple[int, float, float]]:
        """Per fingerprint with rows under any of the (task, context) `keys`: how many, and when the first and the
        last of them were written."""
        spans: dict[str, list] = {}
        connection = self._connect()
        for task, context in keys:
            rows = connection.execute("SELECT fingerprint, COUNT(*), MIN(created), MAX(created) FROM results "
                                      "WHERE task = ? AND context = ? GROUP BY fingerprint", (task, context))
            for fingerprint, count, first, last in rows:
                span = spans.setdefault(fingerprint, [0, first, last])
                span[0] += count
                span[1], span[2] = min(span[1], first), max(span[2], last)
        return {fingerprint: tuple(span) for fingerprint, span in spans.items()}

    def count(self, fingerprint: str | None = None) -> int:
        if fingerprint is None:
            return self._connect().execute("SELECT COUNT(*) FROM results").fetchone()[0]
        return self._connect().execute("SELECT COUNT(*) FROM results WHERE fingerprint = ?",
                                       (fingerprint,)).fetchone()[0]

    def close(self) -> None:
        if self._connection is not None and self._pid == os.getpid():
            self._connection.close()
        self._connection = None

    def __getstate__(self):
        return {"path": self.path, "timeout_s": self.timeout_s}

    def __setstate__(self, state):
        self.path, self.timeout_s = state["path"], state["timeout_s"]
        self._connection, self._pid = None, None

    def __enter__(self) -> "ResultCache":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def round_trip(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Values exactly as the cache would return them, so fresh and cached results score identically."""
    return decode_metrics(encode_metrics(metrics))
