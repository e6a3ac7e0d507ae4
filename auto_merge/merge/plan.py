"""Compile a recipe and its models' metadata into a merge plan: one task per output tensor.

A :class:`TensorTask` says everything needed to produce one output tensor: its name and shape, the method, the
(model, source tensor name) inputs and base input, and the method's parameters already resolved for that tensor
(filters matched, gradients interpolated, defaults filled in and validated by the method registry). Only config files,
safetensors headers and tokenizer files are read here; no tensor data. Both the streaming engine and the in-memory
path execute the same plan.

Layers are found from tensor names (``model.layers.N.``, ``transformer.h.N.``, ``model.decoder.layers.N.``,
``...blocks.N.``), so any architecture with numbered decoder layers works without a per-architecture table.

Slices are stacked: output layer indices are consecutive, so layer ``a + k`` of a source of slice s becomes output
layer ``(sum of the lengths of slices before s) + k``. Position ``k / (n - 1)`` of that layer in its slice (1 for a
one-layer slice) is where gradients are evaluated. Tensors outside the layers follow mergekit's rule: embeddings come
from the first slice's sources, everything else (final norm, LM head) from the last slice's, and all of them take
their parameters at position 0 (mergekit 0.1.5 plans them with t = 0: a gradient gives them its first value, and the
last slice's own gradient its first value too). A model without an LM-head tensor (tied embeddings) supplies its input
embedding for the head.

The base model of a slice (the slice's ``base_model``, else the recipe's) supplies the task-vector base for methods
that take one. Its layers are ``base_layer_range`` when given, else the layers of its own source entry in the slice,
else the layers the sources share; a source naming the base model is the base, not an input (mergekit's rule).
Methods that take no base (linear, karcher, passthrough) merge every source, the base model included only if listed.
Parameter filters are matched against the output tensor name.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from auto_merge.merge.io import DTYPE_BYTES, TensorInfo
from auto_merge.merge.methods import get_method, validate_params
from auto_merge.merge.methods.spec import MEMORY_ONLY_PARAMS
from auto_merge.merge.param_values import evaluate_setting
from auto_merge.merge.recipe import (
    OUTPUT_SCALE,
    TOKENIZER_MODES,
    Parameters,
    Recipe,
    RecipeError,
)
from auto_merge.merge.sources import (  # SourceModel, ModelCatalog and DEPTH_KEYS are also imported from here
    DEPTH_KEYS,
    MERGEABLE_DTYPES,
    is_pre_layer,
    is_vocab_tensor,
    ModelCatalog,
    SourceModel,
    with_layer,
)
from auto_merge.merge.tokenizer import (
    RowMap,
    VocabularyError,
    VocabularyPlan,
    has_tokenizer,
    plan_vocabulary,
    resolve_chat_template,
)
from auto_merge.models.inspect import (
    PickleRefusedError,
    architecture_differences,
    model_depth,
    text_config,
)
from auto_merge.models.resolve import ModelResolutionError

# ------------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class TensorInput:
    """One input of a task: a tensor of a model, with its vocabulary row map when rows are re-mapped."""

    model: str
    name: str
    row_map: RowMap | None = None


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made. Equal tasks produce equal tensors (for the same seed)."""

    name: str
    method: str
    inputs: tuple[TensorInput, ...]
    base: TensorInput | None
    global_params: tuple[tuple[str, Any], ...]
    per_model_params: tuple[tuple[tuple[str, Any], ...], ...]
    shape: tuple[int, ...]
    layer: int | None
    slice_index: int
    output_scale: float = 1.0  # multiplies the method's result (recipe parameter `output_scale`)

    def global_dict(self) -> dict[str, Any]:
        return dict(self.global_params)

    def per_model_dicts(self) -> list[dict[str, Any]]:
        return [dict(params) for params in self.per_model_params]

    @property
    def is_random(self) -> bool:
        return get_method(self.method).is_random

    def reads(self) -> tuple[TensorInput, ...]:
        return self.inputs + ((self.base,) if self.base is not None else ())


