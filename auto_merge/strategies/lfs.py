"""LFS, layer-wise fusion: per layer group a merge method, per group and parameter family that method's parameters.

The space (ConfigSpace), for G = depth / layer_granularity groups, parameter families P = filters + `rest` (every
tensor no filter matches, including embeddings, the final norm and the head) and M experts:

- ``g{g}:method``: categorical over the configured methods.
- ``g{g}:{p}:{method}:{param}`` (shared by the experts) or ``g{g}:{p}:{method}:{param}:m{i}`` (per expert): the
  chosen method's parameters, each active only when ``g{g}:method`` is that method (a ConfigSpace condition), so
  unchosen methods' parameters never add noise to the surrogate.
- ``g{g}:slerp:pair``: which two experts a slerp group interpolates (slerp is defined for two models; with more
  experts the pair is searched, t spans the whole [0, 1] from the first expert of the pair to the second).

What is searched per method (ranges come from the config's `merging_method`, under the reference's names or the
registry's; a method listed without a parameter gets the default range below):

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

from auto_merge.errors import AutoMergeError

REST = "rest"  # the parameter family of every tensor no filter matches (the reference called it `base`)
DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "slerp", "dare_ties", "della", "fourier")


@dataclass(frozen=True)
class SearchedParam:
    """One searched parameter of a method: the registry name, whether it is per expert, and where its range is read."""

    name: str
    per_model: bool
    config_keys: tuple[str, ...]  # keys under merging_method.METHOD that give its range, first found wins
    default_range: tuple[float, float]
    complement: bool = False  # the config range is of 1 - value (the reference's mask rate for density)


_GTA = (
    SearchedParam("density", False, ("density",), (0.1, 1.0)),
    SearchedParam("lambda", False, ("lambda", "scaling_coefficient"), (0.0, 2.0)),
)
SEARCHED: dict[str, tuple[SearchedParam, ...]] = {
    "linear": (SearchedParam("weight", True, ("weight", "weights"), (0.0, 1.0)),),
    "task_arithmetic": (SearchedParam("weight", True, ("weight", "scaling_coefficient", "lambda"), (0.0, 1.5)),),
    "ties": (
        SearchedParam("density", False, ("density",), (0.1, 1.0)),
        SearchedParam("density", False, ("param_value_mask_rate",), (0.0, 0.9), complement=True),
        SearchedParam("lambda", False, ("lambda", "scaling_coefficient"), (0.0, 2.0)),
    ),
    "dare_ties": _GTA,
    "dare_linear": _GTA,
    "breadcrumbs": _GTA,
    "breadcrumbs_ties": _GTA,
    "della": (
        SearchedParam("density", False, ("density",), (0.2, 0.8)),
        SearchedParam("lambda", False, ("lambda", "scaling_coefficient"), (0.0, 2.0)),
    ),
    "della_linear": (
        SearchedParam("density", False, ("density",), (0.2, 0.8)),
        SearchedParam("lambda", False, ("lambda", "scaling_coefficient"), (0.0, 2.0)),
    ),
    "slerp": (SearchedParam("t", False, ("t", "slerp_t"), (0.0, 1.0)),),
    "fourier": (SearchedParam("lambda", False, ("lambda", "scaling_coefficient"), (0.0, 1.5)),),
    "multislerp": (SearchedParam("weight", True, ("weight",), (0.0, 1.0)),),
    "sce": (SearchedParam("select_topk", False, ("select_topk",), (0.1, 1.0)),),
    "model_stock": (),
    "karcher": (),
    "ram": (SearchedParam("epsilon", False, ("epsilon",), (0.0, 0.01)),),
    "ramplus_tl": (SearchedParam("r", False, ("r",), (0.0, 1.0)), SearchedParam("alpha", False, ("alpha",), (0.0, 1.0))),
    # one expert merged into the base: LFS blocks with a single expert (config validation says so otherwise)
    "nearswap": (SearchedParam("t", False, ("t",), (0.0, 0.01)),),
    "arcee_fusion": (),
}
# Methods whose experts all get weight 1 (their strength is lambda, and density trims).
UNIT_WEIGHT_METHODS = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                       "fourier"}
DELLA_EPSILON = 0.15


class StrategyError(AutoMergeError, ValueError):
    pass


@dataclass(frozen=True)
class LFSStrategy:
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
        unknown = [m for m in self.methods if m not in SEARCHED]
        if unknown:
            raise StrategyError(f"LFS cannot search method(s) {unknown}; allowed: {', '.join(SEARCHED)}")
        if "slerp" in self.methods and len(self.models) < 2:
            raise StrategyError("slerp needs at least two experts")

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
        for param in SEARCHED[method]:
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
                if method == "slerp":
                    children.append(Categorical(f"g{g}:slerp:pair", self.slerp_pairs))
                space.add(children)
                conditions.extend(EqualsCondition(child, selector, method) for child in children)
        space.add(conditions)
        return space

    def initial_configurations(self, space) -> list:
        """Each expert alone (linear one-hot, or task arithmetic one-hot when linear is not searched: weight 1 for
        the expert, 0 for the others, clipped into the configured range), then uniform merges: a plain average and
        uniform task arithmetic at weights 0.5 and 1.0."""
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
        searched = {param.name: param for param, _ in self.searched_params(method)}
        if method == "slerp":
            first, second = (int(i) for i in values[f"g{g}:slerp:pair"].split("-"))
            return {
                "merge_method": "slerp",
                "base_model": self.models[first],
                "sources": [{"model": self.models[second], "layer_range": list(layer_range)}],
                "parameters": {"t": self._entries(values, g, "slerp", "t")},
            }
        sources = []
        slice_parameters: dict[str, list[dict]] = {}
        for name, param in searched.items():
            if not param.per_model:
                transform = (lambda v: _clip_della_density(v)) if (
                    method.startswith("della") and name == "density") else (lambda v: v)
                slice_parameters[name] = self._entries(values, g, method, name, transform=transform)
        for i, model in enumerate(self.models):
            parameters: dict[str, object] = {}
            for name, param in searched.items():
                if param.per_model:
                    parameters[name] = self._entries(values, g, method, name, model=i)
            if method in UNIT_WEIGHT_METHODS:
                parameters["weight"] = 1.0
            if "density" in slice_parameters:  # density is per expert in the registry; the search shares it
                parameters["density"] = slice_parameters["density"]
            sources.append({"model": model, "layer_range": list(layer_range), "parameters": parameters})
        slice_parameters.pop("density", None)
        if method == "task_arithmetic":
            slice_parameters["lambda"] = 1.0
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

    def import_reference(self, flat: Mapping) -> dict:
        """A reference LFS configuration (flat SMAC JSON) as values of this space (see reference_import)."""
        from auto_merge.strategies.reference_import import import_reference_lfs

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


def _clip_della_density(density: float) -> float:
    """DELLA keeps entries with probability density ± epsilon, which must stay inside (0, 1)."""
    margin = DELLA_EPSILON + 1e-3
    return min(max(density, margin), 1.0 - margin)
