"""Typed schema of an experiment config (pydantic v2), mirroring the reference's `exp_config/*.yaml`
(docs/reference_format.md) plus a few new keys, each documented in its field description.

Unknown keys are errors everywhere except inside an evaluation task entry, where a documented allow-list of lm-eval
task-config overrides is accepted. Every block in `strategies` is type-checked; only the selected one must also be
runnable (e.g. the reference's `normal_models.yaml`, passthrough over three models, loads but cannot be selected).
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from auto_merge.config.errors import ConfigError, ConfigProblem, KeyPath, SourceMap

StrategyName = Literal["normal_models", "normal_slices", "lfs", "lfs_multiobj", "dis", "prune"]
STRATEGY_NAMES: tuple[str, ...] = ("normal_models", "normal_slices", "lfs", "lfs_multiobj", "dis", "prune")
SEARCH_STRATEGIES: tuple[str, ...] = ("lfs", "lfs_multiobj", "dis", "prune")

# Must match the merge engine's method registry (auto_merge/merge/); kept as a constant here so loading a config
# does not import the engine. A later change will check one against the other.
MERGE_METHODS: tuple[str, ...] = (
    "linear", "slerp", "nuslerp", "multislerp", "task_arithmetic", "ties", "dare_linear", "dare_ties",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "karcher", "sce", "passthrough",
    "fourier", "nearswap", "ram", "ramplus_tl", "arcee_fusion",
)
# The methods LFS can search (strategies/lfs.py SEARCHED; tests/test_strategies.py keeps the two equal). LFS merges
# every expert in each layer group (slerp: a searched pair of them), so passthrough is not among them, and nuslerp
# (exactly two experts, weighted) is not searched.
LFS_METHODS: tuple[str, ...] = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "slerp", "fourier", "multislerp", "sce", "model_stock", "karcher", "ram", "ramplus_tl",
    "nearswap", "arcee_fusion",
)

# How many sources (experts, base not counted) each method accepts: (minimum, maximum or None). Must match the
# engine's registry too.
METHOD_SOURCE_COUNTS: dict[str, tuple[int, int | None]] = {
    "linear": (1, None), "slerp": (2, 2), "nuslerp": (2, 2), "multislerp": (2, None),
    "task_arithmetic": (1, None), "ties": (1, None), "dare_linear": (1, None), "dare_ties": (1, None),
    "breadcrumbs": (1, None), "breadcrumbs_ties": (1, None), "della": (1, None), "della_linear": (1, None),
    "model_stock": (2, None), "karcher": (2, None), "sce": (1, None), "passthrough": (1, 1), "fourier": (1, None),
    "nearswap": (1, 1), "ram": (1, None), "ramplus_tl": (1, None), "arcee_fusion": (1, 1),
}


@dataclass(frozen=True)
class NumberBounds:
    """An interval with optional open ends; `None` = unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{_number(self.low)} {'<' if self.low_open else '<='} ")
        parts.append("value")
        if self.high is not None:
            parts.append(f" {'<' if self.high_open else '<='} {_number(self.high)}")
        text = "".join(parts)
        return "any finite number" if text == "value" else text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class MethodParam:
    """One merge-method parameter: its value kind, valid interval and whether it is set per input model."""

    kind: Literal["number", "integer", "bool"]
    bounds: NumberBounds | None = None
    per_model: bool = False

    def allowed_text(self) -> str:
        if self.kind == "bool":
            return "true or false"
        noun = "an integer" if self.kind == "integer" else "a number"
        return f"{noun} with {self.bounds}" if self.bounds else noun


