"""Strategies: each a search space (ConfigSpace) plus a decoder from a configuration to a merge recipe.

A strategy knows model references and the depth of the models, never how tensors are loaded: its recipes go to the
merge engine. `describe()` gives plain data that rebuilds the strategy (stored with every found configuration).
"""

from __future__ import annotations

from collections.abc import Mapping

from auto_merge.strategies.dis import DISStrategy
from auto_merge.strategies.lfs import LFSStrategy, StrategyError
from auto_merge.strategies.prune import PruneStrategy

STRATEGY_CLASSES = {"lfs": LFSStrategy, "lfs_multiobj": LFSStrategy, "dis": DISStrategy, "prune": PruneStrategy}
SEARCH_STRATEGIES = tuple(STRATEGY_CLASSES)


def strategy_from_description(data: Mapping):
    name = data.get("strategy")
    if name not in STRATEGY_CLASSES:
        raise StrategyError(f"unknown strategy {name!r} in a strategy description; allowed: "
                            f"{', '.join(SEARCH_STRATEGIES)}")
    try:
        return STRATEGY_CLASSES[name].from_description(data)
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
    block = config.selected
    if config.strategy == "lfs_multiobj" or getattr(block, "multi_objective", False):
        return tuple(t.task for t in config.global_params.evaluation.tasks)
    return ()


def build_strategy(config):
    """The strategy an experiment config selects (its models already resolved by config validation)."""
    from auto_merge.models.inspect import model_depth, read_model_config

    block = config.selected
    if config.strategy not in SEARCH_STRATEGIES:
        raise StrategyError(f"strategy {config.strategy!r} has no search driver in this version; "
                            f"searchable: {', '.join(SEARCH_STRATEGIES)}")
    depth = model_depth(read_model_config(config.model_paths[block.base_model]))
    if config.strategy == "dis":
        return DISStrategy(
            base_model=block.base_model, models=tuple(block.models), num_layers=depth, max_layers=block.layers,
            layer_granularity=block.layer_granularity, repeat=block.repeat, remain_base=block.remain_base,
            fix_layers=block.fix_layers, float_block_selection=block.float_block_selection,
            block_selection_threshold=block.block_selection_threshold, scale_filter=block.scale_filter)
    if config.strategy == "prune":
        scale = block.merging_method["task_arithmetic"]
        lam = scale.get("scaling_coefficient") or scale["lambda"]
        return PruneStrategy(
            base_model=block.base_model, models=tuple(block.models), num_layers=depth, target_layers=block.layers,
            lambda_range=(lam.min, lam.max), scale_filter=block.scale_filter)
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
