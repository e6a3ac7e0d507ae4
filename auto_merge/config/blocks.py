"""The pieces strategy config blocks are built from (each strategy module declares its own block with them):
strict pydantic models, problems with precise key paths (:class:`Issue`), merge-method parameter values and search
ranges checked against the method specs, and the SMAC settings every search block shares (:class:`SearchSettings`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from auto_merge.config.errors import KeyPath
from auto_merge.merge.methods import ParamSpec, get_method, list_methods


@dataclass(frozen=True)
class NumberBounds:
    """An interval with optional open ends; `None` = unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def of(cls, param: ParamSpec) -> "NumberBounds":
        return cls(param.low, param.high, low_open=not param.low_inclusive, high_open=not param.high_inclusive)

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
            parts.append(f"{format_number(self.low)} {'<' if self.low_open else '<='} ")
        parts.append("value")
        if self.high is not None:
            parts.append(f" {'<' if self.high_open else '<='} {format_number(self.high)}")
        text = "".join(parts)
        return "any finite number" if text == "value" else text


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# Merge methods and their parameters come from the method specs (auto_merge/merge/methods, torch-free): a config may
# spell a parameter by its name or an alias (the reference's `scaling_coefficient`, `param_value_mask_rate` ...), and
# a method's model count, ranges and searched parameters are the spec's.


def merge_methods() -> tuple[str, ...]:
    return tuple(list_methods())


def lfs_methods() -> tuple[str, ...]:
    """The methods the LFS search can use (`searchable` in their spec)."""
    return tuple(name for name in list_methods() if get_method(name).searchable)


def config_parameter(method: str, name: str) -> ParamSpec | None:
    """The parameter `name` of `method` as a config may give it (an alias with its own range), or None."""
    spec = get_method(method)
    found = spec.spelled(name)
    if found is not None:
        return found
    if name == "rescale" and spec.has_param("rescale_mode"):  # mergekit's bool spelling of rescale_mode
        return ParamSpec("rescale", "global", bool)
    if name in spec.ignored_params:
        return ParamSpec(name, "global", bool)
    return None


def config_parameter_names(method: str) -> tuple[str, ...]:
    spec = get_method(method)
    names = list(spec.spellings())
    if spec.has_param("rescale_mode"):
        names.append("rescale")
    return tuple(names) + spec.ignored_params


def searchable_parameters(method: str) -> tuple[str, ...]:
    """Names under which a search range may be given for `method`: its searched parameters, their aliases and the
    other keys whose range they take."""
    names: list[str] = []
    for param in get_method(method).params:
        if param.searched is not None:
            names += [param.name, *(alias.name for alias in param.aliases), *param.searched.range_keys]
    return tuple(dict.fromkeys(names))




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


def raise_issues(issues: list[Issue]) -> None:
    if issues:
        raise SchemaProblem(issues)