_UNIT = NumberBounds(0.0, 1.0)
# One meaning per name across methods. `weights`, `scaling_coefficient`, `param_value_mask_rate` and `slerp_t` are
# the reference's names (kept so its configs and search results load); the others are mergekit's. The bounds are
# sane search/setting intervals, chosen so that typos such as a mask rate of 1.5 fail early.
METHOD_PARAMETERS: dict[str, MethodParam] = {
    "weights": MethodParam("number", _UNIT, per_model=True),  # reference linear: normalised per-model weights
    "weight": MethodParam("number", NumberBounds(-10.0, 10.0), per_model=True),  # < 0 negates a task vector
    "scaling_coefficient": MethodParam("number", NumberBounds(0.0, 3.0)),  # reference λ
    "lambda": MethodParam("number", NumberBounds(0.0, 3.0)),
    "param_value_mask_rate": MethodParam("number", NumberBounds(0.0, 1.0, high_open=True)),  # reference TIES trim
    "slerp_t": MethodParam("number", _UNIT),
    "t": MethodParam("number", _UNIT),
    "density": MethodParam("number", NumberBounds(0.0, 1.0, low_open=True), per_model=True),
    "gamma": MethodParam("number", NumberBounds(0.0, 1.0, high_open=True), per_model=True),
    # della's per-model window half-width; ram/ramplus_tl read it as one shared threshold (given once per method)
    "epsilon": MethodParam("number", NumberBounds(0.0, 0.5, high_open=True), per_model=True),
    "r": MethodParam("number", NumberBounds(0.0, 10.0)),  # ramplus_tl: boost of unique entries
    "alpha": MethodParam("number", NumberBounds(0.0, 10.0)),  # ramplus_tl: cap on the shared/unique ratio
    "select_topk": MethodParam("number", NumberBounds(0.0, 1.0, low_open=True)),
    "fr_ratio": MethodParam("number", NumberBounds(0.0, 2.0, low_open=True)),
    "scale": MethodParam("number", NumberBounds(0.0, 10.0), per_model=True),
    "tol": MethodParam("number", NumberBounds(0.0, 1.0, low_open=True)),
    "eps": MethodParam("number", NumberBounds(0.0, 1.0, low_open=True)),
    "max_iter": MethodParam("integer", NumberBounds(1.0, 10000.0)),
    "normalize": MethodParam("bool"),
    "rescale": MethodParam("bool"),
    "int8_mask": MethodParam("bool"),
    "filter_wise": MethodParam("bool"),
    "nuslerp_flatten": MethodParam("bool"),
    "nuslerp_row_wise": MethodParam("bool"),
    "normalize_weights": MethodParam("bool"),
}

_GTA_PARAMS = ("density", "weight", "lambda", "normalize", "rescale", "int8_mask")
# Must match the engine's registry: which parameters each method reads.
METHOD_PARAMETER_NAMES: dict[str, tuple[str, ...]] = {
    "linear": ("weights", "weight", "normalize"),
    "slerp": ("slerp_t", "t"),
    "nuslerp": ("weight", "nuslerp_flatten", "nuslerp_row_wise"),
    "multislerp": ("weight", "normalize_weights", "eps"),
    "task_arithmetic": ("scaling_coefficient", "lambda", "weight", "normalize"),
    "ties": ("param_value_mask_rate", "scaling_coefficient") + _GTA_PARAMS,
    "dare_linear": _GTA_PARAMS,
    "dare_ties": _GTA_PARAMS,
    "breadcrumbs": _GTA_PARAMS + ("gamma",),
    "breadcrumbs_ties": _GTA_PARAMS + ("gamma",),
    "della": _GTA_PARAMS + ("epsilon",),
    "della_linear": _GTA_PARAMS + ("epsilon",),
    "model_stock": ("filter_wise",),
    "karcher": ("max_iter", "tol"),
    "sce": ("select_topk", "int8_mask"),
    "passthrough": ("scale",),
    "fourier": ("weight", "lambda", "fr_ratio", "normalize"),
    "nearswap": ("t",),
    "ram": ("epsilon",),
    "ramplus_tl": ("r", "alpha", "epsilon"),
    "arcee_fusion": (),
}


def searchable_parameters(method: str) -> tuple[str, ...]:
    """Parameters of `method` that a search can range over (the numeric ones)."""
    return tuple(name for name in METHOD_PARAMETER_NAMES[method] if METHOD_PARAMETERS[name].kind == "number")


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


@dataclass(frozen=True)
class Issue:
    """A problem found by a validator, relative to the model being validated."""

    subpath: KeyPath
    message: str
    allowed: str | None = None
    missing_key: bool = False  # the key at `subpath` is absent (located at the mapping that should hold it)
    about_key: bool = False  # the key's name is wrong (located at the key, even when its value is included)


class SchemaProblem(ValueError):
    """Raised inside validators; carries precise sub-paths and allowed values through pydantic to ConfigError."""

    def __init__(self, issues: list[Issue]):
        super().__init__("; ".join(issue.message for issue in issues))
        self.issues = issues


def _raise_issues(issues: list[Issue]) -> None:
    if issues:
        raise SchemaProblem(issues)


