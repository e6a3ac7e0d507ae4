"""Task folders (lm-eval `include_path`s): what they define, what they may not, and how their files are found.

A task folder holds lm-eval task YAMLs, their local data and, optionally, Python files. This module makes such a
folder behave the same from any working directory and refuses the silent surprises lm-eval allows:

- **Names.** Every task, group and tag a folder defines is indexed; the same name defined twice (in one folder or
  across folders) or a name that is also one of lm-eval's built-in tasks, groups or tags is an error that names both
  files (lm-eval itself lets the later definition shadow the earlier one with at most a log line). The built-in
  names are indexed once per lm-eval version and kept on disk (indexing ~15k YAMLs takes 5-20 s).
- **Python files.** Every `*.py` file in a folder is imported once, before any task is built, through lm-eval's own
  module loader (so `!function file.name` in a YAML reuses the same module). That is where custom filters and metrics
  register themselves (`lm_eval.api.registry.register_filter` / `register_metric`); YAMLs may then name them.
- **Relative data paths.** `dataset_kwargs.data_files` / `data_file` / `data_dir` written as relative paths, and a
  `dataset_path` naming a folder next to the YAML, resolve against the YAML's folder, not the working directory
  (lm-eval resolves them against the working directory). Paths in a config's task overrides resolve against the
  config file's folder.
- **Code execution.** Tasks marked `unsafe_code: true` (MBPP, HumanEval: they execute model-written code) are
  refused unless the caller opts in explicitly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_merge.errors import AutoMergeError

DATA_PATH_KEYS = ("data_files", "data_file", "data_dir")
BUILTIN_INDEX_FORMAT = 1
_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}

log = logging.getLogger(__name__)


class TaskConfigError(AutoMergeError, ValueError):
    """A problem with the evaluation tasks, reported before any model is run."""


class TaskNotFoundError(TaskConfigError):
    pass


class TaskNameCollisionError(TaskConfigError):
    pass


class CodeExecutionNotAllowedError(TaskConfigError):
    pass


@dataclass(frozen=True)
class TaskDefinition:
    """A name defined by a task folder: a task (YAML or Python class), a group, or a tag its tasks carry."""

    name: str
    kind: str  # "task", "group" or "tag"
    source: str  # the YAML file that defines it (for a tag: the first task YAML carrying it)


# ---------------------------------------------------------------------------------------------- folders and names


def resolve_include_paths(paths: Iterable[str | os.PathLike], base_dir: str | os.PathLike | None = None) -> list[Path]:
    """Absolute, existing, de-duplicated folders; relative entries are taken relative to `base_dir` (default: cwd)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    resolved: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"task include path {path} does not exist or is not a folder")
        if path not in resolved:
            resolved.append(path)
    return resolved


def _files(folder: Path, pattern: str) -> list[Path]:
    return sorted((p for p in folder.glob(f"**/{pattern}") if not _IGNORED_DIRS.intersection(p.parts)),
                  key=lambda p: p.as_posix())


def scan_task_folder(folder: Path) -> tuple[list[TaskDefinition], list[str]]:
    """Names defined by the YAMLs under `folder`, and the YAMLs that could not be read (as 'path: reason')."""
    from lm_eval.tasks._yaml_loader import load_yaml

    definitions: list[TaskDefinition] = []
    unreadable: list[str] = []
    for path in _files(folder, "*.yaml"):
        try:
            config = load_yaml(path, resolve_func=False, recursive=True)
        except Exception as err:  # a broken YAML is reported when its task is asked for, as lm-eval skips it
            unreadable.append(f"{path}: {type(err).__name__}: {err}")
            continue
        # The same precedence as lm-eval's index: a Python class task, then a group, then a YAML task.
        if "group" in config and "class" not in config:
            definitions.append(TaskDefinition(str(config["group"]), "group", str(path)))
        elif isinstance(config.get("task"), str):
            definitions.append(TaskDefinition(config["task"], "task", str(path)))
            tags = config.get("tag") or []
            for tag in [tags] if isinstance(tags, str) else tags:
                definitions.append(TaskDefinition(str(tag), "tag", str(path)))
    return definitions, unreadable


def index_task_folders(folders: Iterable[Path]) -> tuple[dict[str, TaskDefinition], list[str]]:
    """Name → definition over all folders; a task or group name defined twice is a TaskNameCollisionError."""
    index: dict[str, TaskDefinition] = {}
    unreadable: list[str] = []
    for folder in folders:
        definitions, bad = scan_task_folder(folder)
        unreadable += bad
        for definition in definitions:
            earlier = index.get(definition.name)
            if earlier is None:
                index[definition.name] = definition
            elif definition.kind == "tag" and earlier.kind == "tag":
                continue  # many tasks carry the same tag: that is what tags are for
            else:
                raise TaskNameCollisionError(
                    f"{definition.kind} name {definition.name!r} is defined twice: in {earlier.source} "
                    f"(as a {earlier.kind}) and in {definition.source}; rename one of them")
    return index, unreadable


