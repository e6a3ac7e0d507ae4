"""Merge-method specs and the method registry, torch-free: what a method is called, which parameters it takes (scope,
type, default, range, other spellings, how a search ranges over it) and how many models. Config validation, the LFS
search space, the reference format's translation and the mergekit exporter all read these specs, so a method is
declared once, beside its implementation, with :func:`register_method`.

Parameter rules (see :func:`validate_params`):

- Unknown parameter names are rejected, so that typos do not silently fall back to defaults.
- A per-model parameter given in ``global_params`` is the default for every model, like mergekit's top-level
  ``parameters:``. A value in a model's own dict overrides it.
- A global parameter inside a per-model dict is an error.
- ``rescale: bool`` (mergekit spelling) is accepted as an alias for ``rescale_mode``: true means ``"l1"`` and
  false means ``"none"``.
- :class:`Alias` spellings (the reference implementation's ``scaling_coefficient``, ``param_value_mask_rate`` ...) are
  translated at the edges (configs, reference recipes), never here: the engine speaks only the canonical names.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

Scope = Literal["global", "per_model"]
BaseUsage = Literal["required", "optional", "none"]
# How sparsifying methods rescale the entries they keep (mergekit's rescale: true is "l1").
RESCALE_MODES = ("none", "l1", "inverse_p")
# mergekit options that change memory use only: accepted by the task-vector methods and otherwise ignored.
MEMORY_ONLY_PARAMS = ("int8_mask",)

_MISSING = object()


class ParamError(ValueError):
    """A method parameter is unknown, missing or out of range. ``param`` names it and ``model_index`` says which
    non-base model's value it is (None: a recipe-wide value), so a caller can point at the key it came from."""

    def __init__(self, message: str, *, param: str | None = None, model_index: int | None = None):
        super().__init__(message)
        self.param = param
        self.model_index = model_index


@dataclass(frozen=True)
class Alias:
    """Another spelling of a parameter (the reference implementation's): ``name``, and with ``complement`` a value v
    given under it means 1 - v (the reference's TIES mask rate r is the density 1 - r)."""

    name: str
    complement: bool = False

    def to_canonical(self, value: float) -> float:
        return 1.0 - value if self.complement else value