def _join(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(names)


class StrictModel(BaseModel):
    """Base: strict types (no "3" → 3), no NaN/inf, unknown keys are errors."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    @classmethod
    def allowed_keys_text(cls) -> str:
        """The keys this mapping accepts, for "unknown key" messages."""
        return _join(list(cls.model_fields))


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
        return (f"{_join(list(cls.model_fields))}, or an lm-eval task-config override: "
                f"{_join(list(TASK_OVERRIDE_KEYS))}")

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
        _raise_issues(issues)
        return self


class EvaluationSettings(StrictModel):
    """How merged models are scored (reference: `global_params.evaluation`)."""

    in_memory: bool = Field(True, description="Candidates are copied into a live model and evaluated in memory "
                                              "(false, the reference's write-then-evaluate, is refused: same scores, "
                                              "slower)")
    vllm: bool = Field(False, description="Use vLLM (true) or Hugging Face HFLM (false). The vLLM backend is not "
                                          "in this version yet: true is refused before any model loads")
    enforce_eager: bool = Field(True, description="Passed to vLLM (read only with vllm: true)")
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
        _raise_issues(issues)
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
        _raise_issues(issues)
        return self


# ---------------------------------------------------------------------------------------------------------------
# merge-method parameters: search ranges (lfs, prune) and fixed values (normal_models, normal_slices)


class SearchRange(StrictModel):
    """A searched interval [min, max] for one method parameter."""

    min: float = Field(description="lower end of the searched interval")
    max: float = Field(description="upper end of the searched interval")

    @model_validator(mode="after")
    def _check_order(self) -> "SearchRange":
        if self.min > self.max:
            _raise_issues([Issue((), f"min {_number(self.min)} is greater than max {_number(self.max)}",
                                 "min <= max")])
        return self


MethodRanges = dict[str, Union[dict[str, SearchRange], None]]


def _check_method_ranges(ranges: MethodRanges, allowed_methods: tuple[str, ...]) -> list[Issue]:
    """Method names, parameter names and bounds of `merging_method` search ranges (paths relative to it)."""
    issues = []
    if not ranges:
        issues.append(Issue((), "no merge method given",
                            f"a mapping {{method: {{param: {{min, max}}}}}} with methods from "
                            f"{_join(allowed_methods)}"))
    for method, params in ranges.items():
        if method not in allowed_methods:
            problem = (f"method {method!r} cannot be searched here" if method in MERGE_METHODS
                       else f"unknown merge method {method!r}")
            issues.append(Issue((method,), problem, _join(allowed_methods), about_key=True))
            continue
        searchable = searchable_parameters(method)
        for param, interval in (params or {}).items():
            if param not in searchable:
                issues.append(Issue((method, param), f"unknown parameter {param!r} for method {method}",
                                    _join(searchable) or "(none: this method has no searchable parameters)",
                                    about_key=True))
                continue
            spec = METHOD_PARAMETERS[param]
            for end in ("min", "max"):
                value = getattr(interval, end)
                if not spec.bounds.contains(value):
                    issues.append(Issue((method, param, end),
                                        f"{_number(value)} is out of range for {method}.{param}", str(spec.bounds)))
    return issues


class ParamEntry(StrictModel):
    """One value of a method parameter; the first entry whose `filter` occurs in a tensor name applies, else the
    entry without filter."""

    filter: str | None = Field(None, min_length=1, description="substring of the tensor names this value is for")
    value: bool | int | float | list[float] = Field(
        description="the value; for per-model parameters at method level, a list with one value per source")


ParamValues = dict[str, list[ParamEntry]]


def _expand_scalar_shorthand(params: Any) -> Any:
    """`{param: 0.5}` is shorthand for `{param: [{value: 0.5}]}` (mergekit style). Any non-list is taken as such a
    value, so a wrong one (a string, a mapping) is reported as a bad value rather than as "not a list"."""
    if not isinstance(params, dict):
        return params
    return {name: value if isinstance(value, list) else [{"value": value}] for name, value in params.items()}


def _check_param_values(method: str, params: ParamValues, prefix: KeyPath, *, per_model_only: bool) -> list[Issue]:
    issues = []
    known = METHOD_PARAMETER_NAMES[method]
    if per_model_only:
        known = tuple(name for name in known if METHOD_PARAMETERS[name].per_model)
    for param, entries in params.items():
        path = prefix + (param,)
        if param not in known:
            issues.append(Issue(path, f"unknown parameter {param!r} for method {method}",
                                _join(known) or "(none for this method)", about_key=True))
            continue
        spec = METHOD_PARAMETERS[param]
        if not entries:
            issues.append(Issue(path, "no value given", "a value, or a list of {filter?, value}"))
        unfiltered = [index for index, entry in enumerate(entries) if entry.filter is None]
        if len(unfiltered) > 1:
            issues.append(Issue(path + (unfiltered[1],), "more than one entry without a filter",
                                "at most one fallback entry without filter"))
        filters = [entry.filter for entry in entries if entry.filter is not None]
        for duplicate in sorted({name for name in filters if filters.count(name) > 1}):
            issues.append(Issue(path, f"filter {duplicate!r} given twice", "each filter once"))
        for index, entry in enumerate(entries):
            if not _value_fits(spec, entry.value, allow_list=spec.per_model and not per_model_only):
                allowed = spec.allowed_text()
                if spec.per_model and not per_model_only:
                    allowed += " (or a list of them, one per source)"
                issues.append(Issue(path + (index, "value"), f"bad value {entry.value!r} for {method}.{param}",
                                    allowed))
    return issues


def _value_fits(spec: MethodParam, value: Any, *, allow_list: bool) -> bool:
    if isinstance(value, list):
        return allow_list and bool(value) and all(_value_fits(spec, item, allow_list=False) for item in value)
    if spec.kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if spec.kind == "integer" and not isinstance(value, int):
        return False
    return spec.bounds is None or spec.bounds.contains(float(value))


def _check_method_values(methods: dict[str, ParamValues], prefix: KeyPath = ("merging_method",)) -> list[Issue]:
    if len(methods) != 1:
        return [Issue(prefix, f"exactly one merge method is needed, got {len(methods)}",
                      f"one of {_join(MERGE_METHODS)}")]
    method, params = next(iter(methods.items()))
    if method not in MERGE_METHODS:
        return [Issue(prefix + (method,), f"unknown merge method {method!r}", _join(MERGE_METHODS),
                      about_key=True)]
    return _check_param_values(method, params, prefix + (method,), per_model_only=False)


def _check_source_count(method: str, count: int, path: KeyPath, noun: str) -> list[Issue]:
    """`noun` is singular ("model", "source"); an "s" is added for counts other than 1."""
    low, high = METHOD_SOURCE_COUNTS[method]
    if count < low or (high is not None and count > high):
        plural = noun if (high == low == 1) else noun + "s"
        wanted = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
        return [Issue(path, f"{method} merges {wanted} {plural}, got {count}", f"{wanted} {plural} for {method}")]
    return []


def _check_list_lengths(methods: dict[str, ParamValues], count: int, prefix: KeyPath) -> list[Issue]:
    """Per-model values given as lists at method level need one value per source."""
    issues = []
    for method, params in methods.items():
        for param, entries in params.items():
            for index, entry in enumerate(entries):
                if isinstance(entry.value, list) and len(entry.value) != count:
                    issues.append(Issue(prefix + (method, param, index, "value"),
                                        f"{len(entry.value)} values for {count} sources",
                                        f"a list of exactly {count} values (one per source)"))
    return issues


# ---------------------------------------------------------------------------------------------------------------
# strategy blocks


def _check_model_list(cls: type, models: list[str]) -> list[str]:
    """Field validator body for expert lists: no empty or repeated references (paths relative to the list)."""
    issues = []
    for index, model in enumerate(models):
        if not model.strip():
            issues.append(Issue((index,), "empty model reference", "a model reference"))
        elif models.index(model) != index:
            issues.append(Issue((index,), f"model {model!r} is listed twice", "each model once"))
    _raise_issues(issues)
    return models


_MODEL_REFERENCE = ("a model reference: a hub id (found in the local Hugging Face cache), a local folder, a .gguf file "
                    "(converted once to safetensors in the cache), zoo:NAME, "
                    "or a key of global_params.model_aliases")


class SearchSettings(StrictModel):
    """SMAC settings shared by the search strategies."""

    n_trials: int = Field(ge=0, description="SMAC trials (configuration, budget) to run; 0 = derive from "
                                            "total_budget")
    total_budget: float = Field(0, ge=0, description="Total budget; only used when n_trials is 0")
    min_budget: float = Field(20, gt=0, description="Smallest fidelity: evaluation examples per (sub)task")
    max_budget: float = Field(1000, gt=0, description="Largest fidelity: evaluation examples per (sub)task")
    eta: int = Field(3, ge=2, description="Hyperband eta")
    n_workers: int = Field(4, ge=1, description="Parallel workers (one accelerator each)")
    random_init_points: int = Field(0, ge=0, description="Random configurations added to the initial design")
    optimizer: Literal["hyperband", "successive_halving", "bo", "random", "cmaes"] = Field(
        "hyperband", description="New. hyperband: multi-fidelity BO (SMAC Hyperband over budgets, the default); "
                                 "successive_halving: multi-fidelity BO repeating Hyperband's most aggressive "
                                 "bracket (every new configuration starts at min_budget); "
                                 "bo: BO with every trial at max_budget; random: random search at max_budget; "
                                 "cmaes: CMA-ES over the continuous weights at max_budget, each group's method "
                                 "fixed at the first one listed (lfs only; trials one at a time)")
    dask_scheduler: Optional[str] = Field(
        None, description="New. Address of an existing dask scheduler (e.g. tcp://host:8786) to run trials on "
                          "instead of starting a local cluster of n_workers")
    trial_walltime_limit: Optional[float] = Field(
        None, gt=0, description="New. Seconds after which a trial is stopped and recorded as a timeout")
    queued_per_worker: Union[Literal["auto"], int] = Field(
        1, description="New. With several workers (n_workers > 1 or dask_scheduler): trials queued on each worker "
                       "beyond the one it runs, so that no worker waits while the search picks the next trial; 0: a "
                       "trial goes only to an idle worker. auto: enough to cover the search's slowest recent step "
                       "with the recent trials' length (1 to 16), for trials much shorter than a model refit; a deep "
                       "queue opens more successive-halving brackets at once, so fewer trials reach max_budget")
    run_name: Optional[str] = Field(
        None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
        description="New. Folder name of this run under output_path (default: the strategy): one plain name, "
                    "so the run stays inside output_path")

    @field_validator("queued_per_worker", mode="before")
    @classmethod
    def _check_queue_depth(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 16):
            return value
        _raise_issues([Issue((), f"{_show(value)} is not a queue depth", "auto, or a whole number from 0 to 16")])

    @model_validator(mode="after")
    def _check_budgets(self) -> "SearchSettings":
        issues = []
        if self.min_budget > self.max_budget:
            issues.append(Issue(("min_budget",), f"min_budget {_number(self.min_budget)} is greater than "
                                f"max_budget {_number(self.max_budget)}", "0 < min_budget <= max_budget"))
        if self.n_trials == 0 and self.total_budget <= 0:
            issues.append(Issue(("n_trials",), "n_trials is 0 and total_budget is 0, so nothing would run",
                                "n_trials >= 1, or n_trials: 0 with total_budget > 0"))
        _raise_issues(issues)
        return self


class LfsBlock(SearchSettings):
    """Layer-wise fusion search (`lfs`, and `lfs_multiobj` with one objective per task)."""

    base_model: str = Field(min_length=1, description=f"Base of the task vectors: {_MODEL_REFERENCE}")
    models: list[str] = Field(min_length=1, description="Expert model references; order matters")
    merging_method: MethodRanges = Field(
        description="Searched methods and parameter ranges: {method: {param: {min, max}}}")
    layer_granularity: int = Field(ge=1, description="Layers per group (must divide the base model's depth)")
    filters: list[str] = Field(
        default_factory=list, description="Tensor-name substrings; each is a parameter set searched separately, "
                                          "plus 'base' for every other tensor")

    # Field validators (not one model validator) so that each field's problems are reported even when another
    # field of the block is wrong too.
    _check_models = field_validator("models")(classmethod(_check_model_list))

    @field_validator("merging_method")
    @classmethod
    def _check_ranges(cls, ranges: MethodRanges) -> MethodRanges:
        _raise_issues(_check_method_ranges(ranges, LFS_METHODS))
        return ranges

    @model_validator(mode="after")
    def _check_expert_counts(self):
        """Each method must accept every expert at once (slerp picks a searched pair)."""
        issues = []
        for method in self.merging_method:
            if method in LFS_METHODS and method not in ("slerp", "nuslerp"):
                issues += _check_source_count(method, len(self.models), ("merging_method", method), "expert")
        _raise_issues(issues)
        return self

    @field_validator("filters")
    @classmethod
    def _check_filters(cls, filters: list[str]) -> list[str]:
        issues = []
        for index, name in enumerate(filters):
            if not name:
                issues.append(Issue((index,), "empty filter", "a tensor-name substring"))
            elif name == "base":
                issues.append(Issue((index,), "'base' is the name of the fallback parameter set",
                                    "a tensor-name substring other than 'base'"))
            elif filters.index(name) != index:
                issues.append(Issue((index,), f"filter {name!r} is listed twice", "each filter once"))
        _raise_issues(issues)
        return filters


class DisBlock(SearchSettings):
    """Depth-wise integration search (`dis`): per layer position, which experts' layers to stack, in which order."""

    min_budget: float = Field(100, gt=0, description="Smallest fidelity: evaluation examples per (sub)task")
    n_workers: int = Field(1, ge=1, description="Parallel workers (one accelerator each)")
    base_model: str = Field(min_length=1, description=f"Fallback layers (remain_base): {_MODEL_REFERENCE}")
    models: list[str] = Field(min_length=1, description="Expert model references; list index = block id")
    repeat: int = Field(1, ge=1, description="Copies of each expert's block per position (an expert's layer may "
                                            "appear that many times at one position)")
    remain_base: bool = Field(True, description="Use the base layer where a position selects no block")
    layer_granularity: int = Field(1, ge=1, description="Layers per position (must divide num_hidden_layers - "
                                                        "2 x fix_layers)")
    num_hidden_layers: int = Field(ge=1, description="Depth of the base and expert models")
    fix_layers: int = Field(0, ge=0, description="Layers kept fixed at each end")
    layers: int = Field(50, ge=1, description="Maximum output depth; deeper configurations are not evaluated")
    merging_method: Literal["passthrough"] = Field("passthrough", description="Always passthrough")
    float_block_selection: bool = Field(False, description="Search float block selectors instead of 0/1")
    block_selection_threshold: float = Field(
        0.5, ge=0, le=1, description="With float selectors, a block is selected when its value > threshold")
    scale_filter: str = Field(
        "mlp.down_proj", min_length=1, description="New. The tensor (name substring) of each layer that a "
        "position's output scale multiplies: the MLP output projection, so the scale acts on the MLP branch")

    _check_models = field_validator("models")(classmethod(_check_model_list))

    @model_validator(mode="after")
    def _check_dis(self) -> "DisBlock":
        from auto_merge.strategies.dis import MAX_ORDERINGS, count_orderings

        issues = []
        searched = self.num_hidden_layers - 2 * self.fix_layers
        orderings = count_orderings(len(self.models), self.repeat)
        if orderings > MAX_ORDERINGS:
            issues.append(Issue(("repeat",), f"{len(self.models)} models x repeat {self.repeat} give {orderings} "
                                f"block orderings per position", f"at most {MAX_ORDERINGS} (a smaller repeat)"))
        if 2 * self.fix_layers >= self.num_hidden_layers:
            issues.append(Issue(("fix_layers",), f"{self.fix_layers} fixed layers at each end leave no layer to "
                                f"search in {self.num_hidden_layers}",
                                f"0 <= fix_layers < {(self.num_hidden_layers + 1) // 2}"))
        elif searched % self.layer_granularity:
            divisors = [d for d in range(1, searched + 1) if searched % d == 0]
            issues.append(Issue(("layer_granularity",), f"{self.layer_granularity} does not divide the "
                                f"{searched} searched layers (num_hidden_layers - 2 x fix_layers)",
                                f"one of {divisors}"))
        elif self.remain_base and self.layers < self.num_hidden_layers:
            issues.append(Issue(("layers",), f"with remain_base every configuration has at least "
                                f"{self.num_hidden_layers} layers, more than layers: {self.layers}",
                                f"layers >= num_hidden_layers ({self.num_hidden_layers})"))
        _raise_issues(issues)
        return self


class PruneBlock(SearchSettings):
    """Layer cutting and stitching search (`prune`): which layers to remove, which experts to merge per layer."""

    n_workers: int = Field(1, ge=1, description="Parallel workers (one accelerator each)")
    base_model: str = Field(min_length=1, description=f"Base model: {_MODEL_REFERENCE}")
    models: list[str] = Field(min_length=1, description="Expert model references; list index = candidate id")
    num_hidden_layers: int = Field(ge=1, description="Depth of the base and expert models")
    layers: int = Field(ge=1, description="Target depth; num_hidden_layers - layers layers are removed")
    merging_method: MethodRanges = Field(
        description="Parameter ranges {method: {param: {min, max}}}; task_arithmetic.scaling_coefficient (or "
                    "lambda) is the searched merge scale; other methods are accepted but unused")
    multi_objective: bool = Field(
        False, description="New. true: one objective per task and a Pareto front (ParEGO, as lfs_multiobj); "
                           "false: the aggregate of the tasks")
    scale_filter: str = Field(
        "mlp.down_proj", min_length=1, description="New. The tensor (name substring) of each layer that the layer's "
        "output scale multiplies: the MLP output projection, so the scale acts on the MLP branch")

    _check_models = field_validator("models")(classmethod(_check_model_list))

    @field_validator("merging_method")
    @classmethod
    def _check_ranges(cls, ranges: MethodRanges) -> MethodRanges:
        issues = _check_method_ranges(ranges, MERGE_METHODS)
        scale_params = set(ranges.get("task_arithmetic") or {})
        if not issues and not scale_params & {"scaling_coefficient", "lambda"}:
            issues.append(Issue(("task_arithmetic",), "prune needs the range of the task arithmetic merge scale",
                                "task_arithmetic: {scaling_coefficient: {min, max}}"))
        _raise_issues(issues)
        return ranges

    @model_validator(mode="after")
    def _check_prune(self) -> "PruneBlock":
        if self.layers >= self.num_hidden_layers:
            _raise_issues([Issue(("layers",), f"target depth {self.layers} removes no layer of "
                                 f"{self.num_hidden_layers}", f"1 <= layers < {self.num_hidden_layers}")])
        return self


# `{method: null}` and scalar values are normalised before validation (see _normalise_method_values).
MethodValues = dict[str, ParamValues]


def _normalise_method_values(raw: Any) -> Any:
    """`{method: null}` → `{method: {}}`; scalar parameter values → one unfiltered entry."""
    if not isinstance(raw, dict):
        return raw
    return {method: {} if params is None else _expand_scalar_shorthand(params) for method, params in raw.items()}


class ModelEntry(StrictModel):
    """One input model of a normal_models merge."""

    model: str = Field(min_length=1, description=_MODEL_REFERENCE)
    parameters: ParamValues = Field(
        default_factory=dict, description="Per-model parameters (weight, density, ...): {param: value or "
                                          "[{filter?, value}]}")

    @field_validator("parameters", mode="before")
    @classmethod
    def _expand_parameters(cls, value: Any) -> Any:
        return _expand_scalar_shorthand(value)


class NormalModelsBlock(StrictModel):
    """One merge of whole models (`normal_models`), evaluated once."""

    base_model: str = Field(min_length=1, description=f"Base of the task vectors: {_MODEL_REFERENCE}")
    models: list[ModelEntry] = Field(min_length=1, description="Input models: a list of {model, parameters?}")
    merging_method: MethodValues = Field(
        description="Exactly one method: {method: {param: value or [{filter?, value}]}}")

    @field_validator("merging_method", mode="before")
    @classmethod
    def _expand_merging_method(cls, value: Any) -> Any:
        return _normalise_method_values(value)

    @model_validator(mode="after")
    def _check_values(self) -> "NormalModelsBlock":
        issues = _check_method_values(self.merging_method)
        if not issues:
            method = next(iter(self.merging_method))
            for index, entry in enumerate(self.models):
                issues += _check_param_values(method, entry.parameters, ("models", index, "parameters"),
                                              per_model_only=True)
        _raise_issues(issues)
        return self

    def runnable_issues(self) -> list[Issue]:
        method = next(iter(self.merging_method))
        issues = _check_source_count(method, len(self.models), ("models",), "model")
        return issues + _check_list_lengths(self.merging_method, len(self.models),
                                            ("merging_method",))


class LayerSpan(StrictModel):
    """A model and a half-open layer range [a, b)."""

    model: str = Field(min_length=1, description=_MODEL_REFERENCE)
    layer_range: list[int] = Field(min_length=2, max_length=2, description="[a, b): layers a to b-1, 0 <= a < b")

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]

    @model_validator(mode="after")
    def _check_range(self) -> "LayerSpan":
        start, end = self.layer_range
        if not 0 <= start < end:
            _raise_issues([Issue(("layer_range",), f"[{start}, {end}) is not a layer range", "[a, b] with 0 <= a < b")])
        return self


