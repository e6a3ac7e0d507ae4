"""Typed schema of an experiment config (pydantic v2), mirroring the reference's `exp_config/*.yaml`
(docs/reference_format.md) plus a few new keys, each documented in its field description.

Unknown keys are errors everywhere except inside an evaluation task entry, where a documented allow-list of lm-eval
task-config overrides is accepted. Every block in `strategies` is type-checked; only the selected one must also be
runnable (e.g. the reference's `normal_models.yaml`, passthrough over three models, loads but cannot be selected).

The strategy blocks are declared by the strategies themselves (auto_merge/strategies, built from
auto_merge/config/blocks.py) and registered; :func:`experiment_model` assembles the whole config's model from the
registry, so a strategy added by a plugin is validated like a built-in one.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator, model_validator

from auto_merge.config.blocks import (
    Issue,
    SchemaProblem,
    StrictModel,
    join_names,
    raise_issues,
    show_value,
)
from auto_merge.config.errors import ConfigError, ConfigProblem, KeyPath, SourceMap



# lm-eval TaskConfig keys a task entry may override (the reference passes every extra key through; `test_split:
# validation` is the one it ships). Code hooks (process_docs, process_results: `!function` in lm-eval) and keys that
# redefine what is scored (metric_list, filter_list, output_type) are left out: define a custom task under
# `evaluation.include_path` instead. Value: accepted Python types and how to say them.
TASK_OVERRIDE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "test_split": ((str,), "a split name"),
    "validation_split": ((str,), "a split name"),
    "training_split": ((str,), "a split name"),
    "fewshot_split": ((str,), "a split name"),
    "num_fewshot": ((int,), "an integer >= 0"),
    "fewshot_config": ((dict,), "a mapping"),
    "generation_kwargs": ((dict,), "a mapping"),
    "doc_to_text": ((str,), "a string (Jinja template or field name)"),
    "doc_to_target": ((str, int), "a string (Jinja template or field name) or an integer"),
    "doc_to_choice": ((str, list), "a string (Jinja template or field name) or a list"),
    "description": ((str,), "a string"),
    "target_delimiter": ((str,), "a string"),
    "fewshot_delimiter": ((str,), "a string"),
    "gen_prefix": ((str,), "a string"),
    "repeats": ((int,), "an integer >= 1"),
    "dataset_path": ((str,), "a string"),
    "dataset_name": ((str,), "a string"),
    "dataset_kwargs": ((dict,), "a mapping"),
    "task_alias": ((str,), "a string"),
    "metadata": ((dict,), "a mapping"),
}

_METRIC_PATTERN = re.compile(r"^[^,\s]+,[^,\s]+$")
_DEVICE_PATTERN = re.compile(r"^(cpu|mps|auto|cuda(:\d+)?)$")
# The reference's YAML shows `#key: None` (commented out); uncommented, YAML reads the word None as a string.
_NONE_WORDS = {"None", "none", "null", "Null", "~", ""}


# ---------------------------------------------------------------------------------------------------------------
# global_params


class EvaluationTask(StrictModel):
    """One lm-eval task and the result key that scores it."""

    model_config = ConfigDict(extra="allow")

    task: str = Field(min_length=1, description="lm-eval task (or group) name")
    metric: str = Field(
        description="lm-eval result key '<metric>,<filter>', e.g. 'acc,none' or 'exact_match,custom-strict-match'")
    higher_is_better: bool = Field(
        True, description="New. False for metrics where lower is better (e.g. perplexity), so the search "
                          "minimises the score instead of maximising it.")
    weight: float = Field(
        1.0, gt=0, description="New. Weight of this task when evaluation.aggregate is weighted_mean.")

    @classmethod
    def allowed_keys_text(cls) -> str:
        return (f"{join_names(list(cls.model_fields))}, or an lm-eval task-config override: "
                f"{join_names(list(TASK_OVERRIDE_KEYS))}")

    @property
    def overrides(self) -> dict[str, Any]:
        """lm-eval task-config overrides (the extra keys), e.g. {'test_split': 'validation'}."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _check_metric_and_overrides(self) -> "EvaluationTask":
        issues = []
        if not _METRIC_PATTERN.match(self.metric):
            issues.append(Issue(("metric",), f"{self.metric!r} is not an lm-eval result key",
                                "'<metric>,<filter>', e.g. 'acc,none'"))
        for key, value in self.overrides.items():
            if key not in TASK_OVERRIDE_KEYS:
                issues.append(Issue((key,), f"unknown key {key!r}", self.allowed_keys_text(), about_key=True))
                continue
            accepted_types, words = TASK_OVERRIDE_KEYS[key]
            wrong_type = isinstance(value, bool) or not isinstance(value, accepted_types)
            negative = isinstance(value, int) and not isinstance(value, bool) and (
                (key == "num_fewshot" and value < 0) or (key == "repeats" and value < 1))
            if wrong_type or negative:
                issues.append(Issue((key,), f"bad value {value!r} for lm-eval override {key!r}", words))
        raise_issues(issues)
        return self