@dataclass
class MergePlan:
    """Every output tensor's task, in output order, plus what the output checkpoint needs around the tensors."""

    recipe: Recipe
    tasks: list[TensorTask]
    models: dict[str, SourceModel]
    num_layers: int
    output_config: dict
    out_dtype: str
    vocabulary: VocabularyPlan
    template: str
    layer_origins: list[list[tuple[str, int]]]  # per output layer: (model, source layer) of each input
    chat_template: str | None = None  # the output tokenizer's new template (recipe `chat_template`); None: as copied
    chat_template_note: str = ""  # where it came from, for the summary
    _by_name: dict[str, TensorTask] = field(init=False, repr=False)

    def __post_init__(self):
        self._by_name = {task.name: task for task in self.tasks}

    def task(self, name: str) -> TensorTask:
        return self._by_name[name]

    def output_bytes(self, task: TensorTask) -> int:
        count = 1
        for size in task.shape:
            count *= size
        return count * DTYPE_BYTES[self.out_dtype]

    def input_info(self, tensor_input: TensorInput) -> TensorInfo:
        return self.models[tensor_input.model].tensors[tensor_input.name]

    def summary(self) -> str:
        lines = [f"output: {self.num_layers} layers, {len(self.tasks)} tensors, "
                 f"{sum(self.output_bytes(t) for t in self.tasks) / 1e6:.1f} MB in {self.out_dtype}"]
        lines.append(f"config and side files from: {self.template}")
        lines.append(f"tokenizer: {self.vocabulary.describe()}")
        if self.chat_template_note:
            lines.append(f"chat template: {self.chat_template_note}")
        layer = 0
        slices = self.recipe.slices or [None]
        for index, slice_ in enumerate(slices):
            tasks = [t for t in self.tasks if t.slice_index == index and t.layer is not None]
            if not tasks:
                continue
            length = len({t.layer for t in tasks})
            first = tasks[0]
            origin = ", ".join(f"{m}[{start}:{start + length}]" for m, start in self.layer_origins[layer])
            base = f", base {first.base.model}" if first.base else ""
            lines.append(f"layers {layer}-{layer + length - 1}: {first.method} of {origin}{base}")
            layer += length
        methods = sorted({t.method for t in self.tasks if t.layer is None})
        lines.append(f"embeddings, final norm, head: {', '.join(methods)} ({sum(t.layer is None for t in self.tasks)} "
                     "tensors)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- compiling
@dataclass
class _Source:
    model: str
    start: int
    parameters: Parameters
    key: str


@dataclass
class _Slice:
    index: int
    key: str
    method: str
    length: int
    inputs: list[_Source]
    base: str | None
    base_start: int | None
    parameters: Parameters


def compile_plan(recipe: Recipe, catalog: ModelCatalog, *, source: str | None = None) -> MergePlan:
    """The plan for ``recipe`` over the models ``catalog`` resolves; RecipeError names the recipe key at fault."""

    def fail(message: str, key: str | None = None, allowed: str | None = None):
        raise RecipeError(message, source=source, key=key, allowed=allowed)

    models = _ModelAccess(catalog, fail)
    slices = _normalise_slices(recipe, models, fail)
    template_ref = recipe.base_model or _first_model(recipe)
    template = models.get(template_ref, "base_model" if recipe.base_model else _first_key(recipe))

    tasks: list[TensorTask] = []
    pre = [name for name in template.non_layer if is_pre_layer(name)]
    post = [name for name in template.non_layer if not is_pre_layer(name)]
    for name in pre:
        tasks.append(_outer_task(name, slices[0], 0.0, recipe, models, fail))
    layer_origins: list[list[tuple[str, int]]] = []
    output_layer = 0
    for slice_ in slices:
        for offset in range(slice_.length):
            position = offset / (slice_.length - 1) if slice_.length > 1 else 1.0
            tasks.extend(_layer_tasks(slice_, offset, output_layer, position, recipe, models, fail))
            layer_origins.append([(s.model, s.start + offset) for s in slice_.inputs])
            output_layer += 1
    for name in post:  # mergekit: the last slice's sources and parameters, but at t = 0 (not its last layer's t)
        tasks.append(_outer_task(name, slices[-1], 0.0, recipe, models, fail))

    vocabulary = _plan_vocabulary(recipe, template_ref, tasks, models, fail)
    slice_keys = [slice_.key for slice_ in slices]
    tasks = [_with_shape(task, vocabulary, models, slice_keys[task.slice_index], fail) for task in tasks]
    out_dtype = recipe.output_dtype or template.stored_dtype
    used = {i.model for task in tasks for i in task.reads()} | {template_ref, vocabulary.tokenizer_model}
    for ref in sorted(used - {template_ref}):  # same tensor names can hide another architecture (config.json)
        differences = architecture_differences(models.get(ref, None).config, template.config)
        if differences:
            fail(f"model {ref} does not share the architecture of {template_ref}: {'; '.join(differences)}",
                 key="base_model" if recipe.base_model else "models",
                 allowed=f"models whose config.json matches {template_ref}'s (vocab_size may differ)")
    chat_template, chat_template_note = _chat_template(recipe, vocabulary, models, fail)
    return MergePlan(
        recipe=recipe,
        tasks=tasks,
        models={ref: models.get(ref, None) for ref in sorted(used)},
        num_layers=output_layer,
        output_config=_output_config(template, slices, output_layer, vocabulary.rows, out_dtype, models),
        out_dtype=out_dtype,
        vocabulary=vocabulary,
        template=template_ref,
        layer_origins=layer_origins,
        chat_template=chat_template,
        chat_template_note=chat_template_note,
    )


class _ModelAccess:
    """Catalog access that turns resolution and inspection failures into RecipeErrors at the referring key."""

    def __init__(self, catalog: ModelCatalog, fail):
        self.catalog = catalog
        self.fail = fail

    def get(self, ref: str, key: str | None) -> SourceModel:
        try:
            return self.catalog.get(ref)
        except RecipeError:
            raise
        except PickleRefusedError as error:
            if self.catalog.pickle_opt_in:
                error = error.with_opt_in(self.catalog.pickle_opt_in)
            self.fail(f"model {ref!r}: {error}", key=key)
        except ModelResolutionError as error:  # its message names the model already
            self.fail(str(error), key=key)
        except (ValueError, OSError) as error:  # resolution and inspection errors are ValueErrors
            self.fail(f"model {ref!r}: {error}", key=key)


def _first_model(recipe: Recipe) -> str:
    return recipe.models[0].model if recipe.models is not None else recipe.slices[0].sources[0].model


def _first_key(recipe: Recipe) -> str:
    return "models[0].model" if recipe.models is not None else "slices[0].sources[0].model"


def _normalise_slices(recipe: Recipe, models: _ModelAccess, fail) -> list[_Slice]:
    """Models and slices alike → slices of sources with start layers, base resolved, inputs separated from base."""
    raw: list[tuple[str, str, int, list[_Source], str | None, tuple[int, int] | None, Parameters]] = []
    if recipe.models is not None:
        depths = [models.get(m.model, f"models[{i}].model").depth for i, m in enumerate(recipe.models)]
        for i, depth in enumerate(depths):
            if depth != depths[0]:
                fail(f"{recipe.models[i].model} has {depth} layers but {recipe.models[0].model} has {depths[0]}; "
                     "models of different depths need slices", key=f"models[{i}].model")
        sources = [_Source(m.model, 0, m.parameters, f"models[{i}]") for i, m in enumerate(recipe.models)]
        raw.append(("models", recipe.merge_method, depths[0], sources, None, None, {}))
    else:
        for i, slice_ in enumerate(recipe.slices):
            sources = []
            for j, src in enumerate(slice_.sources):
                key = f"slices[{i}].sources[{j}]"
                depth = models.get(src.model, f"{key}.model").depth
                if src.layer_range[1] > depth:
                    fail(f"{src.model} has {depth} layers", key=f"{key}.layer_range",
                         allowed=f"a range within [0, {depth}]")
                sources.append(_Source(src.model, src.layer_range[0], src.parameters, key))
            raw.append((f"slices[{i}]", recipe.slice_method(i), slice_.length, sources, slice_.base_model,
                        slice_.base_layer_range, slice_.parameters))

    slices = []
    for index, (key, method, length, sources, slice_base, base_range, parameters) in enumerate(raw):
        spec = get_method(method)
        base = (slice_base or recipe.base_model) if spec.base_model != "none" else None
        base_start = None
        inputs = list(sources)
        if base is not None:
            base_start = _base_start(key, base, base_range, sources, fail)
            inputs = [s for s in sources
                      if not (s.model == base and (base_range is None or s.start == base_start))]
            base_key = f"{key}.base_model" if slice_base else "base_model"
            base_depth = models.get(base, base_key).depth
            if base_start + length > base_depth:
                fail(f"the base {base} has {base_depth} layers, the slice needs its layers "
                     f"[{base_start}, {base_start + length})", key=base_key)
        count = len(inputs)
        if count < spec.min_models or (spec.max_models is not None and count > spec.max_models):
            named = ", ".join(s.model for s in inputs) or "none"
            fail(f"{method} takes {spec.describe_model_count()} non-base model(s), got {count} ({named})",
                 key=key if key != "models" else "models",
                 allowed="list the base model as base_model, not among the inputs" if base else None)
        slices.append(_Slice(index, key, method, length, inputs, base, base_start, parameters))
    return slices


def _base_start(key: str, base: str, base_range, sources: list[_Source], fail) -> int:
    if base_range is not None:
        return base_range[0]
    own = {s.start for s in sources if s.model == base}
    if len(own) > 1:
        fail(f"the base model {base} appears as a source with different layer ranges", key=f"{key}.sources",
             allowed="one source entry for the base, or base_layer_range")
    if own:
        return own.pop()
    starts = {s.start for s in sources}
    if len(starts) == 1:
        return starts.pop()
    fail(f"the base model {base} is not among the sources and the sources start at different layers "
         f"({sorted(starts)}), so it is unclear which base layers the task vectors are taken against",
         key=f"{key}.base_layer_range" if key != "models" else "base_model",
         allowed="base_layer_range: [start, end] (the reference's target), or the base as a source")


def _layer_tasks(slice_: _Slice, offset: int, output_layer: int, position: float, recipe: Recipe,
                 models: _ModelAccess, fail) -> list[TensorTask]:
    reference = slice_.inputs[0]
    reference_model = models.get(reference.model, None)
    keys = reference_model.layers.get(reference.start + offset, {})
    readers: list[tuple[str, int, str]] = [(s.model, s.start + offset, s.key) for s in slice_.inputs]
    if slice_.base is not None:
        readers.append((slice_.base, slice_.base_start + offset, f"{slice_.key}.base_model"))
    for model_ref, layer, key in readers:
        other = models.get(model_ref, key).layers.get(layer, {})
        if set(other) != set(keys):
            difference = sorted(with_layer(k, layer) for k in set(other) ^ set(keys))[:4]
            fail(f"layer {layer} of {model_ref} does not have the tensors of layer {reference.start + offset} of "
                 f"{reference.model} (differences: {difference}); the models' architectures differ", key=key)
    tasks = []
    for layer_name_key in sorted(keys, key=lambda k: with_layer(k, 0)):
        name = with_layer(layer_name_key, output_layer)
        inputs = tuple(TensorInput(s.model, models.get(s.model, s.key).layers[s.start + offset][layer_name_key])
                       for s in slice_.inputs)
        base = None
        if slice_.base is not None:
            base_name = models.get(slice_.base, None).layers[slice_.base_start + offset][layer_name_key]
            base = TensorInput(slice_.base, base_name)
        tasks.append(_task(name, slice_, inputs, base, position, output_layer, recipe, fail))
    return tasks


def _outer_task(name: str, slice_: _Slice, position: float, recipe: Recipe, models: _ModelAccess,
                fail) -> TensorTask:
    """An embedding, final norm or head tensor, taken from ``slice_``'s sources (mergekit's first/last rule)."""

    def read(model_ref: str, key: str) -> TensorInput:
        found = models.get(model_ref, key).lookup(name)
        if found is None:
            fail(f"{model_ref} has no tensor {name!r} (and no input embedding to stand in for it)", key=key)
        return TensorInput(model_ref, found)

    inputs = tuple(read(s.model, s.key) for s in slice_.inputs)
    base = read(slice_.base, f"{slice_.key}.base_model") if slice_.base is not None else None
    return _task(name, slice_, inputs, base, position, None, recipe, fail)


def _task(name: str, slice_: _Slice, inputs: tuple[TensorInput, ...], base: TensorInput | None, position: float,
          layer: int | None, recipe: Recipe, fail) -> TensorTask:
    spec = get_method(slice_.method)
    slice_level = (f"{slice_.key}.parameters", slice_.parameters)
    recipe_level = ("parameters", recipe.parameters)
    origins: dict[tuple[int | None, str], str] = {}  # (model index or None, parameter) → key path of its value
    global_given: dict[str, Any] = {}
    global_names = [p.name for p in spec.params if p.scope == "global"]
    if spec.has_param("rescale_mode"):
        global_names.append("rescale")
    for param_name in global_names:
        _set_if_found(global_given, origins, None, param_name, [slice_level, recipe_level], name, position)
    scale_given: dict[str, Any] = {}
    _set_if_found(scale_given, origins, None, OUTPUT_SCALE, [slice_level, recipe_level], name, position)
    output_scale = scale_given.get(OUTPUT_SCALE, 1.0)
    if isinstance(output_scale, bool) or not isinstance(output_scale, (int, float)) or not math.isfinite(output_scale):
        fail(f"{OUTPUT_SCALE} for tensor {name} is {output_scale!r}", key=origins.get((None, OUTPUT_SCALE)),
             allowed="a finite number")
    per_model_given = []
    for index, source in enumerate(slice_.inputs):
        given: dict[str, Any] = {}
        levels = [(f"{source.key}.parameters", source.parameters), slice_level, recipe_level]
        for param in spec.params:
            if param.scope == "per_model":
                _set_if_found(given, origins, index, param.name, levels, name, position)
        per_model_given.append(tuple(sorted(given.items())))
    try:
        global_params, per_model_params = _validated(slice_.method, _typed(tuple(sorted(global_given.items()))),
                                                     tuple(_typed(items) for items in per_model_given))
    except ValueError as error:
        models = ", ".join(f"model {i} = {s.key} ({s.model})" for i, s in enumerate(slice_.inputs))
        fail(f"for tensor {name} ({models}): {error}", key=_error_key(error, origins, slice_))
    return TensorTask(name=name, method=slice_.method, inputs=inputs, base=base, global_params=global_params,
                      per_model_params=per_model_params, shape=(), layer=layer, slice_index=slice_.index,
                      output_scale=float(output_scale))


def _error_key(error: ValueError, origins: dict[tuple[int | None, str], str], slice_: _Slice) -> str:
    """The key path of the value a registry error is about (or where a missing parameter belongs)."""
    param = getattr(error, "param", None)
    index = getattr(error, "model_index", None)
    if param:
        origin = origins.get((index, param))
        if origin is not None:
            return f"{origin}.{param}"
        if index is not None and index < len(slice_.inputs):
            return f"{slice_.inputs[index].key}.parameters.{param}"
    return slice_.key if slice_.key != "models" else "parameters"


def _set_if_found(target: dict, origins: dict, index: int | None, name: str,
                  levels: Sequence[tuple[str, Parameters]], tensor_name: str, position: float) -> None:
    """Take ``name``'s value from the first level that has one for this tensor; remember which level it was."""
    if name in MEMORY_ONLY_PARAMS:
        return
    for key, level in levels:
        if name in level:
            value = evaluate_setting(level[name], tensor_name, position)
            if value is not None:
                target[name] = value
                origins[(index, name)] = key
                return


def _typed(items: tuple) -> tuple:
    """(name, value) pairs keyed with the value's type too: True == 1 and hash alike, but only 1 is a number."""
    return tuple((name, type(value), value) for name, value in items)


@lru_cache(maxsize=4096)
def _validated(method: str, global_given: tuple, per_model_given: tuple):
    """validate_params for hashable inputs (typed by `_typed`); resolved values as sorted item tuples."""
    resolved = validate_params(method, {name: value for name, _, value in global_given},
                               [{name: value for name, _, value in items} for items in per_model_given])
    return (tuple(sorted(resolved.global_params.items())),
            tuple(tuple(sorted(params.items())) for params in resolved.per_model_params))


def _plan_vocabulary(recipe: Recipe, template_ref: str, tasks: list[TensorTask], models: _ModelAccess,
                     fail) -> VocabularyPlan:
    vocab_models: list[str] = []
    for task in tasks:
        if is_vocab_tensor(task.name):
            for tensor_input in task.reads():
                if tensor_input.model not in vocab_models:
                    vocab_models.append(tensor_input.model)
    if recipe.tokenizer_source in TOKENIZER_MODES:
        target = template_ref
    else:
        target = recipe.tokenizer_source
    key = "tokenizer" if recipe.tokenizer is not None else "tokenizer_source"
    target_model = models.get(target, f"{key}.source" if recipe.tokenizer is not None else key)
    involved = {ref: models.get(ref, None) for ref in {*vocab_models, target}}
    block = recipe.tokenizer
    try:
        vocabulary = plan_vocabulary(recipe.tokenizer_source, target_model.ref,
                                     {ref: model.path for ref, model in involved.items()},
                                     {ref: model.embedding_rows for ref, model in involved.items()}, vocab_models,
                                     block=block is not None, tokens=block.tokens if block else None,
                                     pad_to_multiple_of=block.pad_to_multiple_of if block else None)
    except (VocabularyError, OSError, ValueError) as error:
        fail(str(error), key=key, allowed="base, union or a model reference" if block is None else None)
    if block is not None:  # mergekit takes a token's row only from a model that feeds the same tensor
        for task in tasks:
            if not is_vocab_tensor(task.name):
                continue
            readers = {tensor_input.model for tensor_input in task.reads()}
            for token, setting in block.tokens.items():
                if setting.source_model is not None and setting.source_model not in readers:
                    fail(f"{setting.source_model} does not feed {task.name} (made from {', '.join(sorted(readers))})",
                         key=f"tokenizer.tokens.{token}.source")
    return vocabulary


def _chat_template(recipe: Recipe, vocabulary: VocabularyPlan, models: _ModelAccess,
                   fail) -> tuple[str | None, str]:
    """The recipe's chat_template resolved to a text (mergekit's `auto`: among the base and the merged models)."""
    if recipe.chat_template is None:
        return None, ""
    tokenizer_model = models.get(vocabulary.tokenizer_model, None)
    if not has_tokenizer(tokenizer_model.path):
        fail(f"the output tokenizer comes from {tokenizer_model.ref}, which has no tokenizer files to carry a chat "
             "template", key="chat_template", allowed="a tokenizer_source with a tokenizer")
    refs = [recipe.base_model] if recipe.base_model else []
    refs += [m.model for m in recipe.models or []]
    refs += [s.model for slice_ in recipe.slices or [] for s in slice_.sources]
    refs = list(dict.fromkeys(refs))
    try:
        return resolve_chat_template(recipe.chat_template, [models.get(ref, None).path for ref in refs])
    except (ValueError, OSError) as error:
        fail(str(error), key="chat_template")


def _with_shape(task: TensorTask, vocabulary: VocabularyPlan, models: _ModelAccess, key: str,
                fail) -> TensorTask:
    reads = []
    shapes = []
    for tensor_input in task.reads():
        model = models.get(tensor_input.model, None)
        info = model.tensors[tensor_input.name]
        if info.dtype not in MERGEABLE_DTYPES:
            fail(f"{tensor_input.model}:{tensor_input.name} is stored as {info.dtype}; only floating-point tensors "
                 "are merged", key=key)
        shape = info.shape
        if is_vocab_tensor(task.name) and shape and shape[0] == model.embedding_rows:
            row_map = vocabulary.row_map(tensor_input.model)
            tensor_input = TensorInput(tensor_input.model, tensor_input.name, row_map)
            shape = (vocabulary.rows, *shape[1:])
        reads.append(tensor_input)
        shapes.append(shape)
    if len(set(shapes)) != 1:
        described = ", ".join(f"{r.model}:{r.name} {list(s)}" for r, s in zip(task.reads(), shapes))
        fail(f"tensor {task.name} has different shapes in its inputs ({described})", key=key)
    inputs = tuple(reads[: len(task.inputs)])
    base = reads[-1] if task.base is not None else None
    return TensorTask(name=task.name, method=task.method, inputs=inputs, base=base, global_params=task.global_params,
                      per_model_params=task.per_model_params, shape=tuple(shapes[0]), layer=task.layer,
                      slice_index=task.slice_index, output_scale=task.output_scale)


def _output_config(template: SourceModel, slices: list[_Slice], depth: int, vocab_rows: int, out_dtype: str,
                   models: _ModelAccess) -> dict:
    """The template's config with the output's layer count, vocabulary size and dtype."""
    config = copy.deepcopy(template.config)
    config.pop("_name_or_path", None)
    inner = text_config(config)
    for target in ({id(config): config, id(inner): inner}).values():
        for key in DEPTH_KEYS:
            if isinstance(target.get(key), int) and not isinstance(target.get(key), bool):
                target[key] = depth
        if "vocab_size" in target:
            target["vocab_size"] = vocab_rows
        if isinstance(target.get("layer_types"), list):
            target["layer_types"] = _layer_types(slices, models, target["layer_types"])
    config["dtype"] = out_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = out_dtype
    if model_depth(config) != depth:
        raise RecipeError(f"cannot record the output depth in {template.ref}'s config (no num_hidden_layers/n_layer)")
    return config


def _layer_types(slices: list[_Slice], models: _ModelAccess, fallback: list) -> list:
    """Per-layer attention types follow their source layers (e.g. Qwen2's and Gemma's `layer_types`)."""
    types = []
    for slice_ in slices:
        source = slice_.inputs[0]
        own = text_config(models.get(source.model, None).config).get("layer_types")
        for offset in range(slice_.length):
            layer = source.start + offset
            if isinstance(own, list) and layer < len(own):
                types.append(own[layer])
            else:
                types.append(fallback[min(layer, len(fallback) - 1)])
    return types
