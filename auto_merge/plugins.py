"""Extensions from installed packages: each entry point of a group is a module that registers what it adds when
imported (a merge method with ``auto_merge.merge.methods.register_method``, a strategy with
``auto_merge.strategies.register_strategy``). A package declares them in its pyproject.toml::

    [project.entry-points."auto_merge.methods"]
    my_method = "my_package.my_method"

See docs/extending.md.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from auto_merge.errors import AutoMergeError

GROUPS = ("auto_merge.methods", "auto_merge.strategies")
_loaded: set[str] = set()


class PluginError(AutoMergeError, ImportError):
    """An installed extension could not be loaded; names the entry point and its package."""


def load_plugins(group: str) -> list[str]:
    """Import every entry point of ``group`` once (later calls do nothing) and return their names."""
    if group not in GROUPS:
        raise ValueError(f"unknown plugin group {group!r}; allowed: {', '.join(GROUPS)}")
    if group in _loaded:
        return []
    _loaded.add(group)
    names = []
    for point in sorted(entry_points(group=group), key=lambda point: point.name):
        package = f" (package {point.dist.name})" if point.dist is not None else ""
        try:
            importlib.import_module(point.value.split(":")[0])
        except Exception as error:  # any failure inside a third-party module: say which one, keep the cause
            raise PluginError(f"entry point {point.name!r} = {point.value!r} of group {group}{package} failed to "
                              f"load: {type(error).__name__}: {error}; fix or uninstall that package") from error
        names.append(point.name)
    return names