class SliceSource(LayerSpan):
    """One source of a slice."""

    parameters: ParamValues = Field(
        default_factory=dict, description="Per-model parameters (weight, density, ...) for this source")

    @field_validator("parameters", mode="before")
    @classmethod
    def _expand_parameters(cls, value: Any) -> Any:
        return _expand_scalar_shorthand(value)


class Slice(StrictModel):
    """A run of output layers merged from equally long layer ranges of its sources (docs/reference_format.md)."""

    sources: list[SliceSource] = Field(min_length=1, description="Sources with equally long layer ranges")
    target: LayerSpan | None = Field(None, description="Where the task-vector base layers are read from")
    merging_method: MethodValues = Field(
        description="Exactly one method: {method: {param: value or [{filter?, value}]}}")

    @field_validator("merging_method", mode="before")
    @classmethod
    def _expand_merging_method(cls, value: Any) -> Any:
        return _normalise_method_values(value)

    @model_validator(mode="after")
    def _check_slice(self) -> "Slice":
        issues = []
        first = self.sources[0]
        for index, source in enumerate(self.sources[1:], start=1):
            if source.length != first.length:
                issues.append(Issue(("sources", index, "layer_range"),
                                    f"{source.length} layers, but sources[0] has {first.length}",
                                    f"a range of {first.length} layers, like every source of this slice"))
        if self.target is not None and self.target.length != first.length:
            issues.append(Issue(("target", "layer_range"), f"{self.target.length} layers, but the sources have "
                                f"{first.length}", f"a range of {first.length} layers"))
        issues += _check_method_values(self.merging_method)
        if not issues:
            method = next(iter(self.merging_method))
            for index, source in enumerate(self.sources):
                issues += _check_param_values(method, source.parameters, ("sources", index, "parameters"),
                                              per_model_only=True)
        _raise_issues(issues)
        return self

    def runnable_issues(self) -> list[Issue]:
        method = next(iter(self.merging_method))
        issues = _check_source_count(method, len(self.sources), ("sources",), "source")
        return issues + _check_list_lengths(self.merging_method, len(self.sources),
                                            ("merging_method",))


