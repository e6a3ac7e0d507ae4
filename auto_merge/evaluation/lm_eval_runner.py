"""Scoring models on lm-evaluation-harness tasks, offline and quietly.

`TaskSuite` resolves task names once (the project's `custom_tasks/`, a user's include paths, and lm-eval's built-in
tasks only when a name is not found in those). `LiveEvaluator` wraps one live `transformers` model: its weights may be
overwritten in place between calls (as the merge engine does), and each call re-scores it without reloading anything
or re-creating lm-eval's model wrapper.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def default_include_paths() -> list[Path]:
    """The project's own task folder, when running from a checkout."""
    folder = PROJECT_ROOT / "custom_tasks"
    return [folder] if folder.is_dir() else []


def set_offline() -> None:
    """Never reach for a hub: datasets and models are local. Must run before datasets/transformers read them."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


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


class TaskNotFoundError(ValueError):
    pass


@dataclass
class TaskSuite:
    """A fixed list of lm-eval tasks, indexed once and loaded once."""

    tasks: list[str]
    include_paths: list[Path] = field(default_factory=default_include_paths)

    def __post_init__(self) -> None:
        set_offline()
        import datasets

        datasets.disable_progress_bars()
        from lm_eval.tasks import TaskManager

        self.include_paths = [Path(p).resolve() for p in self.include_paths]
        for path in self.include_paths:
            if not path.is_dir():
                raise FileNotFoundError(f"task include path {path} does not exist")
        with quiet():
            manager = TaskManager(include_path=[str(p) for p in self.include_paths] or None, include_defaults=False)
            missing = [t for t in self.tasks if t not in manager.all_subtasks and t not in manager.all_groups]
            if missing:
                # Indexing lm-eval's ~15k built-in tasks costs seconds, so only when a name is not ours.
                manager = TaskManager(include_path=[str(p) for p in self.include_paths] or None)
                missing = [t for t in self.tasks if t not in manager.all_subtasks and t not in manager.all_groups]
            if missing:
                raise TaskNotFoundError(
                    f"unknown task(s) {', '.join(missing)}; not in lm-eval's tasks nor in include paths "
                    f"{', '.join(map(str, self.include_paths)) or '(none)'}"
                )
            self.task_dict = manager.load(self.tasks)
        self.manager = manager


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
        path, dtype=getattr(torch, dtype), use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code
    ).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


class LiveEvaluator:
    """Scores one live model on a TaskSuite; the model's weights may change in place between calls."""

    def __init__(self, model, tokenizer, suite: TaskSuite, batch_size: int = 64, device: str = "cpu"):
        set_offline()
        with quiet():
            from lm_eval.models.huggingface import HFLM

            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        self.suite = suite

    def evaluate(self, limit: int | float | None = None) -> dict[str, dict[str, float]]:
        """Per task, its metrics (`"exact_match,none"` style keys, as lm-eval reports them)."""
        from lm_eval.evaluator import evaluate

        with quiet():
            results = evaluate(
                lm=self.lm,
                task_dict=self.suite.task_dict,
                limit=limit,
                bootstrap_iters=0,  # no stderr bootstrap: seconds per call on a CPU, and unused here
                log_samples=False,
                verbosity="ERROR",
            )
        return {task: metric_values(values) for task, values in results["results"].items()}


def metric_values(values: dict) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in values.items()
        if "," in key and "_stderr" not in key and isinstance(value, (int, float))
    }


def evaluate_checkpoint(path, tasks: list[str], limit=None, batch_size: int = 64, device: str = "cpu",
                        include_paths: list[Path] | None = None, dtype: str = "float32") -> dict[str, dict[str, float]]:
    suite = TaskSuite(tasks, include_paths if include_paths is not None else default_include_paths())
    model, tokenizer = load_checkpoint(path, dtype=dtype, device=device)
    return LiveEvaluator(model, tokenizer, suite, batch_size=batch_size, device=device).evaluate(limit=limit)


def format_table(rows: list[tuple[str, dict[str, float]]], columns: list[str]) -> str:
    """A plain aligned text table: one row per (label, {column: value})."""
    header = ["model"] + columns
    body = [[label] + [f"{values[c]:.3f}" if c in values else "-" for c in columns] for label, values in rows]
    widths = [max(len(str(row[i])) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
