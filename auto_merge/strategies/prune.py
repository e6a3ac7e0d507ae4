"""Layer pruning (GPTailor-style cutting and stitching): remove R layers of L, and for each kept layer choose which
experts contribute and at what output scale.

The space, for L layers, R = L - ``layers`` removals and M experts:

- ``layer_{l}_keep_priority``: float in [0, 1]. The R layers of lowest priority are removed (ties: the deeper layer
  first). Every configuration is a valid removal set, so no forbidden clauses are needed and the space builds in
  milliseconds; a layer's priority means the same whatever the others' values are (a good surface for the
  surrogate). Removal lists (the reference's ``remove_idx_k``) map onto it as priority 0 (removed) / 1 (kept).
- ``layer_{l}_candidate_{c}``: 0/1, whether expert c contributes to kept layer l;
- ``layer_{l}_merge_scale_factor``: λ of the task-arithmetic merge when several experts contribute;
- ``layer_{l}_output_scale``: multiplies the layer's MLP output projection (the same meaning as DIS's scale).

The per-layer names are the reference's. l is always the source layer index. Decoding, kept layers ascending: no
expert → the base's layer l; one → that expert's layer l; several → task arithmetic over their layer l with λ, the task
vectors taken against the base's layer l (its source index, not its new position).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import Field, field_validator, model_validator

from auto_merge.config.blocks import (
    MODEL_REFERENCE,
    Issue,
    MethodRanges,
    SearchSettings,
    check_method_ranges,
    check_model_list,
    merge_methods,
    raise_issues,
)
from auto_merge.strategies.depth import (
    DEFAULT_SCALE_FILTER,
    DEFAULT_SCALE_RANGE,
    check_reference_keys,
    describe_fields,
    from_fields,
    passthrough_slice,
    scale_parameters,
)
from auto_merge.strategies.registry import Strategy, StrategyError, base_model_depth, register_strategy

DEFAULT_LAMBDA_RANGE = (0.0, 1.0)
DESIGN_LAMBDAS = (0.5, 1.0)


def removal_heuristics(num_layers: int, removals: int) -> dict[str, list[int]]:
    """The usual removal lists: the deepest layers but the last, from the middle outward, and every other layer from
    the back (each keeps the first and the last layer while it can)."""
    inner = list(range(num_layers - 2, 0, -1)) or list(range(num_layers))
    middle = num_layers // 2
    outward = [middle + (k + 1) // 2 * (1 if k % 2 == 0 else -1) for k in range(2 * num_layers)]
    outward = [layer for layer in dict.fromkeys(outward) if 0 < layer < num_layers - 1]
    alternating = inner[::2] + inner[1::2]

    def take(order: Sequence[int]) -> list[int]:
        rest = [layer for layer in range(num_layers - 1, -1, -1) if layer not in order]
        return sorted(list(dict.fromkeys([*order, *rest]))[:removals])

    return {"last_first": take(inner), "middle_outward": take(outward), "alternating": take(alternating)}


@dataclass(frozen=True)
class PruneStrategy(Strategy):
    base_model: str
    models: tuple[str, ...]
    num_layers: int
    target_layers: int
    lambda_range: tuple[float, float] = DEFAULT_LAMBDA_RANGE
    scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE
    scale_filter: str = DEFAULT_SCALE_FILTER
    dtype: str = "float32"
    name: str = "prune"

    def __post_init__(self) -> None:
        if not self.models:
            raise StrategyError("prune needs at least one expert model")
        if not 1 <= self.target_layers < self.num_layers:
            raise StrategyError(f"target depth {self.target_layers} must be in [1, {self.num_layers - 1}]")

    @property
    def removals(self) -> int:
        return self.num_layers - self.target_layers

    # ------------------------------------------------------------------------------------------------ the space

    def build_space(self, seed: int = 0):
        from ConfigSpace import Categorical, ConfigurationSpace, Float

        space = ConfigurationSpace(seed=seed)
        lam_low, lam_high = self.lambda_range
        scale_low, scale_high = self.scale_range
        hyperparameters = []
        for layer in range(self.num_layers):
            hyperparameters.append(Float(f"layer_{layer}_keep_priority", (0.0, 1.0), default=0.5))
            for c in range(len(self.models)):
                hyperparameters.append(Categorical(f"layer_{layer}_candidate_{c}", [0, 1], default=int(c == 0)))
            hyperparameters.append(_float(f"layer_{layer}_merge_scale_factor", lam_low, lam_high, 1.0))
            hyperparameters.append(_float(f"layer_{layer}_output_scale", scale_low, scale_high, 1.0))
        space.add(hyperparameters)
        return space

    def removal_values(self, removed: Sequence[int]) -> dict:
        return {f"layer_{layer}_keep_priority": 0.0 if layer in set(removed) else 1.0
                for layer in range(self.num_layers)}

    def initial_configurations(self, space) -> list:
        """For each removal heuristic: each expert alone in every kept layer, the base alone, and every expert merged
        by task arithmetic at λ 0.5 and 1.0 (clipped into the range); the heuristics interleaved, experts first."""
        from ConfigSpace import Configuration

        n = len(self.models)
        patterns: list[tuple[tuple[int, ...], float]] = [(tuple(int(c == m) for c in range(n)), 1.0)
                                                         for m in range(n)]
        patterns.append(((0,) * n, 1.0))
        if n > 1:
            patterns += [((1,) * n, lam) for lam in DESIGN_LAMBDAS]
        heuristics = removal_heuristics(self.num_layers, self.removals)
        configurations = []
        seen = set()
        for pattern, lam in patterns:
            for removed in heuristics.values():
                values = dict(space.get_default_configuration())
                values.update(self.removal_values(removed))
                for layer in range(self.num_layers):
                    for c, on in enumerate(pattern):
                        values[f"layer_{layer}_candidate_{c}"] = on
                    values[f"layer_{layer}_merge_scale_factor"] = min(max(lam, self.lambda_range[0]),
                                                                      self.lambda_range[1])
                key = tuple(sorted(values.items()))
                if key in seen:
                    continue
                seen.add(key)
                configuration = Configuration(space, values=values)
                configuration.origin = "initial design"
                configurations.append(configuration)
        return configurations

    # ------------------------------------------------------------------------------------------------ decoding

    def removed_layers(self, values: Mapping) -> list[int]:
        """The R layers of lowest keep priority (ties: deeper first), ascending."""
        ranked = sorted(range(self.num_layers), key=lambda layer: (float(values[f"layer_{layer}_keep_priority"]),
                                                                   -layer))
        return sorted(ranked[: self.removals])

    def kept_layers(self, values: Mapping) -> list[int]:
        removed = set(self.removed_layers(values))
        return [layer for layer in range(self.num_layers) if layer not in removed]

    def layer_plan(self, values: Mapping) -> list[tuple[tuple[str, ...], int, float, float]]:
        """Per output layer: (contributing models, source layer, λ, output scale); () means the base's layer."""
        plan = []
        for layer in self.kept_layers(values):
            chosen = tuple(m for c, m in enumerate(self.models) if int(values[f"layer_{layer}_candidate_{c}"]) == 1)
            plan.append((chosen, layer, float(values[f"layer_{layer}_merge_scale_factor"]),
                         float(values[f"layer_{layer}_output_scale"])))
        return plan

    def decode(self, configuration: Mapping, *, as_reference: bool = False) -> dict:
        """The merge recipe. ``as_reference``: the model the reference implementation exported for the same values
        (no output scales, which it searched but never applied; task vectors of a merged layer taken against the
        base's layer at the output position, its bug), for replays of its published configurations."""
        values = dict(configuration)
        slices = []
        for position, (chosen, layer, lam, scale) in enumerate(self.layer_plan(values)):
            if as_reference:
                scale = 1.0
            if len(chosen) <= 1:
                model = chosen[0] if chosen else self.base_model
                slices.append(passthrough_slice(model, layer, 1, scale, self.scale_filter))
                continue
            piece = {
                "merge_method": "task_arithmetic",
                "sources": [{"model": m, "layer_range": [layer, layer + 1], "parameters": {"weight": 1.0}}
                            for m in chosen],
                # the base at the source index, not the output position (the reference's bug, kept only as_reference)
                "base_layer_range": [position, position + 1] if as_reference else [layer, layer + 1],
                "parameters": {"lambda": lam, **scale_parameters(scale, self.scale_filter)},
            }
            slices.append(piece)
        return {"base_model": self.base_model, "dtype": self.dtype, "slices": slices}

    def reference_departures(self, values: Mapping, *, as_reference: bool = False) -> list[str]:
        """Where :meth:`decode` of these values differs from the model the reference exported (none with
        ``as_reference``, which decodes as the reference did)."""
        if as_reference:
            return []
        plan = self.layer_plan(dict(values))
        notes = []
        scaled = [layer for _, layer, _, scale in plan if scale != 1.0]
        if scaled:
            notes.append(f"layer_L_output_scale is not 1 on {len(scaled)} kept layer(s) ({_layer_list(scaled)}): the "
                         f"reference searched these scales but never applied them, so its model has none; this "
                         f"replay applies them (--as-reference leaves them out)")
        moved = [layer for position, (chosen, layer, _, _) in enumerate(plan) if len(chosen) > 1 and position != layer]
        if moved:
            notes.append(f"{len(moved)} task-arithmetic layer(s) ({_layer_list(moved)}) move up after the removals: the "
                         f"reference took their task vectors against the base's layer at the new position (its bug), "
                         f"this replay against the base's same layer (--as-reference does as the reference)")
        return notes

    # ------------------------------------------------------------------------------------------------ describe

    def describe(self) -> dict:
        return describe_fields(self)

    def plot_winner(self, folder, recipe: dict):
        from auto_merge.strategies.plots import layer_plot

        return layer_plot(folder / "winner_layers.png", recipe, self)

    @classmethod
    def from_description(cls, data: Mapping) -> "PruneStrategy":
        return from_fields(cls, data)

    def import_reference(self, flat: Mapping) -> dict:
        """The reference's prune configuration (``remove_idx_k`` + per kept layer values) in this space; the removed
        layers' per-layer values, which the reference does not store, get their defaults."""
        flat = dict(flat)
        removed = [flat.pop(f"remove_idx_{k}") for k in range(self.removals) if f"remove_idx_{k}" in flat]
        stray = sorted(key for key in flat if key.startswith("remove_idx_"))
        if len(removed) != self.removals or stray:
            raise StrategyError(f"the configuration removes {len(removed) + len(stray)} layers; this space removes "
                                f"{self.removals} ({self.num_layers} -> {self.target_layers} layers)")
        removed = [int(layer) for layer in removed]
        if len(set(removed)) != len(removed) or not all(0 <= layer < self.num_layers for layer in removed):
            raise StrategyError(f"remove_idx values {removed} are not {self.removals} distinct layers of "
                                f"{self.num_layers}")
        space = self.build_space()
        values = dict(space.get_default_configuration())
        values.update(self.removal_values(removed))
        expected = {name for name in space.keys() if not name.endswith("_keep_priority")
                    and int(name.split("_")[1]) not in removed}
        check_reference_keys(flat, expected, f"the prune space of {len(self.models)} experts and {self.num_layers} "
                                             f"layers with removals {sorted(removed)}")
        values.update({key: int(value) if "_candidate_" in key else float(value) for key, value in flat.items()})
        return values


