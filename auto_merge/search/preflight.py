"""Checks of a validated config's evaluation that need lm-eval or torch, run before any model is loaded, by the
search and the one-shot runs alike: each problem is one ConfigError at the key that causes it (issue 12 D6)."""

from __future__ import annotations

from pathlib import Path

_TASK_KEY = ("global_params", "evaluation", "tasks")


def config_error(config, key_path: tuple, message: str, allowed: str | None):
    from auto_merge.config.errors import ConfigError, ConfigProblem, Location

    location = config.sources.locate(key_path) if config.sources is not None else Location(Path(config.source_file))
    return ConfigError([ConfigProblem(location, key_path, message, allowed)], config_file=config.source_file)


def config_dir(config) -> Path | None:
    return Path(config.source_file).parent if config.source_file is not None else None


def check_evaluation(config) -> None:
    """The device exists; the tasks load (names, include paths, overrides, the code-execution opt-in, their data);
    every document renders; each task produces the configured metric."""
    from auto_merge.evaluation.lm_eval_runner import TaskConfigError, TaskSuite

    settings = config.global_params.evaluation
    _check_backend(config, settings)
    if settings.device and settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise config_error(config, ("global_params", "evaluation", "device"),
                               f"device {settings.device!r}, but torch sees no CUDA device", "cpu, or auto")
    if not settings.tasks:
        return
    try:
        suite = TaskSuite([t.task for t in settings.tasks], settings.include_paths or None,
                          overrides={t.task: t.overrides for t in settings.tasks if t.overrides},
                          num_fewshot=settings.num_fewshot, allow_code_execution=settings.allow_code_execution,
                          base_dir=config_dir(config))
    except TaskConfigError as error:
        raise config_error(config, _TASK_KEY, str(error),
                           "lm-eval tasks found in evaluation.include_path or lm-eval's own tasks") from None
    except Exception as error:  # a task's own code or data failed to load: user input, reported at the tasks key
        raise config_error(config, _TASK_KEY, f"the tasks could not be loaded: {type(error).__name__}: {error}",
                           "tasks whose YAML, data and functions load") from None
    for index, task in enumerate(settings.tasks):
        leaf = suite.leaf_tasks.get(task.task)
        if leaf is None:  # a group: its members' metrics are checked when they are aggregated
            continue
        _check_metric(config, index, task, leaf)
        _check_documents_render(config, index, task.task, leaf)


def _check_backend(config, settings) -> None:
    """Every evaluation key is honoured or refused, never silently ignored."""
    key = ("global_params", "evaluation")
    if settings.vllm:
        from auto_merge.evaluation.backends import vllm_problem

        problem = vllm_problem(settings.device)
        if problem is not None:
            raise config_error(config, key + ("vllm",), problem,
                               "false (score with transformers), or true on a machine with a CUDA GPU and vllm")
    if not settings.in_memory:
        raise config_error(config, key + ("in_memory",), "writing every candidate to disk before evaluating it is "
                           "not supported: candidates are evaluated in memory, with the same scores", "true")
    if settings.fewshot_as_multiturn and not settings.apply_chat_template:
        raise config_error(config, key + ("fewshot_as_multiturn",), "few-shot examples as turns need the chat "
                           "template", "false, or apply_chat_template: true")
    if settings.apply_chat_template:
        from auto_merge.models.inspect import has_chat_template

        base = getattr(config.selected, "base_model", None)
        folder = config.model_paths.get(base) if base is not None else None
        if folder is not None and not has_chat_template(folder):
            raise config_error(config, key + ("apply_chat_template",), f"the base model {base!r} (whose tokenizer "
                               "the merged models use) has no chat template", "false, or a base model whose "
                               "tokenizer has one")


def _check_metric(config, index: int, task, leaf) -> None:
    metrics = list(getattr(leaf, "_metric_fn_list", {}) or {})
    filters = [f.name for f in getattr(leaf, "_filters", [])] or ["none"]
    name, _, filter_name = task.metric.partition(",")
    if metrics and (name not in metrics or (filter_name or "none") not in filters):
        allowed = ", ".join(f"{m},{f}" for f in filters for m in metrics)
        raise config_error(config, _TASK_KEY + (index, "metric"),
                           f"task {task.task!r} does not produce metric {task.metric!r}", allowed)


def _check_documents_render(config, index: int, name: str, leaf) -> None:
    """Every document's prompt and target can be made (a task whose doc_to_text fails on some documents would
    otherwise fail only when a budget first reaches them, or at the full-budget scoring)."""
    documents = leaf.test_docs() if leaf.has_test_docs() else leaf.validation_docs()
    for number, document in enumerate(documents or []):
        try:
            leaf.doc_to_text(document)
            leaf.doc_to_target(document)
        except Exception as error:  # the task's own function failed on this document
            raise config_error(config, _TASK_KEY + (index, "task"),
                               f"task {name!r} cannot render document {number}: {type(error).__name__}: {error}",
                               "a task whose doc_to_text and doc_to_target work on every document") from None
