"""One-shot strategies `normal_models` and `normal_slices`: a merge written out in the config, made once (no search).

This module declares their config blocks (`NormalModelsBlock`, `NormalSlicesBlock`) and translates: a validated
block in, a merge recipe (plain data in the engine's schema, `auto_merge.merge.recipe`) out. It
knows model references, never how tensors are loaded; `auto_merge.search.oneshot` runs the recipe.

The blocks use the reference implementation's spelling (docs/reference_format.md); the recipe uses
the engine's:

- `normal_models` → a `models:` recipe (every layer of every model) with `merge_method` and recipe-wide parameters;
  `normal_slices` → a `slices:` recipe, each slice with its own `merge_method`, stacked in order (output depth =
  sum of the slice lengths).
- Parameter names: each method's aliases in its spec (`weights` → `weight`, `scaling_coefficient` → `lambda`,
  `slerp_t` → `t`, and the TIES trim rate `param_value_mask_rate` r → `density` 1 - r). Filters (`[{filter, value}]`)
  are kept as they are.
- Per-model `parameters` (on a `models` entry or a slice source) stay with that model (the reference dropped them).
  A per-model parameter given at method level as a list holds one value per model, in order: each model gets its
  own (a model's own `parameters` win). Scalars at method level apply to every model.
- A method that weights its models (linear, task arithmetic, TIES, DARE, DELLA, ...) and is given no weight gets
  weight 1 for every model: task arithmetic and TIES then add whole task vectors (θ_base + λ·Σ τ_i, as the
  reference does), linear averages.
- `slerp` interpolates from its first model (t = 0) to its second (t = 1): the first is the slerp's base (so a
  slerp slice takes no `target`).
- A slice's `target: {model, layer_range}` says where its task vectors' base layers are read: `base_layer_range` of
  the recipe slice (the reference read the base at the output index instead). Without a target the engine reads the
  base at the sources' own layer index (so the sources of such a slice must start at the same layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from auto_merge.config.blocks import (
    MODEL_REFERENCE,
    Issue,
    MethodValues,
    ParamValues,
    StrictModel,
    check_list_lengths,
    check_method_values,
    check_param_values,
    check_source_count,
    expand_scalar_shorthand,
    normalise_method_values,
    raise_issues,
)
from auto_merge.errors import AutoMergeError
from auto_merge.merge.methods import Alias, get_method
from auto_merge.strategies.registry import register_strategy

ONESHOT_STRATEGIES: tuple[str, ...] = ("normal_models", "normal_slices")
DEFAULT_WEIGHT = 1.0

KeyPath = tuple[str | int, ...]


class OneShotError(AutoMergeError, ValueError):
    """A block that validates but cannot be turned into one recipe; `key_path` is relative to the block."""

    def __init__(self, key_path: KeyPath, message: str, allowed: str | None = None):
        super().__init__(message)
        self.key_path = key_path
        self.message = message
        self.allowed = allowed


def block_to_recipe(strategy: str, block) -> dict:
    """The recipe (engine schema, plain data) a `normal_models` or `normal_slices` block describes."""
    if strategy == "normal_models":
        return normal_models_recipe(block)
    if strategy == "normal_slices":
        return normal_slices_recipe(block)
    raise ValueError(f"{strategy!r} is not a one-shot strategy; one-shot: {', '.join(ONESHOT_STRATEGIES)}")


def normal_models_recipe(block) -> dict:
    method, method_params = _only_method(block.merging_method)
    models = [entry.model for entry in block.models]
    sources, shared = _translate(method, method_params, [entry.parameters for entry in block.models],
                                 ("merging_method", method), [("models", i, "parameters") for i in range(len(models))])
    recipe: dict[str, Any] = {"base_model": block.base_model, "merge_method": method}
    if method == "slerp":
        recipe["base_model"] = models[0]  # t = 0 is the first model, t = 1 the second
    recipe["models"] = [_source(model, None, params) for model, params in zip(models, sources)]
    if shared:
        recipe["parameters"] = shared
    return recipe


def normal_slices_recipe(block) -> dict:
    slices = []
    for index, piece in enumerate(block.slices):
        method, method_params = _only_method(piece.merging_method)
        sources, shared = _translate(
            method, method_params, [source.parameters for source in piece.sources],
            ("slices", index, "merging_method", method),
            [("slices", index, "sources", j, "parameters") for j in range(len(piece.sources))])
        out: dict[str, Any] = {
            "merge_method": method,
            "sources": [_source(source.model, source.layer_range, params)
                        for source, params in zip(piece.sources, sources)],
        }
        if method == "slerp":
            if piece.target is not None:
                raise OneShotError(("slices", index, "target"), "slerp interpolates from its first source to its "
                                   "second; it takes no task-vector base", "no target on a slerp slice")
            first = piece.sources[0]
            out["base_model"], out["base_layer_range"] = first.model, list(first.layer_range)
        elif piece.target is not None:
            out["base_model"], out["base_layer_range"] = piece.target.model, list(piece.target.layer_range)
        if shared:
            out["parameters"] = shared
        slices.append(out)
    return {"base_model": block.base_model, "slices": slices}


def input_models(block) -> list[str]:
    """Every model a block names, base first, each once, in order of first mention."""
    refs = [block.base_model]
    if hasattr(block, "slices"):
        for piece in block.slices:
            refs += [source.model for source in piece.sources]
            if piece.target is not None:
                refs.append(piece.target.model)
    else:
        refs += [entry.model for entry in block.models]
    return list(dict.fromkeys(refs))


@dataclass(frozen=True)
class OneShotMerge:
    """A one-shot strategy: its name, its models and its one recipe (`describe()` is stored with the run)."""

    name: str
    base_model: str
    models: tuple[str, ...]  # the models merged, besides the base, in order of first mention
    recipe: dict

    @classmethod
    def from_block(cls, strategy: str, block) -> "OneShotMerge":
        refs = input_models(block)
        return cls(name=strategy, base_model=block.base_model, models=tuple(refs[1:]),
                   recipe=block_to_recipe(strategy, block))

    def describe(self) -> dict:
        return {"strategy": self.name, "base_model": self.base_model, "models": list(self.models),
                "recipe": self.recipe}


# ---------------------------------------------------------------------------------------------------- helpers


def _only_method(methods: Mapping[str, Mapping]) -> tuple[str, Mapping]:
    (method, params), = methods.items()  # the schema guarantees exactly one
    return method, params


def _source(model: str, layer_range: Sequence[int] | None, params: dict) -> dict:
    data: dict[str, Any] = {"model": model}
    if layer_range is not None:
        data["layer_range"] = list(layer_range)
    if params:
        data["parameters"] = params
    return data


def _entries(entries, *, alias: Alias | None = None, pick: int | None = None) -> Any:
    """Schema ParamEntry list → recipe data: a lone unfiltered value as itself, else [{filter?, value}].
    `pick`: the value of one model out of a per-model list (scalars apply to every model)."""
    out = []
    for entry in entries:
        value = entry.value
        if isinstance(value, list):
            value = value[pick] if pick is not None else list(value)
        if alias is not None:
            value = alias.to_canonical(value)
        out.append({"value": value} if entry.filter is None else {"filter": entry.filter, "value": value})
    if len(out) == 1 and "filter" not in out[0]:
        return out[0]["value"]
    return out


def _renamed(method: str, params: Mapping[str, Sequence], where: KeyPath) -> dict[str, tuple[str, Alias | None,
                                                                                             bool, Sequence]]:
    """Engine name → (the name written in the config, the alias it is, whether it is per model, its entries); two
    spellings of one parameter are an error. Names the spec does not know (mergekit's `rescale`, `int8_mask`) pass
    through for the recipe to handle."""
    spellings = get_method(method).spellings()
    found: dict[str, tuple[str, Alias | None, bool, Sequence]] = {}
    for name, entries in params.items():
        param, alias = spellings.get(name, (None, None))
        target = param.name if param is not None else name
        if target in found:
            raise OneShotError(where + (name,), f"{found[target][0]!r} and {name!r} both set {target}",
                               f"one of {found[target][0]}, {name}")
        found[target] = (name, alias, param is not None and param.scope == "per_model", entries)
    return found


def _translate(method: str, method_params: Mapping[str, Sequence], model_params: list[Mapping[str, Sequence]],
               method_where: KeyPath, model_wheres: list[KeyPath]) -> tuple[list[dict], dict]:
    """(per-model parameters, shared parameters) in engine names for one method block and its models."""
    per_model: list[dict] = []
    for params, where in zip(model_params, model_wheres):
        own = _renamed(method, params, where)
        per_model.append({target: _entries(entries, alias=alias) for target, (_, alias, _, entries) in own.items()})
    shared: dict[str, Any] = {}
    for target, (_, alias, is_per_model, entries) in _renamed(method, method_params, method_where).items():
        if is_per_model and any(isinstance(e.value, list) for e in entries):
            # one value per model, in order: each model gets its own
            for index, params in enumerate(per_model):
                params.setdefault(target, _entries(entries, alias=alias, pick=index))
        else:
            shared[target] = _entries(entries, alias=alias)
    weighted = get_method(method).has_param("weight")
    if weighted and "weight" not in shared and not all("weight" in p for p in per_model):
        shared["weight"] = DEFAULT_WEIGHT
    return per_model, shared


# ---------------------------------------------------------------------------------------------------- the config


def _per_source_issues(merging_method: MethodValues, parameter_sets: list[ParamValues], key: str) -> list[Issue]:
    """Each source's own parameters checked against the (one, valid) method: per-model ones only."""
    method = next(iter(merging_method))
    return [issue for index, parameters in enumerate(parameter_sets)
            for issue in check_param_values(method, parameters, (key, index, "parameters"), per_model_only=True)]


def _count_issues(merging_method: MethodValues, count: int, key: str, noun: str) -> list[Issue]:
    """The method takes this many sources, and its per-source value lists have one value each."""
    method = next(iter(merging_method))
    return check_source_count(method, count, (key,), noun) + check_list_lengths(merging_method, count,
                                                                                ("merging_method",))


class ModelEntry(StrictModel):
    """One input model of a normal_models merge."""

    model: str = Field(min_length=1, description=MODEL_REFERENCE)
    parameters: ParamValues = Field(
        default_factory=dict, description="Per-model parameters (weight, density, ...): {param: value or "
                                          "[{filter?, value}]}")

    @field_validator("parameters", mode="before")
    @classmethod
    def _expand_parameters(cls, value: Any) -> Any:
        return expand_scalar_shorthand(value)


class NormalModelsBlock(StrictModel):
    """One merge of whole models (`normal_models`), evaluated once."""

    base_model: str = Field(min_length=1, description=f"Base of the task vectors: {MODEL_REFERENCE}")
    models: list[ModelEntry] = Field(min_length=1, description="Input models: a list of {model, parameters?}")
    merging_method: MethodValues = Field(
        description="Exactly one method: {method: {param: value or [{filter?, value}]}}")

    @field_validator("merging_method", mode="before")
    @classmethod
    def _expand_merging_method(cls, value: Any) -> Any:
        return normalise_method_values(value)

    @model_validator(mode="after")
    def _check_values(self) -> "NormalModelsBlock":
        issues = check_method_values(self.merging_method)
        if not issues:
            issues = _per_source_issues(self.merging_method, [entry.parameters for entry in self.models], "models")
        raise_issues(issues)
        return self

    def runnable_issues(self) -> list[Issue]:
        return _count_issues(self.merging_method, len(self.models), "models", "model")


class LayerSpan(StrictModel):
    """A model and a half-open layer range [a, b)."""

    model: str = Field(min_length=1, description=MODEL_REFERENCE)
    layer_range: list[int] = Field(min_length=2, max_length=2, description="[a, b): layers a to b-1, 0 <= a < b")

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]

    @model_validator(mode="after")
    def _check_range(self) -> "LayerSpan":
        start, end = self.layer_range
        if not 0 <= start < end:
            raise_issues([Issue(("layer_range",), f"[{start}, {end}) is not a layer range", "[a, b] with 0 <= a < b")])
        return self


