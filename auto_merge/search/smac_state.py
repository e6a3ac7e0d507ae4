"""SMAC's run state on disk, made crash-safe.

After every trial SMAC rewrites ``optimization.json``, ``runhistory.json`` and ``intensifier.json`` in place
(``open(path, "w")`` then ``json.dump``). A process killed during such a write leaves a truncated file, and the rerun
that should resume the search fails to parse it. While :func:`atomic_state_writes` is active, every file SMAC opens
for writing is written beside its target and renamed over it when closed, so each state file on disk is always a
complete version. (SMAC offers no hook for this: the ``open`` that its saving modules call is replaced, in those
modules only, for the duration.)
"""

from __future__ import annotations

import builtins
import contextlib
import os
from pathlib import Path

# The SMAC modules whose save methods write the run state.
SMAC_STATE_WRITERS = ("smac.main.smbo", "smac.runhistory.runhistory", "smac.intensifier.abstract_intensifier",
                      "smac.scenario")
PARTIAL_SUFFIX = ".partial"


class ReplaceOnClose:
    """A text file written at ``path + PARTIAL_SUFFIX`` and renamed to ``path`` when closed without an error."""

    def __init__(self, path, **open_kwargs):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.file = builtins.open(self.partial, "w", **open_kwargs)

    def write(self, text: str) -> int:
        return self.file.write(text)

    def close(self, completed: bool = True) -> None:
        if self.file.closed:
            return
        self.file.close()
        if completed:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> ReplaceOnClose:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(completed=kind is None)


def _open_for_state(file, mode="r", *args, **kwargs):
    if mode == "w" and not args:
        return ReplaceOnClose(file, **kwargs)
    return builtins.open(file, mode, *args, **kwargs)


@contextlib.contextmanager
def atomic_state_writes():
    """Within this block, SMAC's state files are replaced whole or not at all."""
    import importlib

    modules = [importlib.import_module(name) for name in SMAC_STATE_WRITERS]
    patched = [module for module in modules if "open" not in vars(module)]
    for module in patched:
        module.open = _open_for_state
    try:
        yield
    finally:
        for module in patched:
            del module.open
