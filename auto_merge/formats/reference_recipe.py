"""The reference implementation's recipe format in: its ``merging_method`` recipes → the recipe schema.

The reference (auto-merge-llm) writes a one-shot merge as ``merging_method: {METHOD: {PARAM: [{filter, value}]}}``,
next to ``models`` (whole models) or on each of its ``slices`` (with an optional ``target``, the base layers the task
vectors are taken against); ``docs/reference_format.md`` describes the files.
:func:`read_recipe` recognises the format (:func:`is_reference_format`) and translates it (:func:`from_reference`)
before the recipe schema validates it; the files' readers (:mod:`auto_merge.formats.recipe_files`) call it. Parameter names follow each method's aliases in its spec
(``scaling_coefficient`` becomes ``lambda``, ``param_value_mask_rate`` r becomes ``density`` 1 - r, ``slerp_t`` becomes
``t``); a per-model parameter's value list (linear's ``weights``) is split over the sources; a method whose first source
is its base (slerp) gets it; a slice's ``target`` becomes its ``base_model`` and ``base_layer_range``; and every source
of a weighted method given no weight gets weight 1 (the reference sums whole task vectors).

Errors are :class:`auto_merge.merge.recipe.RecipeError`, naming the recipe file and the key path.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from auto_merge.merge.methods import get_method, list_methods
from auto_merge.merge.param_values import normalise_setting
from auto_merge.merge.recipe import Recipe, RecipeError, parse_recipe


def read_recipe(data: Any, *, source: str | None = None) -> Recipe:
    """Recipe data as read from a user's file: the reference's format is translated, then the recipe schema checks
    it (RecipeError naming ``source`` and the key path)."""
    if isinstance(data, Mapping) and is_reference_format(data):
        data = from_reference(data, source)
    return parse_recipe(data, source=source)


def is_reference_format(data: Mapping) -> bool:
    if "merging_method" in data:
        return True
    return any(isinstance(s, Mapping) and "merging_method" in s for s in data.get("slices") or [])


def from_reference(data: Mapping, source: str | None) -> dict:
    """The reference's `merging_method: {METHOD: {PARAM: [...]}}` recipes → the recipe schema's plain data."""

    def fail(message: str, key: str, allowed: str | None = None):
        raise RecipeError(message, source=source, key=key, allowed=allowed)

    data = dict(data)
    if "merge_method" in data:
        fail("give merge_method (mergekit) or merging_method (reference), not both", key="merging_method")
    result: dict[str, Any] = {k: v for k, v in data.items() if k not in ("merging_method", "slices", "models")}
    if "models" in data:
        if "merging_method" not in data:
            fail("missing", key="merging_method", allowed="{METHOD: {PARAM: [{filter, value}]}}")
        method, params = _reference_method(data["merging_method"], "merging_method", fail)
        models = data["models"]
        if not isinstance(models, list):
            fail("must be a list of {model, parameters}", key="models")
        sources = [dict(m) if isinstance(m, Mapping) else m for m in models]
        result["merge_method"] = method
        result["models"], result["parameters"] = _reference_params(
            method, params, sources, data.get("parameters"), "merging_method", fail)
        return result
    if "merging_method" in data:
        fail("the reference format puts merging_method on each slice when slices are given", key="merging_method")
    slices = data.get("slices")
    if not isinstance(slices, list):
        fail("must be a list of slices", key="slices")
    converted = []
    for index, slice_ in enumerate(slices):
        key = f"slices[{index}]"
        if not isinstance(slice_, Mapping):
            fail("a slice is a mapping with sources and merging_method", key=key)
        slice_ = dict(slice_)
        if "merging_method" not in slice_:
            fail("missing (every slice of a reference-format recipe names its method)", key=f"{key}.merging_method")
        method, params = _reference_method(slice_.pop("merging_method"), f"{key}.merging_method", fail)
        sources = slice_.get("sources")
        if not isinstance(sources, list) or not sources:
            fail("needs a non-empty list of sources", key=f"{key}.sources")
        sources = [dict(s) if isinstance(s, Mapping) else s for s in sources]
        target = slice_.pop("target", None)
        out = {k: v for k, v in slice_.items() if k != "sources"}
        out["merge_method"] = method
        out["sources"], out["parameters"] = _reference_params(
            method, params, sources, slice_.get("parameters"), f"{key}.merging_method", fail)
        if target is not None:
            if not isinstance(target, Mapping) or "layer_range" not in target:
                fail("must be {model, layer_range}", key=f"{key}.target")
            out["base_model"] = target.get("model", data.get("base_model"))
            out["base_layer_range"] = target["layer_range"]
        if method in list_methods() and get_method(method).first_source_is_base:
            # The reference interpolates from its first source (t = 0) to its second (t = 1).
            first = sources[0] if isinstance(sources[0], Mapping) else {}
            out["base_model"] = first.get("model")
            out["base_layer_range"] = first.get("layer_range")
        converted.append(out)
    result["slices"] = converted
    return result


def _reference_method(value: Any, key: str, fail) -> tuple[str, dict]:
    if not isinstance(value, Mapping) or len(value) != 1:
        fail("must map exactly one method name to its parameters", key=key,
             allowed="{METHOD: {PARAM: [{filter, value}]}} with METHOD one of " + ", ".join(list_methods()))
    (method, params), = value.items()
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        fail("must map parameter names to [{filter, value}] lists", key=f"{key}.{method}")
    return str(method), dict(params)


def _reference_params(method: str, params: dict, sources: list, extra: Any, key: str, fail):
    """Translate one reference method block; returns (sources with per-source params, slice-level params)."""
    spec = get_method(method) if method in list_methods() else None  # an unknown method fails validation later
    spellings = spec.spellings() if spec is not None else {}
    slice_params: dict[str, Any] = dict(extra) if isinstance(extra, Mapping) else {}
    for name, setting in params.items():
        param, alias = spellings.get(name, (None, None))
        target = param.name if param is not None else name
        entries = normalise_setting(setting)
        if alias is not None and alias.complement:
            entries = [_map_entry(entry, alias.to_canonical, f"{key}.{method}.{name}", fail) for entry in entries]
        if alias is not None and param.scope == "per_model" and _has_value_list(entries):
            _split_per_source(entries, sources, target, f"{key}.{method}.{name}", fail)
            continue
        slice_params[target] = entries
    if spec is not None and spec.has_param("weight") and "weight" not in slice_params \
            and not all(isinstance(s, Mapping) and "weight" in (s.get("parameters") or {}) for s in sources):
        slice_params["weight"] = 1.0  # the reference sums whole task vectors: θ + λ·Σ τ_i
    return sources, slice_params


def _has_value_list(entries: Any) -> bool:
    return isinstance(entries, list) and any(isinstance(e, Mapping) and isinstance(e.get("value"), list)
                                             for e in entries)


def _map_entry(entry: Any, function, key: str, fail) -> dict:
    if not isinstance(entry, Mapping) or "value" not in entry:
        fail("each entry is {filter, value}", key=key)
    value = entry["value"]
    if isinstance(value, list):
        mapped = [function(v) if _is_number(v) else fail(f"expected numbers, got {v!r}", key=key) for v in value]
    elif _is_number(value):
        mapped = function(value)
    else:
        fail(f"expected a number, got {value!r}", key=key)
    return {**entry, "value": mapped}


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _split_per_source(entries: list, sources: list, target: str, key: str, fail) -> None:
    """linear's `weights` value lists hold one weight per source (in source order); give each source its own."""
    per_source: list[list[dict]] = [[] for _ in sources]
    for entry in entries:
        if not isinstance(entry, Mapping) or "value" not in entry:
            fail("each entry is {filter, value}", key=key)
        value = entry["value"]
        values = value if isinstance(value, list) else [value] * len(sources)
        if len(values) != len(sources):
            fail(f"has {len(values)} weights for {len(sources)} sources", key=key,
                 allowed="one weight per source, in source order")
        for index, weight in enumerate(values):
            per_source[index].append({**entry, "value": weight})
    for index, source_ in enumerate(sources):
        if not isinstance(source_, dict):
            fail("a source is {model, layer_range, parameters}", key=key)
        own = dict(source_.get("parameters") or {})
        own.setdefault(target, per_source[index])
        source_["parameters"] = own