class SliceSource(LayerSpan):
    """One source of a slice."""

    parameters: ParamValues = Field(
        default_factory=dict, description="Per-model parameters (weight, density, ...) for this source")

    @field_validator("parameters", mode="before")
    @classmethod
    def _expand_parameters(cls, value: Any) -> Any:
        return expand_scalar_shorthand(value)


class Slice(StrictModel):
    """A run of output layers merged from equally long layer ranges of its sources (docs/reference_format.md)."""

    sources: list[SliceSource] = Field(min_length=1, description="Sources with equally long layer ranges")
    target: LayerSpan | None = Field(None, description="Where the task-vector base layers are read from")
    merging_method: MethodValues = Field(
        description="Exactly one method: {method: {param: value or [{filter?, value}]}}")

    @field_validator("merging_method", mode="before")
    @classmethod
    def _expand_merging_method(cls, value: Any) -> Any:
        return normalise_method_values(value)

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
        issues += check_method_values(self.merging_method)
        if not issues:
            issues = _per_source_issues(self.merging_method, [source.parameters for source in self.sources],
                                        "sources")
        raise_issues(issues)
        return self

    def runnable_issues(self) -> list[Issue]:
        return _count_issues(self.merging_method, len(self.sources), "sources", "source")


class NormalSlicesBlock(StrictModel):
    """A given list of slices (`normal_slices`), merged and evaluated once."""

    base_model: str = Field(min_length=1, description=f"Base of the task vectors: {MODEL_REFERENCE}")
    slices: list[Slice] = Field(min_length=1, description="Slices stacked in order (docs/reference_format.md)")

    def runnable_issues(self) -> list[Issue]:
        return [Issue(("slices", index) + issue.subpath, issue.message, issue.allowed)
                for index, piece in enumerate(self.slices) for issue in piece.runnable_issues()]


def _build_one_shot(config, block) -> OneShotMerge:
    return OneShotMerge.from_block(config.strategy, block)


def _check_normal_models(checker, block: NormalModelsBlock) -> None:
    checker.check_normal_models(block)


def _check_normal_slices(checker, block: NormalSlicesBlock) -> None:
    checker.check_normal_slices(block)


register_strategy("normal_models", block=NormalModelsBlock, build=_build_one_shot, check_models=_check_normal_models,
                  one_shot=True)
register_strategy("normal_slices", block=NormalSlicesBlock, build=_build_one_shot, check_models=_check_normal_slices,
                  one_shot=True)
