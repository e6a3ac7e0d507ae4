"""DIS, depth-wise integration: per depth position, which experts' layers are stacked there, in which order, and
at what output scale.

With L layers, ``fix_layers`` f pinned at each end and ``layer_granularity`` g, there are N = (L - 2f) / g
positions; position i covers source layers [f + i*g, f + (i+1)*g). Each position has C = M * ``repeat`` candidate
blocks (M experts): block j is expert j mod M's layers of that position (all g of them), copy j // M. The space
keeps the reference's hyperparameter names, so its published configurations are configurations of this space:

- ``layer_{i}_block_{j}_selection``: "0"/"1" (or a float in [0, 1], selected above a threshold, with
  ``float_block_selection``);
- ``layer_{i}_permutation_selection``: the order of the candidates, an index into every distinct ordering of the
  multiset of their experts in lexicographic order (for 3 experts: 012, 021, 102, 120, 201, 210); present only when
  there is more than one ordering;
- ``scale_{i}``: the position's output scale.

Decoding position i walks its ordering; the k-th occurrence of expert m is block m + k*M, stacked when selected
(first = nearest the input). Nothing selected: the base model's layers of the position with ``remain_base``, else
the position vanishes. The scale multiplies the MLP output projection (``scale_filter``) of every layer of the
position's last block; a base fallback stays unscaled. The f fixed layers at each end are the base model's (the
reference scaled a fallback and took the fixed layers from ``models[0]``: ``decode(..., as_reference=True)``). A
configuration deeper than ``layers`` (or of depth 0) is rejected before any merge or evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from auto_merge.config.blocks import MODEL_REFERENCE, Issue, SearchSettings, check_model_list, raise_issues
from auto_merge.strategies.depth import (
    DEFAULT_SCALE_FILTER,
    DEFAULT_SCALE_RANGE,
    RejectedConfiguration,
    check_reference_keys,
    describe_fields,
    from_fields,
    passthrough_slice,
)
from auto_merge.strategies.registry import Strategy, StrategyError, base_model_depth, register_strategy

# A categorical over more orderings than this is useless to the surrogate (and slow to build).
MAX_ORDERINGS = 5040


def distinct_orderings(items: Sequence[int]) -> list[tuple[int, ...]]:
    """Every distinct ordering of a multiset, in lexicographic order (generated directly, not by filtering n!)."""
    current = sorted(items)
    orderings = [tuple(current)]
    while True:  # next lexicographic permutation; equal items never swap, so each ordering appears once
        pivot = len(current) - 2
        while pivot >= 0 and current[pivot] >= current[pivot + 1]:
            pivot -= 1
        if pivot < 0:
            return orderings
        successor = len(current) - 1
        while current[successor] <= current[pivot]:
            successor -= 1
        current[pivot], current[successor] = current[successor], current[pivot]
        current[pivot + 1:] = reversed(current[pivot + 1:])
        orderings.append(tuple(current))


def count_orderings(models: int, repeat: int) -> int:
    return math.factorial(models * repeat) // math.factorial(repeat) ** models


@dataclass(frozen=True)
class DISStrategy(Strategy):
    base_model: str
    models: tuple[str, ...]
    num_layers: int
    max_layers: int
    layer_granularity: int = 1
    repeat: int = 1
    remain_base: bool = True
    fix_layers: int = 0
    float_block_selection: bool = False
    block_selection_threshold: float = 0.5
    scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE
    scale_filter: str = DEFAULT_SCALE_FILTER
    dtype: str = "float32"
    name: str = "dis"

    def __post_init__(self) -> None:
        searched = self.num_layers - 2 * self.fix_layers
        if not self.models:
            raise StrategyError("DIS needs at least one expert model")
        if self.layer_granularity < 1 or self.repeat < 1:
            raise StrategyError("layer_granularity and repeat must be >= 1")
        if searched <= 0 or searched % self.layer_granularity:
            raise StrategyError(f"layer_granularity {self.layer_granularity} does not divide the "
                                f"{searched} searched layers ({self.num_layers} - 2 x fix_layers {self.fix_layers})")
        if count_orderings(len(self.models), self.repeat) > MAX_ORDERINGS:
            raise StrategyError(f"{len(self.models)} experts x repeat {self.repeat} have "
                                f"{count_orderings(len(self.models), self.repeat)} orderings per position; at most "
                                f"{MAX_ORDERINGS} can be searched (use fewer experts or a smaller repeat)")

    # ------------------------------------------------------------------------------------------------ the space

    @property
    def n_positions(self) -> int:
        return (self.num_layers - 2 * self.fix_layers) // self.layer_granularity

    @property
    def n_candidates(self) -> int:
        return len(self.models) * self.repeat

    @property
    def orderings(self) -> list[tuple[int, ...]]:
        return distinct_orderings([j % len(self.models) for j in range(self.n_candidates)])

    def build_space(self, seed: int = 0):
        from ConfigSpace import Categorical, ConfigurationSpace, Float

        space = ConfigurationSpace(seed=seed)
        n_orderings = len(self.orderings)
        low, high = self.scale_range
        hyperparameters = []
        for i in range(self.n_positions):
            hyperparameters.append(Float(f"scale_{i}", (low, high), default=min(max(1.0, low), high)))
            if n_orderings > 1:
                hyperparameters.append(Categorical(f"layer_{i}_permutation_selection",
                                                   [str(p) for p in range(n_orderings)], default="0"))
            for j in range(self.n_candidates):
                name = f"layer_{i}_block_{j}_selection"
                hyperparameters.append(Float(name, (0.0, 1.0), default=0.0) if self.float_block_selection
                                       else Categorical(name, ["0", "1"], default="0"))
        space.add(hyperparameters)
        return space

    def initial_configurations(self, space) -> list:
        """Each expert alone (its first block selected at every position, scale 1, the first ordering), then the
        base alone when positions fall back to it."""
        from ConfigSpace import Configuration

        designs = []
        for m in range(len(self.models)):
            values = dict(space.get_default_configuration())
            for i in range(self.n_positions):
                values[f"scale_{i}"] = min(max(1.0, self.scale_range[0]), self.scale_range[1])
                values[f"layer_{i}_block_{m}_selection"] = 1.0 if self.float_block_selection else "1"
            designs.append(values)
        if self.remain_base:
            designs.append(dict(space.get_default_configuration()))
        configurations = []
        for values in designs:
            configuration = Configuration(space, values=values)
            configuration.origin = "initial design"
            configurations.append(configuration)
        return configurations

    # ------------------------------------------------------------------------------------------------ decoding

    def _selected(self, value) -> bool:
        if self.float_block_selection:
            return float(value) > self.block_selection_threshold
        return str(value) == "1"

    def position_blocks(self, values: Mapping, i: int) -> list[int]:
        """The experts (indices into `models`) stacked at position i, nearest the input first."""
        orderings = self.orderings
        key = f"layer_{i}_permutation_selection"
        if len(orderings) > 1:
            if key not in values:
                raise StrategyError(f"{key} is missing: the configuration does not fit this DIS space")
            ordering = orderings[int(values[key])]
        else:
            ordering = orderings[0]
        seen = [0] * len(self.models)
        blocks = []
        for m in ordering:
            j = m + seen[m] * len(self.models)
            seen[m] += 1
            if self._selected(values[f"layer_{i}_block_{j}_selection"]):
                blocks.append(m)
        return blocks

    def layer_plan(self, values: Mapping, *, as_reference: bool = False) -> list[tuple[str, int, float]]:
        """The output layers as (model, source layer, scale), input side first (the hand-checkable decode).
        ``as_reference``: as the reference decoded them (a base fallback also takes the position's scale; the fixed
        layers come from ``models[0]``)."""
        g, f = self.layer_granularity, self.fix_layers
        fixed_model = self.models[0] if as_reference else self.base_model
        layers: list[tuple[str, int, float]] = [(fixed_model, layer, 1.0) for layer in range(f)]
        for i in range(self.n_positions):
            start = f + i * g
            blocks = self.position_blocks(values, i)
            if not blocks:
                if self.remain_base:
                    fallback_scale = float(values[f"scale_{i}"]) if as_reference else 1.0
                    layers += [(self.base_model, start + k, fallback_scale) for k in range(g)]
                continue
            scale = float(values[f"scale_{i}"])
            for b, m in enumerate(blocks):
                block_scale = scale if b == len(blocks) - 1 else 1.0
                layers += [(self.models[m], start + k, block_scale) for k in range(g)]
        layers += [(fixed_model, layer, 1.0) for layer in range(self.num_layers - f, self.num_layers)]
        return layers

    def reference_departures(self, values: Mapping, *, as_reference: bool = False) -> list[str]:
        """Where :meth:`decode` of these values differs from the reference's decoding of them (none with
        ``as_reference``)."""
        if as_reference:
            return []
        values = dict(values)
        notes = []
        fallbacks = [i for i in range(self.n_positions)
                     if self.remain_base and not self.position_blocks(values, i) and float(values[f"scale_{i}"]) != 1.0]
        if fallbacks:
            shown = ", ".join(map(str, fallbacks[:12])) + (" ..." if len(fallbacks) > 12 else "")
            notes.append(f"{len(fallbacks)} position(s) ({shown}) fall back to the base's layers with scale_i not 1: "
                         f"the reference scaled the fallback, this replay leaves it unscaled (--as-reference scales it)")
        if self.fix_layers:
            notes.append(f"the {self.fix_layers} fixed layer(s) at each end: the reference took them from models[0] "
                         f"({self.models[0]}), this replay from the base (--as-reference takes models[0])")
        return notes

    def depth(self, values: Mapping) -> int:
        return len(self.layer_plan(values))

    def decode(self, configuration: Mapping, *, as_reference: bool = False) -> dict:
        """The merge recipe (passthrough slices, output scales folded into the MLP output projections);
        ``as_reference`` decodes as the reference did (see :meth:`layer_plan`)."""
        values = dict(configuration)
        layers = self.layer_plan(values, as_reference=as_reference)
        if not layers:
            raise RejectedConfiguration("the configuration selects no layer at all (depth 0)")
        if len(layers) > self.max_layers:
            raise RejectedConfiguration(f"depth {len(layers)} exceeds the maximum output depth {self.max_layers} "
                                        "(config key `layers`); not evaluated")
        slices = []
        for model, layer, scale in layers:
            previous = slices[-1] if slices else None
            source = previous["sources"][0] if previous else None
            if (previous and scale == 1.0 and "parameters" not in previous and source["model"] == model
                    and source["layer_range"][1] == layer):
                source["layer_range"][1] += 1  # consecutive unscaled layers of one model: one slice
            else:
                slices.append(passthrough_slice(model, layer, 1, scale, self.scale_filter))
        return {"base_model": self.base_model, "dtype": self.dtype, "slices": slices}

    # ------------------------------------------------------------------------------------------------ describe

    def describe(self) -> dict:
        return describe_fields(self)

    def plot_winner(self, folder, recipe: dict):
        from auto_merge.strategies.plots import layer_plot

        return layer_plot(folder / "winner_layers.png", recipe, self)

    @classmethod
    def from_description(cls, data: Mapping) -> "DISStrategy":
        return from_fields(cls, data)

    def import_reference(self, flat: Mapping) -> dict:
        """A reference DIS configuration (same hyperparameter names) checked against this space."""
        check_reference_keys(flat, self.build_space().keys(),
                             f"the DIS space of {len(self.models)} experts x repeat {self.repeat}, "
                             f"{self.n_positions} positions")
        return {key: (str(value) if not self.float_block_selection and key.endswith("_selection") else value)
                for key, value in flat.items()}


# ---------------------------------------------------------------------------------------------------- the config


class DisBlock(SearchSettings):
    """Depth-wise integration search (`dis`): per layer position, which experts' layers to stack, in which order."""

    min_budget: float = Field(100, gt=0, description="Smallest fidelity: evaluation examples per (sub)task")
    n_workers: int = Field(1, ge=1, description="Parallel workers (one accelerator each)")
    base_model: str = Field(min_length=1, description=f"Fallback layers (remain_base): {MODEL_REFERENCE}")
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
    scale_range: list[float] = Field(
        list(DEFAULT_SCALE_RANGE), min_length=2, max_length=2, description="New. [low, high] of each position's "
        "output scale (the reference's [0, 2] by default); a narrower range keeps stacked layers near their trained "
        "output size")

    _check_models = field_validator("models")(classmethod(check_model_list))

    @model_validator(mode="after")
    def _check_dis(self) -> "DisBlock":
        issues = []
        low, high = self.scale_range
        if not 0 <= low < high:
            issues.append(Issue(("scale_range",), f"[{low}, {high}] is not a range of scales",
                                "[low, high] with 0 <= low < high"))
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
        raise_issues(issues)
        return self


def build_dis(config, block: DisBlock) -> DISStrategy:
    return DISStrategy(
        base_model=block.base_model, models=tuple(block.models), num_layers=base_model_depth(config, block),
        max_layers=block.layers, layer_granularity=block.layer_granularity, repeat=block.repeat,
        remain_base=block.remain_base, fix_layers=block.fix_layers, float_block_selection=block.float_block_selection,
        block_selection_threshold=block.block_selection_threshold, scale_range=tuple(block.scale_range),
        scale_filter=block.scale_filter)


def _check_dis_models(checker, block: DisBlock) -> None:
    checker.check_fixed_depth(block)


register_strategy("dis", block=DisBlock, build=build_dis, from_description=DISStrategy.from_description,
                  check_models=_check_dis_models)
