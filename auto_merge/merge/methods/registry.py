"""Merge-method registry: parameter specs, validation, and the uniform per-tensor entry point ``merge_tensor``.

A method is a pure function over tensors. It is registered under its name together with a :class:`MethodSpec`.
The spec lists the method's parameters (:class:`ParamSpec`: scope, type, default, range, whether required),
whether a base model is required, optional or not accepted, how many non-base inputs it takes, and whether it is
random. Method functions receive a :class:`MergeInputs` and return an fp32 tensor.

Parameter rules (see :func:`validate_params`):

- Unknown parameter names are rejected, so that typos do not silently fall back to defaults.
- A per-model parameter given in ``global_params`` is the default for every model, like mergekit's top-level
  ``parameters:``. A value in a model's own dict overrides it.
- A global parameter inside a per-model dict is an error.
- ``rescale: bool`` (mergekit spelling) is accepted as an alias for ``rescale_mode``: true means ``"l1"`` and
  false means ``"none"``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from auto_merge.merge.sparsify import derive_generator

Scope = Literal["global", "per_model"]
BaseUsage = Literal["required", "optional", "none"]

_MISSING = object()


class ParamError(ValueError):
    """A method parameter is unknown, missing or out of range. ``param`` names it and ``model_index`` says which
    non-base model's value it is (None: a recipe-wide value), so a caller can point at the key it came from."""

    def __init__(self, message: str, *, param: str | None = None, model_index: int | None = None):
        super().__init__(message)
        self.param = param
        self.model_index = model_index


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter.

    ``value_type`` is bool, int, float or str. For numbers, ``low``/``high`` bound the value and the
    ``*_inclusive`` flags say whether the bound itself is allowed. For str, ``choices`` lists the allowed values.
    ``allow_none`` lets None mean "not set" (passthrough's ``scale``).
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
class MergeInputs:
    """What a method function receives: fp32 tensors on one device, resolved parameters and the random context."""

    tensors: tuple[Tensor, ...]
    base: Tensor | None
    params: ResolvedParams
    seed: int = 0
    tensor_name: str = ""
    # Where the method may write its fp32 result (same shape and device as the inputs, contiguous, sharing no memory
    # with them); None: allocate. A method that ignores it is fine: merge_tensor copies its result in.
    out: Tensor | None = None

    def param(self, name: str) -> Any:
        return self.params.global_params[name]

    def per_model(self, name: str) -> list[Any]:
        return self.params.per_model(name)

    def generator(self, model_index: int) -> torch.Generator:
        """The stable per-(seed, tensor name, model index) generator for random methods."""
        device = (self.base if self.base is not None else self.tensors[0]).device
        return derive_generator(self.seed, self.tensor_name, model_index, device)

    def generators(self) -> list[torch.Generator]:
        return [self.generator(index) for index in range(len(self.tensors))]


@dataclass(frozen=True)
class MethodSpec:
    """Description of a registered merge method.

    ``min_models``/``max_models`` count the non-base tensors (``max_models`` None = unbounded). When a tensor exists
    only in the base model, the engine copies it unchanged; mergekit does the same for a lone input.
    ``cross_check`` validates constraints that involve several parameters.
    """

    name: str
    function: Callable[[MergeInputs], Tensor] = field(repr=False)
    params: tuple[ParamSpec, ...]
    base_model: BaseUsage
    min_models: int
    max_models: int | None
    is_random: bool
    summary: str
    cross_check: CrossCheck | None = field(default=None, repr=False)

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

    def describe_model_count(self) -> str:
        if self.max_models is None:
            return f"at least {self.min_models}"
        if self.max_models == self.min_models:
            return f"exactly {self.min_models}"
        return f"{self.min_models} to {self.max_models}"


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
) -> Callable[[Callable[[MergeInputs], Tensor]], Callable[[MergeInputs], Tensor]]:
    """Decorator that registers ``function`` under ``name``. Registering a name twice is an error."""

    def decorate(function: Callable[[MergeInputs], Tensor]) -> Callable[[MergeInputs], Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        names = [spec.name for spec in params]
        if len(names) != len(set(names)):
            raise ValueError(f"merge method {name!r} declares a parameter twice: {names}")
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


def common_submatrix(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Truncate tensors of equal rank to their common leading block ``[min rows, min cols, ...]``.

    This is mergekit's rule for inputs of different vocabulary sizes, meant for embeddings (``embed_tokens``, ``lm_head``) when no
    tokenizer alignment is configured. The method layer does not know which tensors are embeddings, so the engine
    calls this explicitly and logs it. Views are returned and nothing is copied.
    """
    if not tensors:
        return []
    ranks = {tensor.dim() for tensor in tensors}
    if len(ranks) != 1:
        raise ValueError(f"cannot truncate tensors of different rank: shapes {[tuple(t.shape) for t in tensors]}")
    common = [min(sizes) for sizes in zip(*(tensor.shape for tensor in tensors))]
    return [tensor[tuple(slice(0, size) for size in common)] for tensor in tensors]


def _as_fp32(tensor: Tensor, label: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{label} must be a floating-point tensor, got {tensor.dtype}")
    return tensor.to(torch.float32)


def merge_tensor(
    method_name: str,
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    global_params: Mapping[str, Any] | None = None,
    per_model_params: Sequence[Mapping[str, Any] | None] | None = None,
    *,
    seed: int = 0,
    tensor_name: str = "",
    out: Tensor | None = None,
) -> Tensor:
    """Merge one tensor name across models and return the fp32 result on the inputs' device.

    ``tensors`` are the non-base models' tensors in config order. ``per_model_params`` gives one dict per entry of
    ``tensors``; None or an empty sequence means defaults for all of them. ``seed`` and ``tensor_name`` seed random
    methods. All tensors must have the same shape and device; for embeddings of different vocab sizes, apply
    :func:`common_submatrix` first. ``out`` (optional, of the inputs' shape, any floating dtype): the result is written
    there (cast to its dtype) and ``out`` is returned; an fp32 ``out`` that shares no memory with the inputs is
    handed to the method, which may compute straight into it (no result-sized allocation).
    """
    spec = get_method(method_name)
    tensors = list(tensors)
    if not per_model_params:  # None or empty: every model takes the defaults (and global_params' per-model values)
        per_model_params = [{} for _ in tensors]
    if len(per_model_params) != len(tensors):
        raise ValueError(
            f"{method_name}: got {len(tensors)} tensors but {len(per_model_params)} per-model parameter dicts"
        )
    if base is None and spec.base_model == "required":
        raise ValueError(f"{method_name}: requires a base model tensor")
    if base is not None and spec.base_model == "none":
        raise ValueError(
            f"{method_name}: does not take a base model; pass base=None "
            "(list the base among `tensors`, with its own parameters, if it should contribute)"
        )
    params = validate_params(method_name, global_params, per_model_params)

    inputs = [_as_fp32(tensor, f"{method_name}: tensor {index}") for index, tensor in enumerate(tensors)]
    base_fp32 = _as_fp32(base, f"{method_name}: base") if base is not None else None
    reference = base_fp32 if base_fp32 is not None else inputs[0]
    for index, tensor in enumerate(inputs):
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{method_name}: tensor {index} of {tensor_name or 'this tensor'} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(reference.shape)}; truncate embeddings with common_submatrix() or skip the model"
            )
        if tensor.device != reference.device:
            raise ValueError(f"{method_name}: tensor {index} is on {tensor.device}, expected {reference.device}")

    if out is not None and tuple(out.shape) != tuple(reference.shape):
        raise ValueError(f"{method_name}: out has shape {tuple(out.shape)}, expected {tuple(reference.shape)}")
    scratch = None
    if out is not None and out.dtype == torch.float32 and out.is_contiguous() and out.device == reference.device \
            and not any(_shares_memory(out, tensor) for tensor in (*inputs, base_fp32) if tensor is not None):
        scratch = out
    result = spec.function(
        MergeInputs(tensors=tuple(inputs), base=base_fp32, params=params, seed=seed, tensor_name=tensor_name,
                    out=scratch)
    )
    if out is None:
        return result.to(torch.float32)
    if result is not out:
        out.copy_(result)
    return out


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors' storages overlap (conservative: whole storages are compared)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.data_ptr() < sb.data_ptr() + sb.nbytes() and sb.data_ptr() < sa.data_ptr() + sa.nbytes()
