"""Parameter values in recipes: a value, a gradient (a list interpolated over the layers of a slice), or entries
``[{filter, value}]`` where the first entry whose filter occurs in a tensor's name applies, else the one without.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, field_validator


class ParamEntry(BaseModel):
    """One conditional value: ``value`` (scalar or gradient list) applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filter: Optional[str] = None
    value: Any

    @field_validator("filter")
    @classmethod
    def _filter_not_empty(cls, value):
        if value is not None and not value:
            raise ValueError("an empty filter matches every tensor; leave it out for the fallback entry")
        return value

    @field_validator("value")
    @classmethod
    def _check_value(cls, value):
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple):
            if not value:
                raise ValueError("a gradient needs at least one value")
            if not all(_is_scalar(item) for item in value):
                raise ValueError(f"a gradient holds numbers (or bools/strings), got {list(value)!r}")
            kinds = {_scalar_kind(item) for item in value}
            if len(kinds) != 1:
                raise ValueError(f"a gradient mixes value types: {list(value)!r}")
            return value
        if not _is_scalar(value):
            raise ValueError(f"expected a number, bool, string or a list of numbers, got {value!r}")
        return value

    @property
    def is_fallback(self) -> bool:
        return self.filter is None or self.filter == "*"


def _is_scalar(value: Any) -> bool:
    if isinstance(value, (bool, str)):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(float(value))


def _scalar_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "str" if isinstance(value, str) else "number"


def normalise_setting(setting: Any) -> Any:
    """Any mergekit spelling of one parameter → a list of {filter, value} dicts (pydantic checks them next)."""
    if isinstance(setting, Mapping):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(item, Mapping) for item in setting):
        return setting
    if isinstance(setting, list) and any(isinstance(item, Mapping) for item in setting):
        raise ValueError("mixes {filter, value} entries with plain values; write every item as {filter, value}")
    return [{"value": setting}]


def normalise_parameters(parameters: Any) -> Any:
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        return parameters  # pydantic reports the type error at the right key
    return {name: normalise_setting(setting) for name, setting in parameters.items()}


Parameters = dict[str, tuple[ParamEntry, ...]]


def evaluate_setting(entries: tuple[ParamEntry, ...], tensor_name: str, position: float) -> Any:
    """The value of one parameter for ``tensor_name`` at ``position`` (0..1 across the slice), None if no entry applies.

    The first entry whose filter occurs in the name wins; else the fallback entry. Number lists are interpolated
    piecewise-linearly (mergekit's gradients); bool/string lists are steps.
    """
    chosen = next((entry for entry in entries if not entry.is_fallback and entry.filter in tensor_name), None)
    if chosen is None:
        chosen = next((entry for entry in entries if entry.is_fallback), None)
    if chosen is None:
        return None
    return interpolate(chosen.value, position)


def interpolate(value: Any, position: float) -> Any:
    if not isinstance(value, tuple):
        return value
    if len(value) == 1:
        return value[0]
    if _scalar_kind(value[0]) != "number":
        return value[int(position * (len(value) - 1))]
    scaled = position * (len(value) - 1)
    low = min(int(scaled), len(value) - 1)
    high = min(len(value) - 1, low + 1)
    fraction = scaled - low
    if fraction == 0:
        return value[low]
    return (1 - fraction) * value[low] + fraction * value[high]
