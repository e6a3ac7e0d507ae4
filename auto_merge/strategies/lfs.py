"""LFS, layer-wise fusion: per layer group a merge method, per group and parameter family that method's parameters.

The space (ConfigSpace), for G = depth / layer_granularity groups, parameter families P = filters + `rest` (every
tensor no filter matches, including embeddings, the final norm and the head) and M experts:

- ``g{g}:method``: categorical over the configured methods.
- ``g{g}:{p}:{method}:{param}`` (shared by the experts) or ``g{g}:{p}:{method}:{param}:m{i}`` (per expert): the
  chosen method's parameters, each active only when ``g{g}:method`` is that method (a ConfigSpace condition), so
  unchosen methods' parameters never add noise to the surrogate.
- ``g{g}:slerp:pair``: which two experts a slerp group interpolates (slerp is defined for two models; with more
  experts the pair is searched, t spans the whole [0, 1] from the first expert of the pair to the second).

What is searched per method comes from each method's spec (`Searched`, `search_fixed`; auto_merge/merge/methods), so a
registered plugin method is searchable too. Ranges come from the config's `merging_method`, under the spec's names or
aliases; a method listed without a parameter gets the spec's default range. For the built-ins:

| method | searched | fixed |
|---|---|---|
| linear | per-expert weight (normalised by the method) | |
| task_arithmetic | per-expert weight (its scaling coefficient) | lambda 1 |
| ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties | density (shared), lambda | weight 1 |
| della, della_linear | density (shared, clipped so that density ± epsilon stays inside (0, 1)), lambda | weight 1, epsilon 0.15 |
| slerp | the expert pair, t | |
| fourier | lambda | weight 1 |
| multislerp | per-expert weight | |

The reference's `param_value_mask_rate` range r becomes density 1 - r. Decoding gives one slice per group over the same
layer range of every expert; the embeddings follow group 0's recipe and the final norm and head the last group's.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import Field, field_validator, model_validator

from auto_merge.config.blocks import (
    MODEL_REFERENCE,
    Issue,
    MethodRanges,
    SearchSettings,
    check_method_ranges,
    check_model_list,
    check_source_count,
    lfs_methods,
    raise_issues,
)
from auto_merge.merge.methods import get_method
from auto_merge.strategies.families import REST
from auto_merge.strategies.registry import Strategy, StrategyError, base_model_depth, register_strategy

DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "slerp", "dare_ties", "della", "fourier")


@dataclass(frozen=True)
class SearchedParam:
    """One searched parameter of a method: the registry name, whether it is per expert, where its range is read, and
    the interval a sampled value is clipped into."""

    name: str
    per_model: bool
    config_keys: tuple[str, ...]  # keys under merging_method.METHOD that give its range, first found wins
    default_range: tuple[float, float]
    complement: bool = False  # the config range is of 1 - value (the reference's mask rate for density)
    clip: tuple[float, float] | None = None


def searched_params_of(method: str) -> tuple[SearchedParam, ...]:
    """What LFS searches for `method`, from its spec: each searched parameter under its own name, the other keys whose
    range it takes and its non-complement aliases, then one entry per complement alias (a range of 1 - value)."""
    out: list[SearchedParam] = []
    for param in get_method(method).params:
        if param.searched is None:
            continue
        searched = param.searched
        plain = [alias.name for alias in param.aliases if not alias.complement]
        keys = (param.name, *searched.range_keys, *plain)
        out.append(SearchedParam(param.name, searched.per_expert, tuple(dict.fromkeys(keys)), searched.default,
                                 clip=searched.clip))
        for alias in param.aliases:
            if alias.complement:
                low, high = searched.default
                out.append(SearchedParam(param.name, searched.per_expert, (alias.name,), (1.0 - high, 1.0 - low),
                                         complement=True, clip=searched.clip))
    return tuple(out)


@dataclass(frozen=True)
class LFSStrategy(Strategy):
    base_model: str
    models: tuple[str, ...]
    num_layers: int
    layer_granularity: int
    filters: tuple[str, ...] = ()
    method_ranges: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)
    dtype: str = "float32"
    name: str = "lfs"  # or "lfs_multiobj": the same space, one objective per task

    def __post_init__(self) -> None:
        if self.layer_granularity < 1 or self.num_layers % self.layer_granularity:
            raise StrategyError(
                f"layer_granularity {self.layer_granularity} does not divide the depth {self.num_layers}")
        if len(self.models) < 1:
            raise StrategyError("LFS needs at least one expert model")
        allowed = lfs_methods()
        unknown = [m for m in self.methods if m not in allowed]
        if unknown:
            raise StrategyError(f"LFS cannot search method(s) {unknown}; allowed: {', '.join(allowed)}")
        pairwise = [m for m in self.methods if get_method(m).first_source_is_base]
        if pairwise and len(self.models) < 2:
            raise StrategyError(f"{', '.join(pairwise)} needs at least two experts (it interpolates a pair of them)")

    # ------------------------------------------------------------------------------------------------ the space

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.method_ranges) or DEFAULT_METHODS

    @property
    def n_groups(self) -> int:
        return self.num_layers // self.layer_granularity

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.filters) + (REST,)

    @property
    def slerp_pairs(self) -> list[str]:
        return [f"{i}-{j}" for i, j in itertools.combinations(range(len(self.models)), 2)]

    def searched_params(self, method: str) -> list[tuple[SearchedParam, tuple[float, float]]]:
        """The parameters searched for `method`, each with its range (a configured one wins over the default)."""
        configured = self.method_ranges.get(method, {})
        chosen: dict[str, tuple[SearchedParam, tuple[float, float]]] = {}
        for param in searched_params_of(method):
            key = next((k for k in param.config_keys if k in configured), None)
            if key is not None:
                low, high = float(configured[key]["min"]), float(configured[key]["max"])
                if param.complement:
                    low, high = 1.0 - high, 1.0 - low
                chosen[param.name] = (param, (low, high))
            elif param.name not in chosen and not param.complement:
                chosen.setdefault(param.name, (param, param.default_range))
        return list(chosen.values())

    def build_space(self, seed: int = 0):
        from ConfigSpace import Categorical, ConfigurationSpace, EqualsCondition

        space = ConfigurationSpace(seed=seed)
        conditions = []
        for g in range(self.n_groups):
            selector = Categorical(f"g{g}:method", list(self.methods), default=self.methods[0])
            space.add(selector)
            for method in self.methods:
                children = []
                for param, (low, high) in self.searched_params(method):
                    for family in self.families:
                        names = ([f"g{g}:{family}:{method}:{param.name}:m{i}" for i in range(len(self.models))]
                                 if param.per_model else [f"g{g}:{family}:{method}:{param.name}"])
                        children.extend(_float_or_constant(name, low, high, param.name) for name in names)
                if get_method(method).first_source_is_base:
                    children.append(Categorical(f"g{g}:{method}:pair", self.slerp_pairs))
                space.add(children)
                conditions.extend(EqualsCondition(child, selector, method) for child in children)
        space.add(conditions)
        return space

    def initial_configurations(self, space) -> list:
        """Each expert alone (linear one-hot, or task arithmetic one-hot when linear is not searched: weight 1 for
        the expert, 0 for the others, clipped into the configured range), then uniform merges: a plain average,
        uniform task arithmetic at weights 0.5 and 1.0, and every other searched method but slerp at its defaults
        in every group (for TIES: density 0.5, λ 1, the one-shot merge users try first), so that the search starts
        from the one-shot merges it is judged against."""
        from ConfigSpace import Configuration

        n = len(self.models)
        alone = "linear" if "linear" in self.methods else "task_arithmetic" if "task_arithmetic" in self.methods \
            else None
        designs: list[dict] = []
        if alone is not None:
            for i in range(n):
                designs.append(self._uniform_values(space, alone, {"weight": [float(i == j) for j in range(n)]}))
        if "linear" in self.methods:
            designs.append(self._uniform_values(space, "linear", {"weight": [1.0] * n}))
        if "task_arithmetic" in self.methods:
            for weight in (0.5, 1.0):
                designs.append(self._uniform_values(space, "task_arithmetic", {"weight": [weight] * n}))
        for method in self.methods:
            # slerp interpolates a searched pair of experts, not all of them: no uniform merge of its own
            if method not in ("linear", "task_arithmetic") and not get_method(method).first_source_is_base:
                per_expert = {param.name: [1.0] * n for param, _ in self.searched_params(method) if param.per_model}
                designs.append(self._uniform_values(space, method, per_expert))
        configurations = []
        for values in designs:
            configuration = Configuration(space, values=values)
            configuration.origin = "initial design"
            configurations.append(configuration)
        return configurations

    def _uniform_values(self, space, method: str, settings: Mapping[str, Sequence[float]]) -> dict:
        values = {}
        for g in range(self.n_groups):
            values[f"g{g}:method"] = method
            for param, (low, high) in self.searched_params(method):
                for family in self.families:
                    if param.per_model:
                        for i, v in enumerate(settings[param.name]):
                            values[f"g{g}:{family}:{method}:{param.name}:m{i}"] = min(max(v, low), high)
                    else:
                        name = f"g{g}:{family}:{method}:{param.name}"
                        values[name] = space[name].default_value
        return values

    # ------------------------------------------------------------------------------------------------ decoding

    def decode(self, configuration: Mapping, *, as_reference: bool = False) -> dict:
        """The merge recipe (as recipe data for the engine) a configuration describes. ``as_reference`` changes
        nothing: an imported reference configuration decodes to the reference's merge but for the TIES trim count
        (see :meth:`reference_departures`)."""
        values = dict(configuration)
        slices = []
        k = self.layer_granularity
        for g in range(self.n_groups):
            method = values[f"g{g}:method"]
            layer_range = [g * k, (g + 1) * k]
            slices.append(self._decode_group(values, g, method, layer_range))
        return {"base_model": self.base_model, "dtype": self.dtype, "slices": slices}

    def _entries(self, values: Mapping, g: int, method: str, param: str, model: int | None = None,
                 transform=lambda v: v) -> list[dict]:
        suffix = f":m{model}" if model is not None else ""
        entries = []
        for family in self.families:
            value = float(transform(values[f"g{g}:{family}:{method}:{param}{suffix}"]))
            entries.append({"value": value} if family == REST else {"filter": family, "value": value})
        return entries

    def _decode_group(self, values: Mapping, g: int, method: str, layer_range: list[int]) -> dict:
        spec = get_method(method)
        searched = {param.name: param for param, _ in self.searched_params(method)}
        if spec.first_source_is_base:  # slerp: from the pair's first expert (t = 0) to its second
            first, second = (int(i) for i in values[f"g{g}:{method}:pair"].split("-"))
            return {
                "merge_method": method,
                "base_model": self.models[first],
                "sources": [{"model": self.models[second], "layer_range": list(layer_range)}],
                "parameters": {name: self._entries(values, g, method, name) for name in searched},
            }
        sources = []
        slice_parameters: dict[str, list[dict]] = {}
        shared_per_expert: dict[str, list[dict]] = {}  # per-expert in the registry, one shared value in the search
        for name, param in searched.items():
            if not param.per_model:
                transform = (lambda v, clip=param.clip: min(max(v, clip[0]), clip[1])) if param.clip else None
                entries = self._entries(values, g, method, name, transform=transform or (lambda v: v))
                if spec.param(name).scope == "per_model":
                    shared_per_expert[name] = entries
                else:
                    slice_parameters[name] = entries
        fixed = spec.search_fixed
        for i, model in enumerate(self.models):
            parameters: dict[str, object] = {}
            for name, param in searched.items():
                if param.per_model:
                    parameters[name] = self._entries(values, g, method, name, model=i)
            parameters.update({name: value for name, value in fixed.items()
                               if spec.param(name).scope == "per_model"})
            parameters.update(shared_per_expert)
            sources.append({"model": model, "layer_range": list(layer_range), "parameters": parameters})
        slice_parameters.update({name: value for name, value in fixed.items() if spec.param(name).scope == "global"})
        result = {"merge_method": method, "sources": sources}
        if slice_parameters:
            result["parameters"] = slice_parameters
        return result

    # ------------------------------------------------------------------------------------------------ describe

    def describe(self) -> dict:
        """Everything needed to rebuild this space without the original YAML (stored with found configurations)."""
        return {
            "strategy": self.name,
            "base_model": self.base_model,
            "models": list(self.models),
            "num_layers": self.num_layers,
            "layer_granularity": self.layer_granularity,
            "filters": list(self.filters),
            "merging_method": {m: {k: dict(v) for k, v in r.items()} for m, r in self.method_ranges.items()},
            "dtype": self.dtype,
        }

    def reference_departures(self, values: Mapping, *, as_reference: bool = False) -> list[str]:
        """Where the decoded merge of imported reference values differs from the reference's own merge."""
        ties_groups = [g for g in range(self.n_groups) if values.get(f"g{g}:method") == "ties"]
        if not ties_groups:
            return []
        return [f"TIES in group(s) {', '.join(map(str, ties_groups))}: with mask rate r this replay keeps the "
                f"floor((1 - r) * n) largest task-vector entries of each n-entry tensor (mergekit's rule), the "
                f"reference kept n - floor(r * n) + 1 (1 or 2 more entries per tensor); --as-reference does not "
                f"change this"]

    def plot_winner(self, folder, recipe: dict):
        from auto_merge.strategies.plots import recipe_plot

        return recipe_plot(folder / "winner_groups.png", recipe, self)

    def import_reference(self, flat: Mapping) -> dict:
        """A reference LFS configuration (flat SMAC JSON) as values of this space (auto_merge/formats/reference_lfs)."""
        from auto_merge.formats.reference_lfs import import_reference_lfs

        return import_reference_lfs(flat, self)

    @classmethod
    def from_description(cls, data: Mapping) -> "LFSStrategy":
        return cls(
            base_model=data["base_model"],
            models=tuple(data["models"]),
            num_layers=int(data["num_layers"]),
            layer_granularity=int(data["layer_granularity"]),
            filters=tuple(data.get("filters", ())),
            method_ranges=data.get("merging_method", {}),
            dtype=data.get("dtype", "float32"),
            name=data.get("strategy", "lfs"),
        )


