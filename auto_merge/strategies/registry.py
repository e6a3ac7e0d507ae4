"""The strategy registry: each strategy module registers its config block, how a strategy is built from it and how it
is rebuilt from its stored description. Config validation, the model checks, the search driver, replay and the plots
ask this registry; none of them names a strategy. A strategy from another package registers the same way, through the
``auto_merge.strategies`` entry point (docs/extending.md).

A strategy object (built by ``build``) offers what :class:`Strategy` documents: a ConfigSpace space, an initial
design, a decoder from a configuration to a recipe (plain data in the merge engine's schema), a description that
rebuilds it, and optionally a plot of its winner and a reader of the reference implementation's files. One-shot
strategies (``one_shot``) have no space: their built object is one recipe (see ``auto_merge.search.oneshot``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_merge.errors import AutoMergeError


class StrategyError(AutoMergeError, ValueError):
    pass


class Strategy:
    """What the search driver, replay and the run outputs use of a strategy (attributes ``name``, ``base_model`` and
    ``models`` too). Subclasses implement the first four; the others have defaults."""

    name: str
    base_model: str
    models: tuple[str, ...]

    def build_space(self, seed: int = 0):
        """The ConfigSpace ConfigurationSpace searched."""
        raise NotImplementedError

    def initial_configurations(self, space) -> list:
        """Configurations SMAC evaluates first (e.g. each expert alone)."""
        raise NotImplementedError

    def decode(self, configuration: Mapping, *, as_reference: bool = False) -> dict:
        """The merge recipe (plain data, the engine's recipe schema) of one configuration."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Plain data with a "strategy" key that rebuilds this strategy (stored with every found configuration)."""
        raise NotImplementedError

    def plot_winner(self, folder: Path, recipe: dict) -> Path | None:
        """Draw the winning recipe into ``folder``; None: this strategy has no such plot."""
        return None

    def import_reference(self, flat: Mapping) -> dict:
        """A configuration of the reference implementation (flat SMAC JSON) as values of this space."""
        raise StrategyError(f"strategy {self.name} cannot read the reference implementation's configurations")

    def reference_departures(self, values: Mapping, *, as_reference: bool = False) -> list[str]:
        """Where the decoded merge of imported reference values differs from the reference's own merge."""
        return []


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy.

    - ``block``: its config block, a pydantic model (build it from ``auto_merge.config.blocks``; a search strategy
      usually extends ``SearchSettings``). It is validated under ``strategies.NAME`` with file/line/key errors.
    - ``build(config, block)``: the strategy object for a validated config (its models already resolved, in
      ``config.model_paths``).
    - ``from_description(data)``: the strategy rebuilt from ``describe()`` (replay of a found configuration).
    - ``check_models(checker, block)``: checks against the models' headers (see ``auto_merge.config.checks``);
      None: only that every model exists and shares the base's architecture.
    - ``one_shot``: no search (normal_models, normal_slices); ``min_tasks``: evaluation tasks the config needs;
      ``multi_objective``: one objective per task.
    """

    name: str
    block: type
    build: Callable[[Any, Any], Any]
    from_description: Callable[[Mapping], Any] | None = None
    check_models: Callable[[Any, Any], None] | None = None
    one_shot: bool = False
    min_tasks: int = 1
    multi_objective: bool = False


_REGISTRY: dict[str, StrategyEntry] = {}


def register_strategy(name: str, *, block: type, build: Callable[[Any, Any], Any],
                      from_description: Callable[[Mapping], Any] | None = None,
                      check_models: Callable[[Any, Any], None] | None = None, one_shot: bool = False,
                      min_tasks: int | None = None, multi_objective: bool = False) -> StrategyEntry:
    """Register a strategy under ``name`` (the config's ``strategy:`` value and its ``strategies:`` key)."""
    if name in _REGISTRY:
        raise ValueError(f"strategy {name!r} is already registered")
    if not name.isidentifier():
        raise ValueError(f"strategy name {name!r} must be an identifier (it is a config key)")
    if not one_shot and from_description is None:
        raise ValueError(f"search strategy {name!r} needs from_description (replay rebuilds it from describe())")
    entry = StrategyEntry(name=name, block=block, build=build, from_description=from_description,
                          check_models=check_models, one_shot=one_shot,
                          min_tasks=(0 if one_shot else 2 if multi_objective else 1) if min_tasks is None
                          else min_tasks, multi_objective=multi_objective)
    _REGISTRY[name] = entry
    return entry


# Importing this module runs the package's __init__ first, which registers the built-ins and the plugins.


def list_strategies() -> list[str]:
    """Registered strategy names, in registration order (built-ins first)."""
    return list(_REGISTRY)


def get_strategy(name: str) -> StrategyEntry:
    if name not in _REGISTRY:
        raise StrategyError(f"unknown strategy {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def base_model_depth(config, block) -> int:
    """The depth of the block's base model, from its config.json (the models are resolved by config validation)."""
    from auto_merge.models.inspect import model_depth, read_model_config

    return model_depth(read_model_config(config.model_paths[block.base_model]))
