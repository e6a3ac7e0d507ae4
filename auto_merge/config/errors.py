"""The single error type for invalid experiment configs, and where in which file a key was written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from auto_merge.errors import AutoMergeError

# A key path into the merged (includes inlined) config document: mapping keys and list indices.
KeyPath = tuple[str | int, ...]


def format_key_path(key_path: Sequence[str | int]) -> str:
    """`('strategies', 'normal_slices', 'slices', 0, 'sources')` → `strategies.normal_slices.slices[0].sources`."""
    text = ""
    for part in key_path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            part = str(part) if str(part).isascii() else ascii(str(part))  # look-alike characters made visible
            text += f".{part}" if text else part
    return text or "(top level)"


def display_path(path: Path) -> str:
    """A path relative to the working directory when it lies below it (shorter messages), else absolute."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if relative.startswith("..") else relative


@dataclass(frozen=True)
class Location:
    """Where something was written: a file and, when known, a 1-based line."""

    file: Path
    line: int | None = None

    def __str__(self) -> str:
        shown = display_path(self.file)
        return f"{shown}:{self.line}" if self.line is not None else shown


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: where, which key, what is wrong, and what would be accepted."""

    location: Location
    key_path: KeyPath | None
    message: str
    allowed: str | None = None

    def __str__(self) -> str:
        text = str(self.location)
        if self.key_path is not None:
            text += f": {format_key_path(self.key_path)}"
        text += f": {self.message}"
        if self.allowed:
            text += f"; allowed: {self.allowed}"
        return text


class ConfigError(AutoMergeError, ValueError):
    """An experiment config cannot be used. The message lists every problem found, one per line, each naming
    the file (the `!include`d file when the key lives there), the line, the key path, what is wrong and what is
    allowed."""

    def __init__(self, problems: Iterable[ConfigProblem], *, config_file: Path | None = None):
        self.problems: list[ConfigProblem] = list(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        self.config_file = config_file
        self.key_path = tuple(self.problems[0].key_path or ()) if len(self.problems) == 1 else ()
        if len(self.problems) == 1:
            message = str(self.problems[0])
        else:
            header = f"{len(self.problems)} problems in experiment config"
            if config_file is not None:
                header += f" {display_path(config_file)}"
            message = header + ":\n" + "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(message)

    @classmethod
    def single(
        cls,
        file: Path,
        message: str,
        *,
        line: int | None = None,
        key_path: KeyPath | None = None,
        allowed: str | None = None,
    ) -> "ConfigError":
        return cls([ConfigProblem(Location(Path(file), line), key_path, message, allowed)], config_file=Path(file))


@dataclass
class SourceMap:
    """Key path → where the key was written, and → where its value's text starts (another file for `!include`)."""

    root_file: Path
    key_locations: dict[KeyPath, Location] = field(default_factory=dict)
    value_locations: dict[KeyPath, Location] = field(default_factory=dict)

    def locate(self, key_path: KeyPath, *, about_key: bool = False) -> Location:
        """Best location for a problem at `key_path`.

        An existing key → the line where it is written, except when its value was `!include`d and the problem is
        about the value (not `about_key`, such as an unknown key name): then the included file, since that is where
        the value must be fixed. A missing key → the mapping that should contain it (the nearest existing
        ancestor's value, which may be an included file)."""
        key_path = tuple(key_path)
        if key_path in self.key_locations:
            key_location = self.key_locations[key_path]
            value_location = self.value_locations.get(key_path)
            if not about_key and value_location is not None and value_location.file != key_location.file:
                return value_location
            return key_location
        for length in range(len(key_path), -1, -1):
            ancestor_value = self.value_locations.get(key_path[:length])
            if ancestor_value is not None:
                return ancestor_value
        return Location(self.root_file)