def join_names(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(names)


class StrictModel(BaseModel):
    """Base: strict types (no "3" → 3), no NaN/inf, unknown keys are errors."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    @classmethod
    def allowed_keys_text(cls) -> str:
        """The keys this mapping accepts, for "unknown key" messages."""
        return join_names(list(cls.model_fields))




# ---------------------------------------------------------------------------------------------------------------
# merge-method parameters: search ranges (lfs, prune) and fixed values (normal_models, normal_slices)


class SearchRange(StrictModel):
    """A searched interval [min, max] for one method parameter."""

    min: float = Field(description="lower end of the searched interval")
    max: float = Field(description="upper end of the searched interval")

    @model_validator(mode="after")
    def _check_order(self) -> "SearchRange":
        if self.min > self.max:
            raise_issues([Issue((), f"min {format_number(self.min)} is greater than max {format_number(self.max)}",
                                 "min <= max")])
        return self


MethodRanges = dict[str, Union[dict[str, SearchRange], None]]


def check_method_ranges(ranges: MethodRanges, allowed_methods: tuple[str, ...]) -> list[Issue]:
    """Method names, parameter names and bounds of `merging_method` search ranges (paths relative to it)."""
    issues = []
    if not ranges:
        issues.append(Issue((), "no merge method given",
                            f"a mapping {{method: {{param: {{min, max}}}}}} with methods from "
                            f"{join_names(allowed_methods)}"))
    for method, params in ranges.items():
        if method not in allowed_methods:
            problem = (f"method {method!r} cannot be searched here" if method in merge_methods()
                       else f"unknown merge method {method!r}")
            issues.append(Issue((method,), problem, join_names(allowed_methods), about_key=True))
            continue
        searchable = searchable_parameters(method)
        for param, interval in (params or {}).items():
            if param not in searchable:
                issues.append(Issue((method, param), f"unknown parameter {param!r} for method {method}",
                                    join_names(searchable) or "(none: this method has no searchable parameters)",
                                    about_key=True))
                continue
            bounds = NumberBounds.of(config_parameter(method, param))
            for end in ("min", "max"):
                value = getattr(interval, end)
                if not bounds.contains(value):
                    issues.append(Issue((method, param, end),
                                        f"{format_number(value)} is out of range for {method}.{param}", str(bounds)))
    return issues


class ParamEntry(StrictModel):
    """One value of a method parameter; the first entry whose `filter` occurs in a tensor name applies, else the
    entry without filter."""

    filter: str | None = Field(None, min_length=1, description="substring of the tensor names this value is for")
    value: bool | int | float | str | list[float] = Field(
        description="the value; for per-model parameters at method level, a list with one value per source")


ParamValues = dict[str, list[ParamEntry]]


def expand_scalar_shorthand(params: Any) -> Any:
    """`{param: 0.5}` is shorthand for `{param: [{value: 0.5}]}` (mergekit style). Any non-list is taken as such a
    value, so a wrong one (a string, a mapping) is reported as a bad value rather than as "not a list"."""
    if not isinstance(params, dict):
        return params
    return {name: value if isinstance(value, list) else [{"value": value}] for name, value in params.items()}


def check_param_values(method: str, params: ParamValues, prefix: KeyPath, *, per_model_only: bool) -> list[Issue]:
    issues = []
    known = config_parameter_names(method)
    if per_model_only:
        known = tuple(name for name in known if config_parameter(method, name).scope == "per_model")
    for param, entries in params.items():
        path = prefix + (param,)
        if param not in known:
            issues.append(Issue(path, f"unknown parameter {param!r} for method {method}",
                                join_names(known) or "(none for this method)", about_key=True))
            continue
        spec = config_parameter(method, param)
        per_model = spec.scope == "per_model"
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
            if not _value_fits(spec, entry.value, allow_list=per_model and not per_model_only):
                allowed = _allowed_text(spec)
                if per_model and not per_model_only:
                    allowed += " (or a list of them, one per source)"
                issues.append(Issue(path + (index, "value"), f"bad value {entry.value!r} for {method}.{param}",
                                    allowed))
    return issues


def _value_fits(spec: ParamSpec, value: Any, *, allow_list: bool) -> bool:
    if isinstance(value, list):
        return allow_list and bool(value) and all(_value_fits(spec, item, allow_list=False) for item in value)
    if spec.is_number and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return False  # a bool is not a number here (the engine would take True as 1)
    if spec.value_type is int and not isinstance(value, int):
        return False
    return spec.contains(value)


def _allowed_text(spec: ParamSpec) -> str:
    if spec.value_type is bool:
        return "true or false"
    if spec.value_type is str:
        return "one of " + ", ".join(spec.choices or ())
    bounds = NumberBounds.of(spec)
    noun = "an integer" if spec.value_type is int else "a number"
    return f"{noun} with {bounds}" if str(bounds) != "any finite number" else noun


def check_method_values(methods: dict[str, ParamValues], prefix: KeyPath = ("merging_method",)) -> list[Issue]:
    if len(methods) != 1:
        return [Issue(prefix, f"exactly one merge method is needed, got {len(methods)}",
                      f"one of {join_names(merge_methods())}")]
    method, params = next(iter(methods.items()))
    if method not in merge_methods():
        return [Issue(prefix + (method,), f"unknown merge method {method!r}", join_names(merge_methods()),
                      about_key=True)]
    return check_param_values(method, params, prefix + (method,), per_model_only=False)


def check_source_count(method: str, count: int, path: KeyPath, noun: str) -> list[Issue]:
    """`noun` is singular ("model", "source"); an "s" is added for counts other than 1."""
    low, high = get_method(method).config_model_count()
    if count < low or (high is not None and count > high):
        plural = noun if (high == low == 1) else noun + "s"
        wanted = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
        return [Issue(path, f"{method} merges {wanted} {plural}, got {count}", f"{wanted} {plural} for {method}")]
    return []


def check_list_lengths(methods: dict[str, ParamValues], count: int, prefix: KeyPath) -> list[Issue]:
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


def check_model_list(cls: type, models: list[str]) -> list[str]:
    """Field validator body for expert lists: no empty or repeated references (paths relative to the list)."""
    issues = []
    for index, model in enumerate(models):
        if not model.strip():
            issues.append(Issue((index,), "empty model reference", "a model reference"))
        elif models.index(model) != index:
            issues.append(Issue((index,), f"model {model!r} is listed twice", "each model once"))
    raise_issues(issues)
    return models


MODEL_REFERENCE = ("a model reference: a hub id (found in the local Hugging Face cache), a local folder, a .gguf file "
                    "(converted once to safetensors in the cache), zoo:NAME, "
                    "or a key of global_params.model_aliases")


class SearchSettings(StrictModel):
    """SMAC settings shared by the search strategies."""

    n_trials: int = Field(ge=0, description="SMAC trials (configuration, budget) to run; 0 = derive from "
                                            "total_budget")
    total_budget: float = Field(0, ge=0, description="Total compute in budget units (one full evaluation = "
                                                     "max_budget); only used when n_trials is 0, to get as many "
                                                     "trials as it pays for")
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
    model_min_results: Union[Literal["bohb"], int] = Field(
        1, description="New. hyperband and successive_halving: SMAC's model learns from the highest budget with at "
                       "least this many results. 1 (SMAC's default): the highest budget with any result, so early in "
                       "a run a handful of full evaluations steer it; bohb: the space's hyperparameters + 1 "
                       "(BOHB's rule); a number: that many")
    promote_ties: bool = Field(
        True, description="New. hyperband and successive_halving: a configuration that scores exactly as the last "
                          "one a rung promotes is promoted too (true, the default); false: SMAC's own cut, which "
                          "breaks such a tie by the order the configurations were sampled in")
    dask_scheduler: Optional[str] = Field(
        None, description="New. Address of an existing dask scheduler (e.g. tcp://host:8786) to run trials on "
                          "instead of starting a local cluster of n_workers")
    trial_walltime_limit: Optional[float] = Field(
        None, gt=0, description="New. Seconds after which a trial is stopped and recorded as a timeout")
    queued_per_worker: Union[Literal["auto"], int] = Field(
        "auto", description="New. With several workers (n_workers > 1 or dask_scheduler): trials queued on each "
                            "worker beyond the one it runs, so that no worker waits while the search picks the next "
                            "trial. auto (default): enough to cover the search's slowest recent step with the recent "
                            "trials' length (1 for trials of minutes, up to 16 for trials of a fraction of a second); "
                            "a number: that many; 0: a trial goes only to an idle worker. A deep queue opens more "
                            "successive-halving brackets at once, so fewer trials may reach max_budget")
    run_name: Optional[str] = Field(
        None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
        description="New. Folder name of this run under output_path (default: the strategy): one plain name, "
                    "so the run stays inside output_path")

    @field_validator("model_min_results", mode="before")
    @classmethod
    def _check_model_min_results(cls, value: Any) -> Any:
        if value == "bohb" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise_issues([Issue((), f"{show_value(value)} is not a number of results", "bohb, or a whole number >= 1")])

    @field_validator("queued_per_worker", mode="before")
    @classmethod
    def _check_queue_depth(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 16):
            return value
        raise_issues([Issue((), f"{show_value(value)} is not a queue depth", "auto, or a whole number from 0 to 16")])

    @model_validator(mode="after")
    def _check_budgets(self) -> "SearchSettings":
        issues = []
        if self.min_budget > self.max_budget:
            issues.append(Issue(("min_budget",), f"min_budget {format_number(self.min_budget)} is greater than "
                                f"max_budget {format_number(self.max_budget)}", "0 < min_budget <= max_budget"))
        if self.n_trials == 0 and self.total_budget <= 0:
            issues.append(Issue(("n_trials",), "n_trials is 0 and total_budget is 0, so nothing would run",
                                "n_trials >= 1, or n_trials: 0 with total_budget > 0"))
        raise_issues(issues)
        return self




# `{method: null}` and scalar values are normalised before validation (see normalise_method_values).
MethodValues = dict[str, ParamValues]


def normalise_method_values(raw: Any) -> Any:
    """`{method: null}` → `{method: {}}`; scalar parameter values → one unfiltered entry."""
    if not isinstance(raw, dict):
        return raw
    return {method: {} if params is None else expand_scalar_shorthand(params) for method, params in raw.items()}




def show_value(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
