"""Strategies: each a search space (ConfigSpace) plus a decoder from a configuration to a merge recipe.

A strategy knows model references and the depth of the models, never how tensors are loaded: its recipes go to the
merge engine. `describe()` gives plain data that rebuilds the strategy (stored with every found configuration).
"""

from __future__ import annotations

from collections.abc import Mapping

from auto_merge.strategies.lfs import LFSStrategy, StrategyError

SEARCH_STRATEGIES = ("lfs", "lfs_multiobj")


def strategy_from_description(data: Mapping):
    name = data.get("strategy")
    if name in ("lfs", "lfs_multiobj"):
        return LFSStrategy.from_description(data)
    raise StrategyError(f"unknown strategy {name!r} in a strategy description; allowed: {', '.join(SEARCH_STRATEGIES)}")


def build_strategy(config):
    """The strategy an experiment config selects (its models already resolved by config validation)."""
    from auto_merge.models.inspect import model_depth, read_model_config

    block = config.selected
    if config.strategy not in SEARCH_STRATEGIES:
        raise StrategyError(f"strategy {config.strategy!r} has no search driver in this version; "
                            f"searchable: {', '.join(SEARCH_STRATEGIES)}")
    depth = model_depth(read_model_config(config.model_paths[block.base_model]))
    ranges = {method: {param: {"min": r.min, "max": r.max} for param, r in params.items()}
              for method, params in block.merging_method.items()}
    strategy = LFSStrategy(
        base_model=block.base_model,
        models=tuple(block.models),
        num_layers=depth,
        layer_granularity=block.layer_granularity,
        filters=tuple(block.filters),
        method_ranges=ranges,
        name=config.strategy,
    )
    return strategy
