"""Scoring models on lm-evaluation-harness tasks, offline and quietly.

`TaskSuite` resolves task names once (the user's task folders, see `plugins.py`, and lm-eval's built-in tasks only
for names those folders do not define), applies per-task config overrides, and loads every task and its data once.
`LiveEvaluator` wraps one live `transformers` model in lm-eval's HFLM once: its weights may be overwritten in place
between calls (as the merge engine does), and each call re-scores it without reloading anything. It scores either
the first N documents (`evaluate`, for one-shot reports) or exactly the given documents, returning per-document
metric values (`evaluate_documents`, used by the budgeted evaluator).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auto_merge.evaluation.plugins import (
    CodeExecutionNotAllowedError,
    TaskConfigError,
    TaskNameCollisionError,
    TaskNotFoundError,
    absolutise_data_paths,
    builtin_task_index,
    builtin_tasks_dir,
    check_builtin_collisions,
    check_code_execution,
    has_relative_data_paths,
    import_plugin_modules,
    index_task_folders,
    resolve_include_paths,
)

if TYPE_CHECKING:
    from auto_merge.evaluation.backends import VllmOptions

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_EVALUATE_OFFLINE": "1"}

__all__ = [
    "CodeExecutionNotAllowedError", "LiveEvaluator", "TaskConfigError", "TaskNameCollisionError",
    "TaskNotFoundError", "TaskSuite", "TaskUnit", "default_include_paths", "evaluate_checkpoint", "format_table",
    "load_checkpoint", "quiet", "resolve_device", "set_offline",
]


@dataclass(frozen=True)
class ChatFormat:
    """How prompts are formatted: lm-eval's chat-template options (off by default, as in lm-eval)."""

    apply_chat_template: bool | str = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False

    @classmethod
    def from_settings(cls, settings) -> "ChatFormat":
        """From an EvaluationSettings."""
        return cls(settings.apply_chat_template, settings.system_instruction, settings.fewshot_as_multiturn)

    def lm_eval_arguments(self) -> dict:
        return {"apply_chat_template": self.apply_chat_template, "system_instruction": self.system_instruction,
                "fewshot_as_multiturn": self.fewshot_as_multiturn}


def default_include_paths() -> list[Path]:
    """The project's own task folder, when running from a checkout."""
    folder = PROJECT_ROOT / "custom_tasks"
    return [folder] if folder.is_dir() else []