def builtin_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def builtin_task_index(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """lm-eval's built-in names → the YAML (relative to lm-eval's task folder) that defines them, or '(tag)'.

    Indexed once per installed lm-eval version and stored under the project cache; rebuilt when missing or
    unreadable. Written atomically, so concurrent processes at worst both build it.
    """
    from importlib.metadata import version

    from auto_merge.zoo.paths import cache_root

    lm_eval_version = version("lm_eval")
    file = cache_root(cache_dir) / "lm_eval_builtin_tasks" / f"{lm_eval_version}.json"
    if file.is_file():
        try:
            stored = json.loads(file.read_text())
            if stored.get("format") == BUILTIN_INDEX_FORMAT and stored.get("lm_eval") == lm_eval_version:
                return stored["names"]
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            log.warning("rebuilding unreadable lm-eval task index %s (%s)", file, err)
    names = _build_builtin_index()
    file.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"format": BUILTIN_INDEX_FORMAT, "lm_eval": lm_eval_version, "names": names})
    with tempfile.NamedTemporaryFile("w", dir=file.parent, suffix=".tmp", delete=False) as handle:
        handle.write(payload)
    os.replace(handle.name, file)
    return names


def _build_builtin_index() -> dict[str, str]:
    from lm_eval.tasks._index import Kind, TaskIndex

    root = builtin_tasks_dir()
    with lm_eval_log_level(logging.ERROR):  # lm-eval's own duplicate names are logged by the dozen
        index = TaskIndex.build([root])
    return {name: (str(entry.yaml_path.relative_to(root)) if entry.kind is not Kind.TAG and entry.yaml_path
                   else "(tag)")
            for name, entry in sorted(index.items())}


def check_builtin_collisions(definitions: Mapping[str, TaskDefinition], builtins: Mapping[str, str]) -> None:
    clashes = [name for name in definitions if name in builtins]
    if clashes:
        lines = [f"  {name!r}: {definitions[name].source} (a {definitions[name].kind}) and lm-eval's built-in "
                 f"{builtin_tasks_dir() / builtins[name] if builtins[name] != '(tag)' else 'tag ' + repr(name)}"
                 for name in clashes]
        raise TaskNameCollisionError(
            "task folder names collide with lm-eval's built-in tasks (lm-eval would silently use one of the two); "
            "rename them:\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------- Python plugins


def import_plugin_modules(folders: Iterable[Path]) -> list[Any]:
    """Import every `*.py` file under the folders once (lm-eval's loader: cached by path and modification time)."""
    from lm_eval.tasks._yaml_loader import _load_module_with_cache

    modules = []
    for folder in folders:
        for file in _files(folder, "*.py"):
            try:
                modules.append(_load_module_with_cache(file.resolve()))
            except Exception as err:
                raise TaskConfigError(f"task plugin {file} failed to import: {type(err).__name__}: {err}") from err
    return modules


def plugin_source_digest(folders: Iterable[Path]) -> str:
    """A digest of every Python file under the folders: cached results depend on the filters and metrics there."""
    import hashlib

    digest = hashlib.sha256()
    for folder in folders:
        for file in _files(folder, "*.py"):
            digest.update(str(file).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- data paths


def _is_local_relative(value: str) -> bool:
    return bool(value) and "://" not in value and not Path(value).expanduser().is_absolute()


def _absolute(value: Any, base_dir: Path) -> Any:
    if isinstance(value, str):
        return str((base_dir / Path(value).expanduser())) if _is_local_relative(value) else value
    if isinstance(value, list):
        return [_absolute(item, base_dir) for item in value]
    if isinstance(value, Mapping):
        return {key: _absolute(item, base_dir) for key, item in value.items()}
    return value


def has_relative_data_paths(config: Mapping[str, Any], base_dir: Path) -> bool:
    return absolutise_data_paths(config, base_dir) != config


def absolutise_data_paths(config: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """A copy of a task config whose local data paths are absolute, relative ones taken against `base_dir`.

    Rewritten: `dataset_kwargs.{data_files,data_file,data_dir}` (a string, a list, or a split → path(s) mapping),
    and `dataset_path` when it names something that exists next to `base_dir` (otherwise it is a hub id or a
    `datasets` builder name such as `json`, and is left alone).
    """
    result = dict(config)
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, Mapping):
        result["dataset_kwargs"] = {key: _absolute(value, base_dir) if key in DATA_PATH_KEYS else value
                                    for key, value in kwargs.items()}
    dataset_path = config.get("dataset_path")
    if isinstance(dataset_path, str) and _is_local_relative(dataset_path) and (base_dir / dataset_path).exists():
        result["dataset_path"] = str((base_dir / dataset_path).resolve())
    return result


# ---------------------------------------------------------------------------------------------- code execution


def check_code_execution(tasks: Mapping[str, Any], allowed: bool) -> list[str]:
    """Names of the tasks that execute model-written code; an error when there are any and it is not allowed."""
    unsafe = sorted(name for name, task in tasks.items() if getattr(task, "UNSAFE_CODE", False))
    if unsafe and not allowed:
        raise CodeExecutionNotAllowedError(
            f"task(s) {', '.join(unsafe)} execute code written by the model (unsafe_code: true); they run only "
            f"when code execution is explicitly allowed (allow_code_execution=True; in a config: "
            f"evaluation.allow_code_execution: true)")
    return unsafe


@contextlib.contextmanager
def lm_eval_log_level(level: int):
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels):
            logger.setLevel(old)
