"""Pieces shared by the strategies that change the model's depth (DIS, layer pruning)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from auto_merge.strategies.registry import StrategyError

# The tensor of each decoder layer that a layer's output scale multiplies: the MLP's output projection, so that the
# scale acts on the MLP branch only (h' = h + Attn(h) + s * MLP(...)), the semantics of the reference's search path.
# Folded into the weights, the result is an ordinary checkpoint of the same architecture.
DEFAULT_SCALE_FILTER = "mlp.down_proj"
DEFAULT_SCALE_RANGE = (0.0, 2.0)


class RejectedConfiguration(StrategyError):
    """A configuration outside the strategy's constraints (e.g. deeper than allowed): rejected before any merge or
    evaluation, and recorded as a failed trial with this message."""


def scale_parameters(scale: float, scale_filter: str) -> dict:
    """Recipe parameters that multiply a layer's MLP output projection by ``scale`` (nothing when it is 1)."""
    if scale == 1.0:
        return {}
    return {"output_scale": [{"filter": scale_filter, "value": float(scale)}, {"value": 1.0}]}


def passthrough_slice(model: str, start: int, length: int, scale: float, scale_filter: str) -> dict:
    """Layers [start, start + length) of one model, unchanged but for the output scale."""
    piece = {"merge_method": "passthrough", "sources": [{"model": model, "layer_range": [start, start + length]}]}
    parameters = scale_parameters(scale, scale_filter)
    if parameters:
        piece["parameters"] = parameters
    return piece


def check_reference_keys(flat: Mapping, names: Iterable[str], what: str) -> None:
    """A reference configuration must name exactly these hyperparameters: list what is missing or extra."""
    names = set(names)
    missing = sorted(names - set(flat), key=_natural)
    extra = sorted(set(flat) - names, key=_natural)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:4]}")
        if extra:
            parts.append(f"{len(extra)} key(s) this space does not have, e.g. {extra[:4]}")
        raise StrategyError(f"the configuration does not fit {what}: {'; '.join(parts)}")


def describe_fields(strategy) -> dict:
    """A strategy dataclass as plain data: every field (tuples as lists), its `name` under "strategy"."""
    data = {"strategy": strategy.name}
    for field in dataclasses.fields(strategy):
        if field.name != "name":
            value = getattr(strategy, field.name)
            data[field.name] = list(value) if isinstance(value, tuple) else value
    return data


def from_fields(cls, data: Mapping):
    """The inverse of :func:`describe_fields` (absent fields take their defaults)."""
    values = {}
    for field in dataclasses.fields(cls):
        key = "strategy" if field.name == "name" else field.name
        if key in data:
            value = data[key]
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _natural(name: str) -> list:
    """Sort key that orders layer_2 before layer_10."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
