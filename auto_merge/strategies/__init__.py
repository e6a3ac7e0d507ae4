"""Strategies: each a search space (ConfigSpace) plus a decoder from a configuration to a merge recipe, registered
with its config block (:mod:`.registry`).

A strategy knows model references and the depth of the models, never how tensors are loaded: its recipes go to the
merge engine. `describe()` gives plain data that rebuilds the strategy (stored with every found configuration).
Importing this package registers the built-in strategies, then those of installed plugins (the
``auto_merge.strategies`` entry-point group).
"""

from __future__ import annotations

from collections.abc import Mapping

# Registration order is the order messages list the strategies in: the one-shot merges, then lfs, dis, prune.
from auto_merge.strategies import oneshot, lfs, dis, prune  # noqa: F401, I001  (registration, in this order)
from auto_merge.strategies.dis import DISStrategy
from auto_merge.strategies.lfs import LFSStrategy
from auto_merge.strategies.prune import PruneStrategy
from auto_merge.strategies.registry import (
    Strategy,
    StrategyEntry,
    StrategyError,
    get_strategy,
    list_strategies,
    register_strategy,
)
from auto_merge.plugins import load_plugins

load_plugins("auto_merge.strategies")

__all__ = ["DISStrategy", "LFSStrategy", "PruneStrategy", "Strategy", "StrategyEntry", "StrategyError",
           "build_strategy", "get_strategy", "list_strategies", "objectives_of", "register_strategy",
           "search_strategies", "strategy_from_description"]


def search_strategies() -> tuple[str, ...]:
    return tuple(name for name in list_strategies() if not get_strategy(name).one_shot)


def strategy_from_description(data: Mapping):
    name = data.get("strategy")
    if name not in search_strategies():
        raise StrategyError(f"unknown strategy {name!r} in a strategy description; allowed: "
                            f"{', '.join(search_strategies())}")
    try:
        return get_strategy(name).from_description(data)
    except StrategyError:
        raise
    except KeyError as missing:  # a hand-edited or truncated file: describe() always writes every key
        raise StrategyError(f"the {name} strategy description lacks key {missing}; allowed: the description "
                            f"auto-merge wrote (describe())") from None
    except (TypeError, ValueError) as error:
        raise StrategyError(f"the {name} strategy description has a value of the wrong kind ({error})") from None


def objectives_of(config) -> tuple[str, ...]:
    """One objective per task for multi-objective searches (lfs_multiobj, prune with multi_objective), else none
    (one aggregate cost)."""
    if get_strategy(config.strategy).multi_objective or getattr(config.selected, "multi_objective", False):
        return tuple(t.task for t in config.global_params.evaluation.tasks)
    return ()


def build_strategy(config):
    """The search strategy an experiment config selects (its models already resolved by config validation)."""
    entry = get_strategy(config.strategy)
    if entry.one_shot:
        raise StrategyError(f"strategy {config.strategy!r} is a one-shot merge, not a search; searchable: "
                            f"{', '.join(search_strategies())}")
    return entry.build(config, config.selected)