class NormalSlicesBlock(StrictModel):
    """A given list of slices (`normal_slices`), merged and evaluated once."""

    base_model: str = Field(min_length=1, description=f"Base of the task vectors: {_MODEL_REFERENCE}")
    slices: list[Slice] = Field(min_length=1, description="Slices stacked in order (docs/reference_format.md)")

    def runnable_issues(self) -> list[Issue]:
        return [Issue(("slices", index) + issue.subpath, issue.message, issue.allowed)
                for index, piece in enumerate(self.slices) for issue in piece.runnable_issues()]


StrategyBlock = Union[NormalModelsBlock, NormalSlicesBlock, LfsBlock, DisBlock, PruneBlock]


class StrategyBlocks(StrictModel):
    """Strategy name → its settings. All present blocks are type-checked; only the selected one is run."""

    normal_models: NormalModelsBlock | None = Field(None, description="settings of strategy normal_models")
    normal_slices: NormalSlicesBlock | None = Field(None, description="settings of strategy normal_slices")
    lfs: LfsBlock | None = Field(None, description="settings of strategy lfs")
    lfs_multiobj: LfsBlock | None = Field(None, description="settings of strategy lfs_multiobj")
    dis: DisBlock | None = Field(None, description="settings of strategy dis")
    prune: PruneBlock | None = Field(None, description="settings of strategy prune")