@dataclass(frozen=True)
class Searched:
    """How the LFS search ranges over a parameter: its ``default`` interval, whether each expert gets its own value
    (``per_expert``; else one value shared by the experts of a group), other parameters whose configured range gives
    this one's (``range_keys``: task arithmetic searches per-expert weights within the range given for λ, as the
    reference searched one λ), and an interval the sampled value is clipped into (``clip``)."""

    default: tuple[float, float]
    per_expert: bool = False
    range_keys: tuple[str, ...] = ()
    clip: tuple[float, float] | None = None


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter.

    ``value_type`` is bool, int, float or str. For numbers, ``low``/``high`` bound the value and the
    ``*_inclusive`` flags say whether the bound itself is allowed. For str, ``choices`` lists the allowed values.
    ``allow_none`` lets None mean "not set" (passthrough's ``scale``). ``aliases`` are other accepted spellings;
    ``searched`` says how LFS searches it (None: not searched, it keeps its default or a fixed value).
    """

    name: str
    scope: Scope
    value_type: type
    default: Any = None
    required: bool = False
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    choices: tuple[str, ...] | None = None
    allow_none: bool = False
    doc: str = ""
    aliases: tuple[Alias, ...] = ()
    searched: Searched | None = None

    @property
    def is_number(self) -> bool:
        return self.value_type in (int, float)

    def allowed(self) -> str:
        """Human-readable description of the allowed values, used in error messages."""
        if self.value_type is bool:
            text = "true or false"
        elif self.value_type is str:
            text = "one of " + ", ".join(repr(choice) for choice in self.choices or ())
        else:
            kind = "an integer" if self.value_type is int else "a finite real number"
            if self.low is None and self.high is None:
                text = kind
            elif self.high is None:
                text = f"{kind} {'>=' if self.low_inclusive else '>'} {self.low}"
            elif self.low is None:
                text = f"{kind} {'<=' if self.high_inclusive else '<'} {self.high}"
            else:
                left = "[" if self.low_inclusive else "("
                right = "]" if self.high_inclusive else ")"
                text = f"{kind} in {left}{self.low}, {self.high}{right}"
        return text + (" (or None)" if self.allow_none else "")

    def under_alias(self, alias: Alias) -> "ParamSpec":
        """This parameter as spelled by ``alias``: with a complement, the range is mirrored (density (0, 1] is a
        mask rate in [0, 1))."""
        if not alias.complement:
            return _replace(self, name=alias.name, aliases=())
        return _replace(self, name=alias.name, aliases=(),
                        low=None if self.high is None else 1.0 - self.high,
                        high=None if self.low is None else 1.0 - self.low,
                        low_inclusive=self.high_inclusive, high_inclusive=self.low_inclusive,
                        default=None if self.default is None else 1.0 - self.default)

    def contains(self, value: Any) -> bool:
        try:
            self.coerce(value, "")
        except ParamError:
            return False
        return True

    def coerce(self, value: Any, where: str, model_index: int | None = None) -> Any:
        """Return ``value`` converted to the parameter's type; raise ParamError naming the parameter and its range."""

        def reject(reason: str) -> ParamError:
            return ParamError(f"{where}: parameter '{self.name}' {reason}; allowed: {self.allowed()}",
                              param=self.name, model_index=model_index)

        if value is None:
            if self.allow_none:
                return None
            raise reject("must not be None")
        if self.value_type is bool:
            if not isinstance(value, bool):
                raise reject(f"must be a bool, got {value!r}")
            return value
        if self.value_type is str:
            if not isinstance(value, str) or value not in (self.choices or ()):
                raise reject(f"got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise reject(f"must be a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise reject(f"must be finite, got {value!r}")
        if self.value_type is int:
            if number != math.floor(number):
                raise reject(f"must be an integer, got {value!r}")
            number = int(number)
        if self.low is not None and (number < self.low or (number == self.low and not self.low_inclusive)):
            raise reject(f"is out of range: {value!r}")
        if self.high is not None and (number > self.high or (number == self.high and not self.high_inclusive)):
            raise reject(f"is out of range: {value!r}")
        return number


def _replace(spec: ParamSpec, **changes: Any) -> ParamSpec:
    return dataclasses.replace(spec, **changes)


@dataclass(frozen=True)
class ResolvedParams:
    """Validated parameters with every default filled in."""

    method: str
    global_params: Mapping[str, Any]
    per_model_params: tuple[Mapping[str, Any], ...]

    def per_model(self, name: str) -> list[Any]:
        """The values of one per-model parameter, in model order."""
        return [params[name] for params in self.per_model_params]


CrossCheck = Callable[[ResolvedParams], None]


@dataclass(frozen=True)
class MethodSpec:
    """Description of a registered merge method.

    ``min_models``/``max_models`` count the non-base tensors (``max_models`` None = unbounded). When a tensor exists
    only in the base model, the engine copies it unchanged; mergekit does the same for a lone input.
    ``cross_check`` validates constraints that involve several parameters.

    How configs and searches use it:

    - ``first_source_is_base``: a config lists the method's models as sources and the first is the base (slerp goes
      from its first model, t = 0, to its second); a config then gives one model more than ``max_models``.
    - ``searchable``: the LFS search can use it (it merges a group's experts at once; with
      ``first_source_is_base`` the search picks a pair of experts).
    - ``search_fixed``: values the LFS search fixes rather than searches (the TIES family's per-expert weight 1:
      their strength is λ).
    - ``ignored_params``: other tools' options accepted and ignored (mergekit's ``int8_mask``, which only saves
      memory there).
    """

    name: str
    function: Callable[..., Any] = field(repr=False)
    params: tuple[ParamSpec, ...]
    base_model: BaseUsage
    min_models: int
    max_models: int | None
    is_random: bool
    summary: str
    cross_check: CrossCheck | None = field(default=None, repr=False)
    first_source_is_base: bool = False
    searchable: bool = True
    search_fixed: Mapping[str, Any] = field(default_factory=dict)
    ignored_params: tuple[str, ...] = ()

    @property
    def requires_base(self) -> bool:
        return self.base_model == "required"

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def has_param(self, name: str) -> bool:
        return any(spec.name == name for spec in self.params)

    @property
    def global_param_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.params if spec.scope == "global")

    @property
    def per_model_param_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.params if spec.scope == "per_model")

    def spellings(self) -> dict[str, tuple[ParamSpec, Alias | None]]:
        """Every accepted spelling → (the canonical parameter, the alias used or None)."""
        names: dict[str, tuple[ParamSpec, Alias | None]] = {}
        for spec in self.params:
            names[spec.name] = (spec, None)
            for alias in spec.aliases:
                names[alias.name] = (spec, alias)
        return names

    def spelled(self, name: str) -> ParamSpec | None:
        """The parameter as spelled ``name`` (its range mirrored for a complement alias), or None if unknown."""
        found = self.spellings().get(name)
        if found is None:
            return None
        spec, alias = found
        return spec if alias is None else spec.under_alias(alias)

    def config_model_count(self) -> tuple[int, int | None]:
        """How many models a config lists for it: the non-base models, plus the base when the first source is it."""
        extra = 1 if self.first_source_is_base else 0
        return self.min_models + extra, None if self.max_models is None else self.max_models + extra

    def describe_model_count(self) -> str:
        return describe_count(self.min_models, self.max_models)