def _float_or_constant(name: str, low: float, high: float, param: str):
    """A float hyperparameter over [low, high] (a constant when the configured range is a single value).
    Defaults: 1.0 for weights, lambda and t's upper end, 0.5 for density, clipped into the range."""
    from ConfigSpace import Constant, Float

    if low == high:
        return Constant(name, low)
    default = min(max(0.5 if param == "density" else 1.0, low), high)
    return Float(name, (low, high), default=default)


# ---------------------------------------------------------------------------------------------------- the config


class LfsBlock(SearchSettings):
    """Layer-wise fusion search (`lfs`, and `lfs_multiobj` with one objective per task)."""

    base_model: str = Field(min_length=1, description=f"Base of the task vectors: {MODEL_REFERENCE}")
    models: list[str] = Field(min_length=1, description="Expert model references; order matters")
    merging_method: MethodRanges = Field(
        description="Searched methods and parameter ranges: {method: {param: {min, max}}}")
    layer_granularity: int = Field(ge=1, description="Layers per group (must divide the base model's depth)")
    filters: list[str] = Field(
        default_factory=list, description="Tensor-name substrings; each is a parameter set searched separately, "
                                          "plus 'base' for every other tensor")

    # Field validators (not one model validator) so that each field's problems are reported even when another
    # field of the block is wrong too.
    _check_models = field_validator("models")(classmethod(check_model_list))

    @field_validator("merging_method")
    @classmethod
    def _check_ranges(cls, ranges: MethodRanges) -> MethodRanges:
        raise_issues(check_method_ranges(ranges, lfs_methods()))
        return ranges

    @model_validator(mode="after")
    def _check_expert_counts(self):
        """Each method must accept every expert at once (slerp picks a searched pair)."""
        issues = []
        for method in self.merging_method:
            if method in lfs_methods() and not get_method(method).first_source_is_base:
                issues += check_source_count(method, len(self.models), ("merging_method", method), "expert")
        raise_issues(issues)
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
        raise_issues(issues)
        return filters


def build_lfs(config, block: LfsBlock) -> LFSStrategy:
    ranges = {method: {param: {"min": r.min, "max": r.max} for param, r in (params or {}).items()}
              for method, params in block.merging_method.items()}
    return LFSStrategy(base_model=block.base_model, models=tuple(block.models), num_layers=base_model_depth(config, block),
                       layer_granularity=block.layer_granularity, filters=tuple(block.filters),
                       method_ranges=ranges, name=config.strategy)


def _check_lfs_models(checker, block: LfsBlock) -> None:
    checker.check_lfs(block)


register_strategy("lfs", block=LfsBlock, build=build_lfs, from_description=LFSStrategy.from_description,
                  check_models=_check_lfs_models)
register_strategy("lfs_multiobj", block=LfsBlock, build=build_lfs, from_description=LFSStrategy.from_description,
                  check_models=_check_lfs_models, multi_objective=True)
