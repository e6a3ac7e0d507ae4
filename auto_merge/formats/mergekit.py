"""mergekit out: a recipe as mergekit YAML, for ``mergekit-yaml`` (or ``mergekit-multi`` when slices use different
methods).

:func:`to_mergekit` turns a :class:`auto_merge.merge.recipe.Recipe` into mergekit's documents and
:func:`to_mergekit_yaml` into their text; the engine writes it beside every merge as ``mergekit_config.yml`` and in
the model card. Only methods that mean the same in mergekit (:data:`MERGEKIT_METHODS`) are exported; a recipe
mergekit cannot reproduce (another method, a parameter value mergekit does not have, slices whose base layers are
ambiguous) raises :class:`MergekitExportError`, a :class:`auto_merge.merge.recipe.RecipeError` naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from auto_merge.merge.methods import get_method
from auto_merge.merge.recipe import (
    OUTPUT_SCALE,
    Parameters,
    ParamEntry,
    Recipe,
    RecipeError,
    _source_dict,
    accepted_parameter_names,
    dump_yaml,
    parameters_to_data,
)

# Methods whose name and parameters mean the same in mergekit (the registry's other methods are this project's own).
MERGEKIT_METHODS = frozenset({
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "task_arithmetic", "ties", "dare_ties",
    "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "passthrough",
    "nearswap", "ram", "ramplus_tl", "arcee_fusion",
})


class MergekitExportError(RecipeError):
    """A recipe that mergekit cannot reproduce (a method or parameter value it does not have)."""


_FROM_RECIPE = object()


def to_mergekit_yaml(recipe: Recipe, *, model_names: Mapping[str, str] | None = None,
                     out_dtype: str | None = None, chat_template: Any = _FROM_RECIPE) -> str:
    """The recipe as mergekit YAML, for `mergekit-yaml` (or `mergekit-multi` when slices use different methods).

    ``model_names`` replaces model references mergekit cannot resolve (``zoo:NAME``) with folders. Merges are
    exported with ``dtype: float32`` (this engine computes in fp32) and the output dtype as ``out_dtype``. Slices with
    their own methods become one mergekit stage per slice plus a final passthrough stage that stacks them; mergekit's
    rule for embeddings (first slice) and head (last slice) makes that stacking exact. ``chat_template``: the template
    ``chat_template: auto`` resolved to (None: none found), written into the last stage of a multi-stage export, whose
    own models are the stages.
    """
    documents = to_mergekit(recipe, model_names=model_names, out_dtype=out_dtype, chat_template=chat_template)
    header = ""
    if len(documents) > 1:
        header = ("# Slices use different merge methods: run with `mergekit-multi THIS_FILE --intermediate-dir DIR "
                  "--out-path OUT`.\n")
    return header + "---\n".join(dump_yaml(document) for document in documents)


def to_mergekit(recipe: Recipe, *, model_names: Mapping[str, str] | None = None,
                out_dtype: str | None = None, chat_template: Any = _FROM_RECIPE) -> list[dict]:
    names = dict(model_names or {})

    def name(ref: str) -> str:
        return names.get(ref, ref)

    for method in recipe.methods():
        if method not in MERGEKIT_METHODS:
            raise MergekitExportError(f"mergekit has no method {method!r}", key="merge_method",
                                      allowed=", ".join(sorted(MERGEKIT_METHODS)))
    final_dtype = out_dtype or recipe.output_dtype
    common: dict[str, Any] = {"dtype": "float32"}
    if final_dtype and final_dtype != "float32":
        common["out_dtype"] = final_dtype

    if recipe.models is not None:
        method = recipe.merge_method
        takes_base = get_method(method).base_model != "none"
        document: dict[str, Any] = {"merge_method": method}
        listed = {entry.model for entry in recipe.models}
        if recipe.base_model and (takes_base or recipe.base_model in listed):
            document["base_model"] = name(recipe.base_model)
        document["models"] = [_source_dict(name(m.model), None, _export_params(m.parameters, f"models[{i}]"))
                              for i, m in enumerate(recipe.models)]
        _add_common(document, recipe, recipe.parameters, "base_model" in document, name, common)
        return [document]

    methods = [recipe.slice_method(i) for i in range(len(recipe.slices))]
    if len(set(methods)) == 1:
        document = {"merge_method": methods[0]}
        slice_bases = [_export_slice_base(recipe, i) for i in range(len(recipe.slices))]
        shared_base = recipe.base_model if get_method(methods[0]).base_model != "none" else None
        if shared_base:
            document["base_model"] = name(shared_base)
        document["slices"] = [_export_slice(recipe, i, name, slice_bases[i], shared_base)
                              for i in range(len(recipe.slices))]
        _add_common(document, recipe, recipe.parameters, shared_base is not None, name, common)
        return [document]

    if recipe.tokenizer is not None:
        raise MergekitExportError("a tokenizer block cannot be split into per-slice mergekit stages",
                                  key="tokenizer", allowed="tokenizer_source: base or a model reference")
    if recipe.tokenizer_source == "union":
        raise MergekitExportError("a union tokenizer cannot be split into per-slice mergekit stages",
                                  key="tokenizer_source", allowed="base or a model reference")
    documents = []
    final_sources = []
    stage_common = {"dtype": "float32"}
    tokenizer_model = name(recipe.tokenizer_source if recipe.tokenizer_source != "base"
                           else recipe.base_model or recipe.slices[0].sources[0].model)
    for index, method in enumerate(methods):
        stage = f"slice-{index}"
        base = _export_slice_base(recipe, index)
        accepted = accepted_parameter_names(method)
        document = {"name": stage, "merge_method": method}
        if base:
            document["base_model"] = name(base[0])
        document["slices"] = [_export_slice(recipe, index, name, base, base[0] if base else None)]
        parameters = {key: value for key, value in recipe.parameters.items() if key in accepted}
        exported = parameters_to_data(_export_params(parameters, "parameters", method))
        if exported:
            document["parameters"] = exported
        document.update(stage_common)
        document["tokenizer_source"] = tokenizer_model
        documents.append(document)
        final_sources.append({"sources": [{"model": stage, "layer_range": [0, recipe.slices[index].length]}]})
    final = {"merge_method": "passthrough", "slices": final_sources, **common, "tokenizer_source": "slice-0"}
    if recipe.chat_template == "auto":  # the final stage's models are the stages: give it what auto chose
        if chat_template is _FROM_RECIPE:
            raise MergekitExportError("chat_template auto chooses among the merged models, which a stage-wise export "
                                      "hides from its last stage", key="chat_template",
                                      allowed="a template name or text")
        if chat_template is not None:
            final["chat_template"] = chat_template
    elif recipe.chat_template is not None:
        final["chat_template"] = recipe.chat_template
    documents.append(final)
    return documents


def _add_common(document: dict, recipe: Recipe, parameters: Parameters, has_base: bool, name, common: dict) -> None:
    exported = parameters_to_data(_export_params(parameters, "parameters", document["merge_method"]))
    if exported:
        document["parameters"] = exported
    document.update(common)
    if recipe.tokenizer is not None:
        document["tokenizer"] = recipe.tokenizer.to_dict(name)
    elif recipe.tokenizer_source == "union":
        document["tokenizer_source"] = "union"
    elif recipe.tokenizer_source == "base":
        # mergekit's default tokenizer donor depends on set order; name it explicitly.
        document["tokenizer_source"] = "base" if has_base else name(_first_model_ref(recipe))
    else:
        document["tokenizer_source"] = name(recipe.tokenizer_source)
    if recipe.chat_template is not None:
        document["chat_template"] = recipe.chat_template


def _first_model_ref(recipe: Recipe) -> str:
    return recipe.models[0].model if recipe.models is not None else recipe.slices[0].sources[0].model


def _export_slice_base(recipe: Recipe, index: int) -> tuple[str, tuple[int, int]] | None:
    """(base model, its layer range) for slice ``index`` when its method takes a base, else None."""
    slice_ = recipe.slices[index]
    if get_method(recipe.slice_method(index)).base_model == "none":
        return None
    base = slice_.base_model or recipe.base_model
    if base is None:
        return None
    if slice_.base_layer_range is not None:
        layer_range = tuple(slice_.base_layer_range)
    else:
        own = [s.layer_range for s in slice_.sources if s.model == base]
        starts = {s.layer_range[0] for s in slice_.sources}
        if own:
            layer_range = tuple(own[0])
        elif len(starts) == 1:
            layer_range = tuple(slice_.sources[0].layer_range)
        else:
            raise MergekitExportError("the base layers of this slice are ambiguous", key=f"slices[{index}]",
                                      allowed="base_layer_range")
    return base, layer_range


def _export_slice(recipe: Recipe, index: int, name, base: tuple[str, tuple[int, int]] | None,
                  document_base: str | None) -> dict:
    slice_ = recipe.slices[index]
    key = f"slices[{index}]"
    sources = [_source_dict(name(s.model), s.layer_range, _export_params(s.parameters, f"{key}.sources[{j}]"))
               for j, s in enumerate(slice_.sources)]
    data: dict[str, Any] = {}
    if base is not None:
        base_model, base_range = base
        base_sources = [s for s in slice_.sources if s.model == base_model]
        if base_sources and any(tuple(s.layer_range) != base_range for s in base_sources):
            raise MergekitExportError("mergekit reads the base from its own source entry, which has other layers "
                                      "than base_layer_range", key=f"{key}.base_layer_range")
        if not base_sources:  # mergekit gathers the base only from the slice's sources
            sources.append({"model": name(base_model), "layer_range": list(base_range)})
        if base_model != document_base:
            data["base_model"] = name(base_model)
    data["sources"] = sources
    exported = parameters_to_data(_export_params(slice_.parameters, f"{key}.parameters", recipe.slice_method(index)))
    if exported:
        data["parameters"] = exported
    return data


def _export_params(parameters: Parameters, key: str, method: str | None = None) -> Parameters:
    """Parameters renamed for mergekit (rescale_mode → rescale, a passthrough's output_scale → scale); raises for
    values mergekit does not have."""
    translated: dict[str, tuple[ParamEntry, ...]] = {}
    for name, entries in parameters.items():
        if name == OUTPUT_SCALE:
            if all(entry.value == 1 for entry in entries):
                continue
            if method != "passthrough" or "scale" in parameters:
                raise MergekitExportError("mergekit cannot scale the output of a merge method (only passthrough "
                                          "has `scale`)", key=f"{key}.{OUTPUT_SCALE}",
                                          allowed="output_scale 1, or a passthrough slice")
            translated["scale"] = entries
            continue
        if name == "rescale_mode":
            values = {entry.value for entry in entries}
            if not values <= {"l1", "none"}:
                raise MergekitExportError(f"rescale_mode {sorted(values - {'l1', 'none'})} has no mergekit "
                                          "equivalent", key=f"{key}.rescale_mode", allowed="l1 or none")
            translated["rescale"] = tuple(ParamEntry(filter=e.filter, value=e.value == "l1") for e in entries)
        elif name == "compat_breadcrumbs_empty_slice":
            continue  # mergekit always behaves this way
        else:
            translated[name] = entries
    return translated