def describe_count(low: int, high: int | None) -> str:
    if high is None:
        return f"at least {low}"
    if high == low:
        return f"exactly {low}"
    return f"{low} to {high}"


_REGISTRY: dict[str, MethodSpec] = {}
METHODS: Mapping[str, MethodSpec] = MappingProxyType(_REGISTRY)


def register_method(
    name: str,
    *,
    params: Sequence[ParamSpec],
    base_model: BaseUsage,
    min_models: int,
    max_models: int | None,
    is_random: bool = False,
    summary: str = "",
    cross_check: CrossCheck | None = None,
    first_source_is_base: bool = False,
    searchable: bool = True,
    search_fixed: Mapping[str, Any] | None = None,
    ignored_params: Sequence[str] = (),
) -> Callable[[Callable], Callable]:
    """Decorator that registers ``function(inputs: MergeInputs) -> Tensor`` under ``name`` with its spec. The
    function gets fp32 tensors and returns an fp32 tensor. Registering a name twice is an error; so are a parameter
    or alias declared twice and a fixed search value outside its parameter's range."""

    def decorate(function: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        spellings = [spec.name for spec in params] + [alias.name for spec in params for alias in spec.aliases]
        if len(spellings) != len(set(spellings)):
            raise ValueError(f"merge method {name!r} declares a parameter or alias twice: {spellings}")
        by_name = {spec.name: spec for spec in params}
        for fixed, value in (search_fixed or {}).items():
            if fixed not in by_name:
                raise ValueError(f"merge method {name!r}: search_fixed names unknown parameter {fixed!r}")
            by_name[fixed].coerce(value, f"merge method {name!r} search_fixed")
        _REGISTRY[name] = MethodSpec(
            name=name,
            function=function,
            params=tuple(params),
            base_model=base_model,
            min_models=min_models,
            max_models=max_models,
            is_random=is_random,
            summary=summary or (function.__doc__ or "").strip().split("\n")[0],
            cross_check=cross_check,
            first_source_is_base=first_source_is_base,
            searchable=searchable,
            search_fixed=MappingProxyType(dict(search_fixed or {})),
            ignored_params=tuple(ignored_params),
        )
        return function

    return decorate


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``. Raises ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known methods: {', '.join(list_methods())}") from None


def _apply_rescale_alias(spec: MethodSpec, params: dict[str, Any], where: str, model_index: int | None = None) -> None:
    """Translate mergekit's ``rescale: bool`` into ``rescale_mode`` in place."""
    if "rescale" not in params or not spec.has_param("rescale_mode"):
        return
    flag = params.pop("rescale")
    if not isinstance(flag, bool):
        raise ParamError(f"{where}: parameter 'rescale' must be a bool, got {flag!r}; allowed: true or false",
                         param="rescale", model_index=model_index)
    translated = "l1" if flag else "none"
    if "rescale_mode" in params and (params["rescale_mode"] == "none") == flag:
        raise ParamError(
            f"{where}: 'rescale'={flag} contradicts 'rescale_mode'={params['rescale_mode']!r}; give only rescale_mode",
            param="rescale", model_index=model_index)
    params.setdefault("rescale_mode", translated)


def validate_params(
    method_name: str,
    global_params: Mapping[str, Any] | None = None,
    per_model_params: Sequence[Mapping[str, Any] | None] | None = None,
) -> ResolvedParams:
    """Validate parameters against the method's spec and fill in defaults.

    ``per_model_params`` holds one dict per non-base model, in config order. Its length is the model count and is
    checked against the spec. Raises ValueError naming the method, the parameter (and the model index for per-model
    values) and the allowed values or range.
    """
    spec = get_method(method_name)
    global_given = dict(global_params or {})
    _apply_rescale_alias(spec, global_given, f"{method_name} (global)")
    model_dicts = [dict(params or {}) for params in (per_model_params or [])]
    model_count = len(model_dicts)
    if model_count < spec.min_models or (spec.max_models is not None and model_count > spec.max_models):
        raise ValueError(
            f"{method_name}: takes {spec.describe_model_count()} non-base model(s), got {model_count}"
        )

    known = {param.name: param for param in spec.params}
    for name in global_given:
        if name not in known:
            raise ParamError(
                f"{method_name}: unknown parameter {name!r}; known parameters: {', '.join(known) or 'none'}",
                param=name)

    resolved_global: dict[str, Any] = {}
    for name in spec.global_param_names:
        param = known[name]
        value = global_given.get(name, _MISSING)
        if value is _MISSING:
            if param.required:
                raise ParamError(f"{method_name}: missing required parameter {name!r}; allowed: {param.allowed()}",
                                 param=name)
            value = param.default
        resolved_global[name] = param.coerce(value, method_name)

    resolved_models: list[dict[str, Any]] = []
    for index, given in enumerate(model_dicts):
        where = f"{method_name} (model {index})"
        _apply_rescale_alias(spec, given, where, index)
        for name in given:
            if name not in known:
                raise ParamError(
                    f"{where}: unknown parameter {name!r}; known parameters: {', '.join(known) or 'none'}",
                    param=name, model_index=index)
            if known[name].scope == "global":
                raise ParamError(f"{where}: parameter {name!r} is global and cannot be set per model",
                                 param=name, model_index=index)
        resolved: dict[str, Any] = {}
        for name in spec.per_model_param_names:
            param = known[name]
            value = given.get(name, global_given.get(name, _MISSING))
            if value is _MISSING:
                if param.required:
                    raise ParamError(f"{where}: missing required parameter {name!r}; allowed: {param.allowed()}",
                                     param=name, model_index=index)
                value = param.default
            resolved[name] = param.coerce(value, where, index)
        resolved_models.append(resolved)

    result = ResolvedParams(
        method=method_name,
        global_params=MappingProxyType(resolved_global),
        per_model_params=tuple(MappingProxyType(params) for params in resolved_models),
    )
    if spec.cross_check is not None:
        spec.cross_check(result)
    return result