class EvaluationSettings(StrictModel):
    """How merged models are scored (reference: `global_params.evaluation`)."""

    in_memory: bool = Field(True, description="Candidates are copied into a live model and evaluated in memory "
                                              "(false, the reference's write-then-evaluate, is refused: same scores, "
                                              "slower)")
    vllm: bool = Field(False, description="Score candidates with vLLM (true) or Hugging Face HFLM (false). With "
                                          "vLLM each worker keeps one engine on its GPU and every candidate's "
                                          "weights are loaded into it in place; needs a CUDA GPU and the vllm extra "
                                          "(checked before any model loads)")
    enforce_eager: bool = Field(True, description="Passed to vLLM: no CUDA graphs (read only with vllm: true)")
    gpu_memory_utilization: float = Field(
        0.4, gt=0, lt=1, description="New. Share of the GPU's memory vLLM takes for its copy of the model and its KV "
                                     "cache (read only with vllm: true); the rest holds the sources and the live "
                                     "model that candidates are merged into")
    batch_size: int = Field(16, ge=1, description="lm-eval batch size")
    torch_dtype: Literal["float16", "bfloat16", "float32", "auto"] = Field(
        "float16", description="dtype of the evaluated model")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (absent = each task's default)")
    apply_chat_template: bool | str = Field(
        False, description="New. Format prompts with the tokenizer's chat template (lm-eval's option); a string names "
                           "one of several templates. Instruction-tuned models usually need it")
    system_instruction: str | None = Field(
        None, description="New. A system message put before every prompt (with the chat template: the system turn)")
    fewshot_as_multiturn: bool = Field(
        False, description="New. With the chat template: few-shot examples as earlier turns of the conversation")
    limit: float | None = Field(
        None, gt=0, description="examples per task for one-shot evaluations (no budget); < 1 = a fraction")
    device: str | None = Field(None, description="lm-eval device: cpu, cuda, cuda:N, mps or auto (absent = auto)")
    include_path: str | list[str] | None = Field(
        None, description="Folder(s) of custom lm-eval task YAMLs; a string or (new) a list of strings; "
                          "'' = none. Relative paths are relative to the config file's folder.")
    tasks: list[EvaluationTask] = Field(
        default_factory=list, description="lm-eval tasks to score: a list of {task, metric, ...overrides}; searches "
                                          "need at least one (lfs_multiobj two: one objective each)")
    aggregate: Literal["mean", "weighted_mean"] = Field(
        "mean", description="New. How single-objective strategies combine the per-task costs into one: mean, or "
                            "weighted_mean using each task's weight. Multi-objective strategies keep one cost per "
                            "task. (The reference optimised tasks[0] only.)")
    allow_code_execution: bool = Field(
        False, description="New. Run tasks that execute model-written code (MBPP, HumanEval style); off by default")
    budget_unit: Literal["examples", "fraction"] = Field(
        "examples", description="New. A trial budget counts examples of the largest task (every task runs the "
                                "same share of its documents), or is a fraction in (0, 1] of every task")
    min_examples_per_task: int = Field(
        10, ge=0, description="New. Smallest number of documents any task runs at any budget")
    stratify: Literal["none", "sources"] = Field(
        "none", description="New. Which documents a small budget takes. none: a seeded random prefix of each task. "
                            "sources: before the search, the base and each expert are scored on every document (the "
                            "end of the run scores them anyway; their results are cached) and each task's order "
                            "interleaves the groups of documents the sources answer alike (and each subtask of a "
                            "group), so every budget holds each group in its share of the task")
    contested_first: bool = Field(
        False, description="New. Small budgets start with the documents that the best candidates scored at the "
                           "search's max_budget so far disagree on (the better half of them, once there are two), most "
                           "disputed first: near the top of a search most documents are answered alike and cannot "
                           "tell the good candidates apart. A candidate keeps the order it was first scored with, so "
                           "its promotions reuse its results")

    @field_validator("num_fewshot", "limit", mode="before")
    @classmethod
    def _none_word_means_absent(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value in _NONE_WORDS else value

    @property
    def include_paths(self) -> list[str]:
        """`include_path` as a list, empty entries dropped."""
        if self.include_path is None:
            return []
        paths = [self.include_path] if isinstance(self.include_path, str) else self.include_path
        return [path for path in paths if path]

    @model_validator(mode="after")
    def _check_tasks(self) -> "EvaluationSettings":
        issues = []
        if self.device is not None and not _DEVICE_PATTERN.match(self.device):
            issues.append(Issue(("device",), f"unknown device {self.device!r}", "cpu, cuda, cuda:N, mps or auto"))
        seen: dict[str, int] = {}
        for index, task in enumerate(self.tasks):
            if task.task in seen:
                issues.append(Issue(("tasks", index, "task"), f"task {task.task!r} is listed twice "
                                    f"(also tasks[{seen[task.task]}])", "each task once"))
            seen.setdefault(task.task, index)
            if self.aggregate == "mean" and "weight" in task.model_fields_set and task.weight != 1.0:
                issues.append(Issue(("tasks", index, "weight"), "a task weight only acts with aggregate: "
                                    "weighted_mean", "remove the weight, or set evaluation.aggregate: weighted_mean"))
        raise_issues(issues)
        return self


class GlobalParams(StrictModel):
    """Settings shared by every strategy (reference: `global_params`)."""

    random_seed: int = Field(0, description="Seeds python, numpy and torch (and seeded task shuffles)")
    cache_dir: str | None = Field(
        None, description="Cache folder for models and data sets; absent or '' = the default cache")
    output_path: str = Field("", description="Folder for this run's outputs; '' = the runner's default")
    load_run_history: str | None = Field(
        None, description="Path of a previous run history to warm-start the search from")
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    model_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="New. Model id → where to find it: a local folder, zoo:NAME, a hub id in the local Hugging "
                    "Face cache, or another alias. Lets hub ids such as meta-llama/Llama-2-13b-hf (also the ids "
                    "inside imported search results) point at local copies; nothing is downloaded. Relative folders "
                    "are looked up next to the config file, then in the working directory.")
    zoo_seed: int = Field(0, ge=0, description="New. Which demo-zoo build (by seed) zoo:NAME references mean")
    allow_pickle: bool = Field(
        False, description="New. Accept pickle (.bin) checkpoints; loaded with torch weights_only=True. Default: "
                           "safetensors only")
    trust_remote_code: bool = Field(
        False, description="New. Let transformers run custom model code shipped in a model folder when loading it")
    baselines: bool = Field(
        True, description="New. At the end of a search, also score uniform task arithmetic (λ 0.3/0.5/0.7/1.0, the "
                          "best kept) and TIES (density 0.5, λ 1) at the full budget, and compare the winner with "
                          "them (final_scores.json, the summary, the model card); false skips these 5 evaluations")

    @field_validator("cache_dir", "load_run_history", mode="before")
    @classmethod
    def _none_word_means_absent(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value in _NONE_WORDS else value

    @model_validator(mode="after")
    def _check_aliases(self) -> "GlobalParams":
        issues = [Issue(("model_aliases", source), "empty alias target", "a model reference")
                  for source, target in self.model_aliases.items() if not target.strip()]
        issues += [Issue(("model_aliases", source), f"alias {source!r} points at itself", "another model reference")
                   for source, target in self.model_aliases.items() if source == target]
        raise_issues(issues)
        return self


def sources_scoring_budget(block) -> float:
    """What `evaluation.stratify: sources` spends before the first trial, in budget units (one full evaluation =
    max_budget): the base and each expert scored on every example."""
    return len(dict.fromkeys([block.base_model, *block.models])) * block.max_budget


def strategy_names() -> tuple[str, ...]:
    from auto_merge.strategies.registry import list_strategies

    return tuple(list_strategies())


class ExperimentConfig(StrictModel):
    """A whole experiment config: which strategy to run, shared settings, and the strategy blocks. Validation uses
    the subclass :func:`experiment_model` builds, whose `strategy` and `strategies` fields know every registered
    strategy."""

    strategy: str = Field(description="Strategy to run")
    global_params: GlobalParams = Field(default_factory=GlobalParams)
    strategies: StrictModel = Field(description="Strategy name → settings block (may be !include'd)")

    _sources: SourceMap | None = PrivateAttr(default=None)
    _model_paths: dict[str, Path] = PrivateAttr(default_factory=dict)

    @property
    def selected(self) -> Any:
        """The typed block of the selected strategy."""
        return getattr(self.strategies, self.strategy)

    @property
    def source_file(self) -> Path | None:
        """The top-level YAML file this config was loaded from."""
        return self._sources.root_file if self._sources is not None else None

    @property
    def sources(self) -> SourceMap | None:
        """Where each key was written (file and line), for error messages."""
        return self._sources

    @property
    def model_paths(self) -> dict[str, Path]:
        """Model reference → local folder, for the selected strategy's models (filled by the model checks)."""
        return dict(self._model_paths)

    @model_validator(mode="after")
    def _check_selected(self) -> "ExperimentConfig":
        from auto_merge.strategies.registry import get_strategy

        block = self.selected
        if block is None:
            present = [name for name in strategy_names() if getattr(self.strategies, name) is not None]
            allowed = f"a strategies.{self.strategy} block (present: {', '.join(present) or 'none'})"
            if self.strategy in self.strategies.model_fields_set:  # written, but null or an empty file
                raise_issues([Issue(("strategies", self.strategy), "the settings block of the selected strategy "
                                     "is empty", allowed)])
            raise_issues([Issue(("strategies", self.strategy), f"no settings block for the selected strategy "
                                 f"{self.strategy!r}", allowed, missing_key=True)])
        issues = []
        tasks = self.global_params.evaluation.tasks
        # Searches need something to optimise; normal_* with no task only merge (nothing is evaluated).
        needed_tasks = get_strategy(self.strategy).min_tasks
        if getattr(block, "multi_objective", False):
            needed_tasks = 2
        if len(tasks) < needed_tasks:
            issues.append(Issue(("global_params", "evaluation", "tasks"), f"strategy {self.strategy} needs at "
                                f"least {needed_tasks} evaluation task(s), got {len(tasks)}",
                                f"at least {needed_tasks} entries {{task, metric}}"))
        if hasattr(block, "runnable_issues"):
            issues += [Issue(("strategies", self.strategy) + issue.subpath, issue.message, issue.allowed)
                       for issue in block.runnable_issues()]
        if getattr(block, "n_trials", None) == 0 and self.global_params.evaluation.stratify == "sources":
            upfront = sources_scoring_budget(block)
            if block.total_budget <= upfront:
                issues.append(Issue(("strategies", self.strategy, "total_budget"),
                                    f"total_budget {block.total_budget:g} is spent before the first trial: "
                                    f"evaluation.stratify: sources first scores the base and each expert on every "
                                    f"example, {upfront:g} in budget units",
                                    f"total_budget > {upfront:g}, or evaluation.stratify: none"))
        if getattr(block, "optimizer", None) == "cmaes" and self.strategy != "lfs":
            issues.append(Issue(("strategies", self.strategy, "optimizer"),
                                f"optimizer cmaes searches continuous merge weights for one objective: it runs the "
                                f"lfs strategy, not {self.strategy}", "hyperband, successive_halving, bo, random"))
        raise_issues(issues)
        return self


# ---------------------------------------------------------------------------------------------------------------
# pydantic errors → ConfigError

_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "none_required": "nothing (null)",
}
_COMPARISONS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
                "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


_MODELS: dict[tuple[str, ...], type] = {}


def experiment_model() -> type[ExperimentConfig]:
    """The config model for the registered strategies: `strategy` one of their names, `strategies` a mapping with
    one optional block per strategy (built once per set of registered strategies)."""
    from auto_merge.strategies.registry import get_strategy

    names = strategy_names()
    if names not in _MODELS:
        blocks = create_model(
            "StrategyBlocks", __base__=StrictModel,
            __doc__="Strategy name → its settings. All present blocks are type-checked; only the selected one is run.",
            **{name: (Optional[get_strategy(name).block], Field(None, description=f"settings of strategy {name}"))
               for name in names})
        _MODELS[names] = create_model(
            "ExperimentConfig", __base__=ExperimentConfig,
            strategy=(Literal[names], Field(description=f"Strategy to run: one of {', '.join(names)}")),
            strategies=(blocks, Field(description="Strategy name → settings block (may be !include'd)")))
    return _MODELS[names]


def validate_experiment_data(data: Any, sources: SourceMap) -> ExperimentConfig:
    """Validate parsed YAML against the schema; any problem → ConfigError naming file, line, key and allowed."""
    try:
        config = experiment_model().model_validate(data)
    except ValidationError as error:
        raise ConfigError(_problems_from_validation_error(error, data, sources),
                          config_file=sources.root_file) from None
    config._sources = sources
    return config


def _problems_from_validation_error(error: ValidationError, data: Any, sources: SourceMap) -> list[ConfigProblem]:
    # (path, group) → (message, allowed parts, about the key name?)
    found: dict[tuple[KeyPath, str], tuple[str, list[str], bool]] = {}
    for details in error.errors(include_url=False):
        cause = (details.get("ctx") or {}).get("error")
        if details["type"] == "value_error" and isinstance(cause, SchemaProblem):
            base = _data_path(details["loc"], data, keep_missing_last=False)
            for issue in cause.issues:
                path = _data_path(base + issue.subpath, data, keep_missing_last=issue.missing_key)
                _add(found, path, issue.message, issue.allowed, group=issue.message, about_key=issue.about_key)
            continue
        path = _data_path(details["loc"], data, keep_missing_last=details["type"] == "missing")
        message, allowed = _describe(details)
        # The members of one union (e.g. `str | list[str]`) fail together: merge them into one line.
        _add(found, path, message, allowed, group="type" if details["type"] in _TYPE_WORDS else message,
             about_key=details["type"] == "extra_forbidden")
    _explain_typos(found)
    problems = [ConfigProblem(sources.locate(path, about_key=about_key), path, message, " or ".join(allowed) or None)
                for (path, _), (message, allowed, about_key) in found.items()]
    return _once_per_place(problems)


def _explain_typos(found: dict) -> None:
    """An unknown key close to an allowed one says "did you mean"; the "missing" problem of the key it was meant to
    be is then the same mistake and is dropped. Keys with non-ASCII characters are shown escaped (a Cyrillic 'а'
    looks like a Latin 'a' but is another key)."""
    import difflib

    for (path, group), (message, allowed, about_key) in list(found.items()):
        if not (about_key and message.startswith("unknown key")):
            continue
        key = str(path[-1])
        container = _annotation_at(path[:-1])
        names = list(container.model_fields) if _is_model(container) else []
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
        shown = ascii(key) if not key.isascii() else repr(key)
        text = f"unknown key {shown}" + (" (it contains non-ASCII characters)" if not key.isascii() else "")
        if close:
            text += f"; did you mean {close[0]!r}?"
            for other in list(found):
                if other[0] == path[:-1] + (close[0],) and found[other][0] == "required key is missing":
                    del found[other]
        found[(path, group)] = (text, allowed, about_key)


def _once_per_place(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    """A file included by several strategies (lfs.yaml under lfs and lfs_multiobj) fails the same way under each:
    one problem per file, line and mistake, naming the other strategies that include it."""
    kept: dict[tuple, ConfigProblem] = {}
    also: dict[tuple, list[str]] = {}
    for problem in problems:
        path = problem.key_path or ()
        inner = path[2:] if len(path) > 2 and path[0] == "strategies" else path
        place = (str(problem.location), inner, problem.message, problem.allowed)
        if place in kept and path[:1] == ("strategies",):
            also[place].append(str(path[1]))
            continue
        kept[place], also[place] = problem, []
    result = []
    for place, problem in kept.items():
        if also[place]:
            problem = ConfigProblem(problem.location, problem.key_path,
                                    f"{problem.message} (also under strategies {', '.join(also[place])}, which "
                                    f"include the same file)", problem.allowed)
        result.append(problem)
    return result


def _add(found: dict, path: KeyPath, message: str, allowed: str | None, *, group: str, about_key: bool) -> None:
    entry = found.setdefault((path, group), (message, [], about_key))
    if allowed and allowed not in entry[1]:
        entry[1].append(allowed)


def _data_path(loc: tuple, data: Any, *, keep_missing_last: bool) -> KeyPath:
    """The part of a pydantic location that indexes real data (drops union-member tags such as 'list[str]')."""
    path: list[str | int] = []
    node = data
    for position, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif keep_missing_last and position == len(loc) - 1 and isinstance(node, dict):
            path.append(part)
    return tuple(path)


def _describe(details: dict) -> tuple[str, str | None]:
    kind = details["type"]
    context = details.get("ctx") or {}
    given = details.get("input")
    if kind in _TYPE_WORDS:
        return f"wrong type: got {show_value(given)}", _TYPE_WORDS[kind]
    if kind in _COMPARISONS:
        key, symbol = _COMPARISONS[kind]
        return f"{show_value(given)} is out of range", f"a value {symbol} {context.get(key)}"
    if kind == "literal_error":
        return f"{show_value(given)} is not an allowed value", str(context.get("expected"))
    if kind == "too_short":
        return f"too few items ({context.get('actual_length')})", f"at least {context.get('min_length')} item(s)"
    if kind == "too_long":
        return f"too many items ({context.get('actual_length')})", f"at most {context.get('max_length')} item(s)"
    if kind == "invalid_key":
        return "mapping keys must be strings", "a string key"
    if kind == "string_too_short":
        return "empty string", "a non-empty string"
    if kind == "missing":
        container = _annotation_at(details["loc"][:-1])
        field = container.model_fields.get(details["loc"][-1]) if _is_model(container) else None
        return "required key is missing", field.description if field is not None else None
    if kind == "extra_forbidden":
        container = _annotation_at(details["loc"][:-1])
        return f"unknown key {details['loc'][-1]!r}", container.allowed_keys_text() if _is_model(container) else None
    return details.get("msg", kind), None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, StrictModel)


def _annotation_at(loc: tuple) -> Any:
    """The schema type found at a pydantic error location (None where it cannot be told, e.g. inside a union)."""
    current: Any = experiment_model()
    for part in loc:
        current = _without_none(current)
        if _is_model(current):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        elif get_origin(current) is list:
            current = get_args(current)[0]
        else:
            return None
    return _without_none(current)


def _without_none(annotation: Any) -> Any:
    """`X | None` → X; other unions cannot be walked into."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [member for member in get_args(annotation) if member is not type(None)]
        return members[0] if len(members) == 1 else None
    return annotation