def set_offline() -> None:
    """Never reach for a hub: datasets, models and metrics are local.

    An explicit environment setting wins (set HF_HUB_OFFLINE=0 to allow downloads). Libraries read these variables
    when first imported, so the ones already imported are told too.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if os.environ["HF_HUB_OFFLINE"] == "1":
        import sys

        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if os.environ["HF_DATASETS_OFFLINE"] == "1":
        import sys

        if "datasets" in sys.modules:
            sys.modules["datasets"].config.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def quiet():
    """Silence lm-eval's per-call progress bars and chatter; its tqdm ignores TQDM_DISABLE, so capture stderr."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield captured
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def resolve_device(device: str | None) -> str:
    """`None`/`auto`: the first CUDA device when there is one, else the CPU."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cache_prompt_templates() -> None:
    """Compile each of lm-eval's Jinja prompt templates once per process instead of once per document and field.

    lm-eval's `apply_template` calls `Environment.from_string` on every use; in a search that is most of the time
    spent outside the model on small models (4 templates x every document x every trial). The compiled template is
    a pure function of its source, so caching it changes no output.
    """
    from lm_eval import utils

    if getattr(utils.apply_template, "_auto_merge_cached", False):
        return
    compile_template = functools.lru_cache(maxsize=4096)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compile_template(template).render(**doc)

    apply_template._auto_merge_cached = True
    utils.apply_template = apply_template


@dataclass(frozen=True)
class TaskUnit:
    """One configured task name and the lm-eval leaf tasks that score it (one for a plain task, several for a group
    or a tag)."""

    name: str
    kind: str  # "task", "group" or "tag"
    leaves: tuple[str, ...]
    group: Any = None  # the lm-eval Group, for groups

    def weight_by_size(self, metric: str) -> bool:
        """Whether the group score weights each subtask by its number of documents (lm-eval's default) or not."""
        for aggregate in (self.group.aggregate_metric_list or []) if self.group is not None else []:
            if aggregate.metric == metric:
                return bool(aggregate.weight_by_size)
        return True


class TaskSuite:
    """A fixed list of lm-eval tasks, indexed once and loaded once.

    `include_paths`: task folders (default: the project's `custom_tasks/`); relative ones are taken against
    `base_dir` (default: the working directory). `overrides`: per task name, lm-eval task-config keys to replace
    (e.g. `{"mmlu": {"test_split": "validation"}}`); relative data paths in them are taken against `base_dir` too.
    `num_fewshot` applies to every task that has no `num_fewshot` override. Tasks that execute model-written code
    are refused unless `allow_code_execution`.
    """

    def __init__(self, tasks: Sequence[str], include_paths: Sequence[str | os.PathLike] | None = None, *,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None, num_fewshot: int | None = None,
                 allow_code_execution: bool = False, base_dir: str | os.PathLike | None = None):
        set_offline()
        import datasets

        datasets.disable_progress_bars()
        cache_prompt_templates()
        self.tasks = list(tasks)
        self.allow_code_execution = allow_code_execution
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        self.include_paths = resolve_include_paths(
            default_include_paths() if include_paths is None else include_paths, base)
        unknown_overrides = sorted(set(overrides or {}) - set(self.tasks))
        if unknown_overrides:
            raise TaskConfigError(f"overrides for task(s) not in the suite: {', '.join(unknown_overrides)}")
        self.overrides = {name: absolutise_data_paths(dict(values), base) for name, values in (overrides or {}).items()}
        if num_fewshot is not None:
            for name in self.tasks:
                self.overrides.setdefault(name, {}).setdefault("num_fewshot", num_fewshot)

        with quiet():
            import_plugin_modules(self.include_paths)
            definitions, unreadable = index_task_folders(self.include_paths)
            builtins = builtin_task_index()
            check_builtin_collisions(definitions, builtins)
            missing = [name for name in self.tasks if name not in definitions and name not in builtins]
            if missing:
                detail = "".join(f"\n  unreadable task file {line}" for line in unreadable)
                raise TaskNotFoundError(
                    f"unknown task(s) {', '.join(missing)}; not in lm-eval's tasks nor in include paths "
                    f"{', '.join(map(str, self.include_paths)) or '(none)'}{detail}")
            wanted_builtins = {name: builtins[name] for name in self.tasks if name not in definitions}
            self.manager = self._task_manager(wanted_builtins, everything=False)
            try:
                self.task_dict, self.units = self._load(reraise_unknown_names=bool(wanted_builtins))
            except KeyError:
                # A built-in group can reference tasks defined outside its own folder: index all of lm-eval's.
                self.manager = self._task_manager(wanted_builtins, everything=True)
                self.task_dict, self.units = self._load(reraise_unknown_names=False)
        check_code_execution(self.task_dict["tasks"], allow_code_execution)
        for task in self.task_dict["tasks"].values():
            freeze_documents(task)

    @property
    def leaf_tasks(self) -> dict[str, Any]:
        """Leaf task name → lm-eval Task, over all units."""
        return self.task_dict["tasks"]

    def _task_manager(self, wanted_builtins: Mapping[str, str], everything: bool):
        from lm_eval.tasks import TaskManager

        folders = [str(p) for p in self.include_paths]
        tag_wanted = any(path == "(tag)" for path in wanted_builtins.values())
        with_defaults = everything or tag_wanted
        if wanted_builtins and not with_defaults:
            # Index only the built-in folders that hold the wanted tasks: all ~15k built-in YAMLs take seconds.
            root = builtin_tasks_dir()
            folders += sorted({str(root / Path(path).parts[0]) for path in wanted_builtins.values()})
        manager = TaskManager(include_path=folders or None, include_defaults=with_defaults and bool(wanted_builtins))
        self._prepare_index(manager)
        return manager

    def _prepare_index(self, manager) -> None:
        """Make task-folder YAMLs independent of the working directory, then apply the overrides."""
        from lm_eval.tasks._index import Kind
        from lm_eval.tasks._yaml_loader import load_yaml

        index = manager.task_index
        plugin_folders = self.include_paths

        def is_plugin(path: Path | None) -> bool:
            return path is not None and any(path.resolve().is_relative_to(folder) for folder in plugin_folders)

        def resolved_config(entry) -> dict[str, Any]:
            if entry.yaml_path is None:
                return dict(entry.cfg or {})
            config = load_yaml(entry.yaml_path, resolve_func=True)
            return absolutise_data_paths(config, entry.yaml_path.parent) if is_plugin(entry.yaml_path) else config

        def replace_config(entry, config: dict[str, Any]) -> None:
            # lm-eval builds a task from `entry.cfg` when the entry has no YAML path (as for inline configs).
            entry.cfg = config
            entry.yaml_path = None

        for entry in index.values():
            if (entry.kind is Kind.TASK and is_plugin(entry.yaml_path)
                    and has_relative_data_paths(entry.cfg or {}, entry.yaml_path.parent)):
                replace_config(entry, resolved_config(entry))
        for name, values in self.overrides.items():
            entry = index[name]
            targets = [index[member] for member in sorted(entry.tags)] if entry.kind is Kind.TAG else [entry]
            for target in targets:
                replace_config(target, {**resolved_config(target), **values})

    def _load(self, reraise_unknown_names: bool) -> tuple[dict[str, Any], dict[str, TaskUnit]]:
        merged: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
        units: dict[str, TaskUnit] = {}
        owner: dict[str, str] = {}
        for name in self.tasks:
            try:
                loaded = self.manager.load([name])
            except KeyError as err:
                if reraise_unknown_names:
                    raise
                raise TaskConfigError(f"task {name!r} could not be loaded: {err}") from err
            except Exception as err:
                raise TaskConfigError(f"task {name!r} could not be loaded: {type(err).__name__}: {err}") from err
            if name in loaded["groups"]:
                group = loaded["groups"][name]
                unit = TaskUnit(name, "group", tuple(t.task_name for t in group.get_all_tasks()), group)
            elif list(loaded["tasks"]) == [name]:
                unit = TaskUnit(name, "task", (name,))
            else:
                unit = TaskUnit(name, "tag", tuple(sorted(loaded["tasks"])))
            for leaf in unit.leaves:
                if leaf in owner:
                    raise TaskConfigError(f"task {leaf!r} is part of both {owner[leaf]!r} and {name!r}; "
                                          f"list each task once")
                owner[leaf] = name
            units[name] = unit
            merged["tasks"].update(loaded["tasks"])
            merged["groups"].update(loaded.get("groups", {}))
            merged["group_map"].update(loaded.get("group_map", {}))
        return merged, units


def freeze_documents(task) -> None:
    """Materialise a task's evaluation documents once, as a list.

    lm-eval re-reads them on every access (and re-runs the task's `process_docs` each time), several times per
    evaluation: on small models that was a large share of a trial's time outside the model. The documents are the
    same ones; they are only no longer re-derived (which also pins any randomness in `process_docs`).
    """
    documents = list(task.eval_docs)
    split_accessor = "test_docs" if task.has_test_docs() else "validation_docs"
    setattr(task, split_accessor, lambda: documents)


def load_checkpoint(path: str | os.PathLike, dtype: str = "float32", device: str = "cpu",
                    allow_pickle: bool = False, trust_remote_code: bool = False):
    """Model and tokenizer from a local folder: safetensors only unless pickles are explicitly allowed."""
    set_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(
        # None lets transformers take safetensors when present and fall back to a pickle only when allowed.
        path, dtype=getattr(torch, dtype), use_safetensors=None if allow_pickle else True,
        trust_remote_code=trust_remote_code
    ).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


class _DocumentIds(list):
    """Sorted document ids for lm-eval's `samples`: it tests every document of a task for membership in this list
    (a set makes that O(1)), and it maps the k-th selected document to the k-th id, so the ids must be sorted."""

    def __init__(self, ids):
        super().__init__(sorted(set(ids)))
        self._members = frozenset(self)

    def __contains__(self, item) -> bool:
        return item in self._members


class LiveEvaluator:
    """Scores one live model on a TaskSuite; the model's weights may change in place between calls.

    `device`: where the model runs (moved there once, here); None keeps it where it is. `forward_seconds`
    accumulates the time spent inside the model's forward passes and generation (synchronised on CUDA), so callers
    can tell lm-eval's own overhead from model time. `vllm`: evaluate with a vLLM engine that is given the live
    model's weights before every evaluation (`backends.py`) instead of running the live model itself.
    """

    def __init__(self, model, tokenizer, suite: TaskSuite, batch_size: int | str = 64, device: str | None = None,
                 max_length: int | None = None, chat: "ChatFormat | None" = None,
                 vllm: "VllmOptions | None" = None):
        set_offline()
        from auto_merge.evaluation.backends import make_backend

        if device is not None:
            model.to(resolve_device(device))
        model.eval()
        with quiet():
            self.backend = make_backend(model, tokenizer, batch_size=batch_size, max_length=max_length, vllm=vllm)
        self.model = model
        self.suite = suite
        self.chat = chat or ChatFormat()

    @property
    def lm(self):
        """lm-eval's model object that runs the tasks."""
        return self.backend.lm

    @property
    def forward_seconds(self) -> float:
        """Seconds spent in forward passes and generation so far (differences of it time one evaluation)."""
        return self.backend.clock.seconds

    def _sync(self) -> None:
        """The backend sees the live model's current weights (vLLM: loaded into its engine)."""
        with quiet():
            self.backend.sync()

    def evaluate(self, limit: int | float | None = None, samples: list | None = None) -> dict[str, dict[str, float]]:
        """Per task (and group), its metrics (`"exact_match,none"` style keys, as lm-eval reports them), on the
        first `limit` documents of each task (all when None; a fraction when < 1). ``samples``: a list that gets one
        record per example (task, doc_id, prompt, model output, target, metrics)."""
        from lm_eval.evaluator import evaluate

        self._sync()
        with quiet():
            results = evaluate(
                lm=self.lm,
                task_dict=self.suite.task_dict,
                limit=limit,
                bootstrap_iters=0,  # no stderr bootstrap: seconds per call on a CPU, and unused here
                log_samples=samples is not None,
                verbosity="ERROR",
                confirm_run_unsafe_code=self.suite.allow_code_execution,
                **self.chat.lm_eval_arguments(),
            )
        if samples is not None:
            samples.extend(sample_record(task, entry) for task, entries in results["samples"].items()
                           for entry in entries)
        return {task: metric_values(values) for task, values in results["results"].items()}

    def evaluate_documents(self, documents: Mapping[str, Sequence[int]]) -> dict[str, dict[int, dict[str, Any]]]:
        """Run exactly the given documents (leaf task → document ids); per task, per document, its metric values
        keyed `"<metric>,<filter>"`, as lm-eval's `process_results` produced them (a number for mean-aggregated
        metrics, an item such as a (reference, prediction) pair for corpus-level ones)."""
        from lm_eval.evaluator import evaluate

        selected = {task: _DocumentIds(ids) for task, ids in documents.items() if len(ids)}
        if not selected:
            return {}
        tasks = self.suite.leaf_tasks
        self._sync()
        with quiet():
            results = evaluate(
                lm=self.lm,
                # Only the tasks with documents to run: lm-eval runs a task absent from `samples` in full.
                task_dict={"tasks": {task: tasks[task] for task in selected}},
                samples=dict(selected),
                bootstrap_iters=0,
                log_samples=True,  # the per-document values live only in the logged samples
                verbosity="ERROR",
                confirm_run_unsafe_code=self.suite.allow_code_execution,
                **self.chat.lm_eval_arguments(),
            )
        per_document: dict[str, dict[int, dict[str, Any]]] = {task: {} for task in selected}
        for task, entries in results["samples"].items():
            for entry in entries:
                values = per_document[task].setdefault(int(entry["doc_id"]), {})
                for metric in entry["metrics"]:
                    values[f"{metric},{entry['filter']}"] = entry[metric]
        for task, ids in selected.items():
            absent = sorted(set(ids) - set(per_document[task]))
            if absent:
                raise RuntimeError(f"lm-eval returned no results for documents {absent[:10]} of task {task!r}")
        return per_document


def sample_record(task: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """One logged lm-eval sample as plain JSON data: what the model was asked, what it answered, what was expected."""
    arguments = entry.get("arguments") or []
    prompts = [args[0] if isinstance(args, (list, tuple)) and args else args for args in arguments]
    return {
        "task": task,
        "doc_id": entry.get("doc_id"),
        "filter": entry.get("filter"),
        "prompt": prompts[0] if len(prompts) == 1 else prompts,
        "output": entry.get("filtered_resps"),
        "raw_output": entry.get("resps"),
        "target": entry.get("target"),
        "metrics": {metric: entry.get(metric) for metric in entry.get("metrics") or []},
    }


def metric_values(values: dict) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in values.items()
        if "," in key and "_stderr" not in key and isinstance(value, (int, float))
    }


def evaluate_checkpoint(path, tasks: list[str], limit=None, batch_size: int = 64, device: str = "cpu",
                        include_paths: list[Path] | None = None, dtype: str = "float32",
                        allow_code_execution: bool = False, allow_pickle: bool = False,
                        trust_remote_code: bool = False, chat: "ChatFormat | None" = None,
                        samples: list | None = None,
                        vllm: "VllmOptions | None" = None) -> dict[str, dict[str, float]]:
    suite = TaskSuite(tasks, include_paths, allow_code_execution=allow_code_execution)
    model, tokenizer = load_checkpoint(path, dtype=dtype, device=resolve_device(device), allow_pickle=allow_pickle,
                                       trust_remote_code=trust_remote_code)
    return LiveEvaluator(model, tokenizer, suite, batch_size=batch_size, chat=chat,
                         vllm=vllm).evaluate(limit=limit, samples=samples)


def format_table(rows: list[tuple[str, dict[str, float]]], columns: list[str]) -> str:
    """A plain aligned text table: one row per (label, {column: value})."""
    header = ["model"] + columns
    body = [[label] + [f"{values[c]:.3f}" if c in values else "-" for c in columns] for label, values in rows]
    widths = [max(len(str(row[i])) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