def _layer_list(layers: Sequence[int], shown: int = 12) -> str:
    text = ", ".join(map(str, layers[:shown]))
    return f"layers {text}" + (f" and {len(layers) - shown} more" if len(layers) > shown else "")


def _float(name: str, low: float, high: float, default: float):
    from ConfigSpace import Constant, Float

    if low == high:
        return Constant(name, low)
    return Float(name, (low, high), default=min(max(default, low), high))


# ---------------------------------------------------------------------------------------------------- the config


class PruneBlock(SearchSettings):
    """Layer cutting and stitching search (`prune`): which layers to remove, which experts to merge per layer."""

    n_workers: int = Field(1, ge=1, description="Parallel workers (one accelerator each)")
    base_model: str = Field(min_length=1, description=f"Base model: {MODEL_REFERENCE}")
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

    _check_models = field_validator("models")(classmethod(check_model_list))

    @field_validator("merging_method")
    @classmethod
    def _check_ranges(cls, ranges: MethodRanges) -> MethodRanges:
        issues = check_method_ranges(ranges, merge_methods())
        scale_params = set(ranges.get("task_arithmetic") or {})
        if not issues and not scale_params & {"scaling_coefficient", "lambda"}:
            issues.append(Issue(("task_arithmetic",), "prune needs the range of the task arithmetic merge scale",
                                "task_arithmetic: {scaling_coefficient: {min, max}}"))
        raise_issues(issues)
        return ranges

    @model_validator(mode="after")
    def _check_prune(self) -> "PruneBlock":
        if self.layers >= self.num_hidden_layers:
            raise_issues([Issue(("layers",), f"target depth {self.layers} removes no layer of "
                                 f"{self.num_hidden_layers}", f"1 <= layers < {self.num_hidden_layers}")])
        return self


def build_prune(config, block: PruneBlock) -> PruneStrategy:
    scale = block.merging_method["task_arithmetic"]
    lam = scale.get("scaling_coefficient") or scale["lambda"]
    return PruneStrategy(base_model=block.base_model, models=tuple(block.models),
                         num_layers=base_model_depth(config, block), target_layers=block.layers,
                         lambda_range=(lam.min, lam.max), scale_filter=block.scale_filter)


def _check_prune_models(checker, block: PruneBlock) -> None:
    checker.check_fixed_depth(block)


register_strategy("prune", block=PruneBlock, build=build_prune, from_description=PruneStrategy.from_description,
                  check_models=_check_prune_models)
