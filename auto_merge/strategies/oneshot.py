"""One-shot strategies `normal_models` and `normal_slices`: a merge written out in the config, made once (no search).

This module only translates: a validated config block (`NormalModelsBlock` or `NormalSlicesBlock` from
`auto_merge.config.schema`) in, a merge recipe (plain data in the engine's schema, `auto_merge.merge.recipe`) out. It
knows model references, never how tensors are loaded; `auto_merge.search.oneshot` runs the recipe.

The blocks use the reference implementation's spelling (docs/reference_format.md); the recipe uses
the engine's:

- `normal_models` → a `models:` recipe (every layer of every model) with `merge_method` and recipe-wide parameters;
  `normal_slices` → a `slices:` recipe, each slice with its own `merge_method`, stacked in order (output depth =
  sum of the slice lengths).
- Parameter names: `weights` → `weight`, `scaling_coefficient` → `lambda`, `slerp_t` → `t`, and the TIES trim rate
  `param_value_mask_rate` r → `density` 1 - r. Filters (`[{filter, value}]`) are kept as they are.
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

from auto_merge.config.schema import METHOD_PARAMETER_NAMES, METHOD_PARAMETERS
from auto_merge.errors import AutoMergeError

ONESHOT_STRATEGIES: tuple[str, ...] = ("normal_models", "normal_slices")
# The reference's parameter names → the engine registry's.
RENAMES: dict[str, str] = {
    "weights": "weight",
    "scaling_coefficient": "lambda",
    "slerp_t": "t",
    "param_value_mask_rate": "density",
}
COMPLEMENTED = frozenset({"param_value_mask_rate"})  # value r means density 1 - r
WEIGHTED_METHODS = frozenset(method for method, names in METHOD_PARAMETER_NAMES.items() if "weight" in names)
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


def recipe_depth(block, base_depth: int) -> int:
    """Output layers: the base's depth for normal_models, the sum of the slice lengths for normal_slices."""
    if hasattr(block, "slices"):
        return sum(piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0] for piece in block.slices)
    return base_depth


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


def _entries(entries, *, complement: bool = False, pick: int | None = None) -> Any:
    """Schema ParamEntry list → recipe data: a lone unfiltered value as itself, else [{filter?, value}].
    `pick`: the value of one model out of a per-model list (scalars apply to every model)."""
    out = []
    for entry in entries:
        value = entry.value
        if isinstance(value, list):
            value = value[pick] if pick is not None else list(value)
        if complement:
            value = 1.0 - value
        out.append({"value": value} if entry.filter is None else {"filter": entry.filter, "value": value})
    if len(out) == 1 and "filter" not in out[0]:
        return out[0]["value"]
    return out


def _renamed(params: Mapping[str, Sequence], where: KeyPath) -> dict[str, tuple[str, Sequence]]:
    """Engine name → (the name written in the config, its entries); two spellings of one parameter are an error."""
    found: dict[str, tuple[str, Sequence]] = {}
    for name, entries in params.items():
        target = RENAMES.get(name, name)
        if target in found:
            raise OneShotError(where + (name,), f"{found[target][0]!r} and {name!r} both set {target}",
                               f"one of {found[target][0]}, {name}")
        found[target] = (name, entries)
    return found


def _translate(method: str, method_params: Mapping[str, Sequence], model_params: list[Mapping[str, Sequence]],
               method_where: KeyPath, model_wheres: list[KeyPath]) -> tuple[list[dict], dict]:
    """(per-model parameters, shared parameters) in engine names for one method block and its models."""
    per_model: list[dict] = []
    for params, where in zip(model_params, model_wheres):
        own = _renamed(params, where)
        per_model.append({target: _entries(entries) for target, (_, entries) in own.items()})
    shared: dict[str, Any] = {}
    for target, (name, entries) in _renamed(method_params, method_where).items():
        per_model_values = METHOD_PARAMETERS[name].per_model and any(isinstance(e.value, list) for e in entries)
        if per_model_values:  # one value per model, in order: each model gets its own
            for index, params in enumerate(per_model):
                params.setdefault(target, _entries(entries, pick=index))
        else:
            shared[target] = _entries(entries, complement=name in COMPLEMENTED)
    if method in WEIGHTED_METHODS and "weight" not in shared and not all("weight" in p for p in per_model):
        shared["weight"] = DEFAULT_WEIGHT
    return per_model, shared