class ExperimentConfig(StrictModel):
    """A whole experiment config: which strategy to run, shared settings, and the strategy blocks."""

    strategy: StrategyName = Field(description=f"Strategy to run: one of {', '.join(STRATEGY_NAMES)}")
    global_params: GlobalParams = Field(default_factory=GlobalParams)
    strategies: StrategyBlocks = Field(description="Strategy name → settings block (may be !include'd)")

    _sources: SourceMap | None = PrivateAttr(default=None)
    _model_paths: dict[str, Path] = PrivateAttr(default_factory=dict)

    @property
    def selected(self) -> StrategyBlock:
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
        block = self.selected
        if block is None:
            present = [name for name in STRATEGY_NAMES if getattr(self.strategies, name) is not None]
            allowed = f"a strategies.{self.strategy} block (present: {', '.join(present) or 'none'})"
            if self.strategy in self.strategies.model_fields_set:  # written, but null or an empty file
                _raise_issues([Issue(("strategies", self.strategy), "the settings block of the selected strategy "
                                     "is empty", allowed)])
            _raise_issues([Issue(("strategies", self.strategy), f"no settings block for the selected strategy "
                                 f"{self.strategy!r}", allowed, missing_key=True)])
        issues = []
        tasks = self.global_params.evaluation.tasks
        # Searches need something to optimise; normal_* with no task only merge (nothing is evaluated).
        needed_tasks = {"lfs_multiobj": 2}.get(self.strategy, 1 if self.strategy in SEARCH_STRATEGIES else 0)
        if getattr(block, "multi_objective", False):
            needed_tasks = 2
        if len(tasks) < needed_tasks:
            issues.append(Issue(("global_params", "evaluation", "tasks"), f"strategy {self.strategy} needs at "
                                f"least {needed_tasks} evaluation task(s), got {len(tasks)}",
                                f"at least {needed_tasks} entries {{task, metric}}"))
        if hasattr(block, "runnable_issues"):
            issues += [Issue(("strategies", self.strategy) + issue.subpath, issue.message, issue.allowed)
                       for issue in block.runnable_issues()]
        if getattr(block, "optimizer", None) == "cmaes" and self.strategy != "lfs":
            issues.append(Issue(("strategies", self.strategy, "optimizer"),
                                f"optimizer cmaes searches continuous merge weights for one objective: it runs the "
                                f"lfs strategy, not {self.strategy}", "hyperband, successive_halving, bo, random"))
        _raise_issues(issues)
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


def validate_experiment_data(data: Any, sources: SourceMap) -> ExperimentConfig:
    """Validate parsed YAML against the schema; any problem → ConfigError naming file, line, key and allowed."""
    try:
        config = ExperimentConfig.model_validate(data)
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
        return f"wrong type: got {_show(given)}", _TYPE_WORDS[kind]
    if kind in _COMPARISONS:
        key, symbol = _COMPARISONS[kind]
        return f"{_show(given)} is out of range", f"a value {symbol} {context.get(key)}"
    if kind == "literal_error":
        return f"{_show(given)} is not an allowed value", str(context.get("expected"))
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
    current: Any = ExperimentConfig
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


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
