"""Trials under a wall-clock limit, without reloading the models for every trial.

SMAC enforces ``trial_walltime_limit`` by running each trial in a new process (pynisher), so every trial reloaded
the source models (6.4 s instead of 0.25 s per trial on the zoo) and a limit shorter than the load failed every
trial. Here a trial runs in a long-lived child process that keeps the models loaded (its start is not counted
against the limit); the parent waits at most the limit for the answer, and on a timeout kills the child and starts a
new one for the next trial. The child is a plain subprocess talking pickles over two pipes (not multiprocessing: dask
worker processes are daemonic and may not have multiprocessing children).

The child runs ``python -m auto_merge.search.timed_child READ_FD WRITE_FD``, started by :class:`TimedTrials` only.
"""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import time


class TrialTimeout(RuntimeError):
    """The trial ran past trial_walltime_limit and was stopped."""


class TrialFailed(RuntimeError):
    """The trial raised in the child process; the message is the child's exception."""


class TimedTrials:
    """A child process holding one run's models; :meth:`run` gives each trial at most ``limit`` seconds."""

    def __init__(self, spec, limit: float):
        self.spec = spec
        self.limit = limit
        self.process: subprocess.Popen | None = None
        self._to_child = self._from_child = None

    def _start(self) -> None:
        command_read, command_write = os.pipe()
        result_read, result_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "auto_merge.search.timed_child", str(command_read), str(result_write)],
            pass_fds=(command_read, result_write), stdin=subprocess.DEVNULL)
        os.close(command_read)
        os.close(result_write)
        self._to_child = os.fdopen(command_write, "wb")
        self._from_child = os.fdopen(result_read, "rb")
        self._send(self.spec)
        kind, payload = self._receive(timeout=None)  # loading the models is not part of any trial's time
        if kind != "ready":
            self.close()
            raise TrialFailed(f"the trial process could not load the models: {payload}")

    def _send(self, message) -> None:
        pickle.dump(message, self._to_child)
        self._to_child.flush()

    def _receive(self, timeout: float | None):
        if timeout is not None:
            ready, _, _ = select.select([self._from_child], [], [], timeout)
            if not ready:
                return "timeout", None
        try:
            return pickle.load(self._from_child)
        except EOFError:
            code = self.process.wait()
            return "error", f"the trial process ended unexpectedly (exit code {code})"

    def run(self, values: dict, budget: float | None):
        if self.process is None or self.process.poll() is not None:
            self._start()
        started = time.perf_counter()
        self._send(("run", values, budget))
        kind, payload = self._receive(timeout=self.limit)
        if kind == "timeout":
            self.close()  # the next trial gets a fresh process
            raise TrialTimeout(f"timeout: stopped after trial_walltime_limit ({self.limit:g} s); the models stay "
                               f"loaded for the next trial in a new process")
        if kind == "error":
            if self.process is not None and self.process.poll() is not None:
                self.close()
            message, _, child_traceback = payload.partition("\n")
            error = TrialFailed(message)
            if child_traceback:
                error.add_note(f"in the trial process:\n{child_traceback}")
            raise error
        cost, info = payload
        info["walltime_seconds"] = round(time.perf_counter() - started, 4)
        return cost, info

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process = None
        for stream in (self._to_child, self._from_child):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass  # the child is gone; its end of the pipe with it
        self._to_child = self._from_child = None


_TIMED: dict[str, TimedTrials] = {}


def timed_trials_for(spec, limit: float) -> TimedTrials:
    """This process's timed child for ``spec`` (one per run, like :func:`auto_merge.search.trial.runner_for`)."""
    timed = _TIMED.get(spec.run_id)
    if timed is None:
        for stale in list(_TIMED):
            _TIMED.pop(stale).close()
        timed = _TIMED[spec.run_id] = TimedTrials(spec, limit)
    return timed


def close_all() -> None:
    for key in list(_TIMED):
        _TIMED.pop(key).close()
