"""The child process of a run with a trial walltime limit (:class:`auto_merge.search.timed.TimedTrials`): it holds
the trial runner (models loaded once) and runs the trials the parent sends, answering each with its result or its
error; the parent kills it when a trial overruns. Run as ``python -m auto_merge.search.timed_child READ_FD WRITE_FD``.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback

from auto_merge.search.trial import runner_for


def _child(command_fd: int, result_fd: int) -> None:
    commands = os.fdopen(command_fd, "rb")
    results = os.fdopen(result_fd, "wb")

    def answer(message) -> None:
        pickle.dump(message, results)
        results.flush()

    spec = pickle.load(commands)
    try:
        runner = runner_for(spec)
    except Exception as error:  # reported to the parent, which fails the trial with it
        answer(("error", f"{type(error).__name__}: {error}"))
        return
    answer(("ready", None))
    while True:
        try:
            _, values, budget = pickle.load(commands)
        except EOFError:  # the parent closed the pipe: the run is over
            return
        try:
            answer(("ok", runner.run(values, budget)))
        except Exception as error:  # one trial's failure, reported with its reason; the child stays up
            answer(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}"))


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]))
