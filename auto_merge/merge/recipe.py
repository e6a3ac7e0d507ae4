"""Merge recipes: one typed description of any merge, read from mergekit YAML or the reference's slice format.

A recipe names the models to merge either as ``models`` (every layer of every model) or as ``slices`` (each slice a
list of sources with a ``layer_range``; slices are stacked in order), a ``merge_method``, an optional ``base_model``,
``parameters``, the output ``dtype`` and the ``tokenizer_source``. It says nothing about tensors: the planner
(:mod:`auto_merge.merge.plan`) turns it into one task per output tensor.

Parameters can be given at four levels; the most specific one that has a value for a tensor wins (mergekit's order):
per source (``slices[i].sources[j].parameters`` or ``models[j].parameters``), per slice, and recipe-wide. Each value is
a scalar, a *gradient* (a list of numbers interpolated piecewise-linearly across the layers of a slice: layer i of n
sits at position i/(n-1), a one-layer slice at 1; the tensors outside the layers, embeddings, final norm and LM head,
sit at 0 and take a gradient's first value, as in mergekit), or a list of ``{filter, value}`` entries. For a tensor, the first entry whose ``filter`` is
a substring of the output tensor name wins; the entry without a filter (or with ``filter: "*"``) is the fallback
wherever it is written. When nothing matches at one level, the next level is asked.

Extensions to the mergekit schema (all optional): a slice may carry its own ``merge_method`` (the reference's slices
do), and ``base_layer_range`` (the reference's ``target``) says which layers of the base model a slice's task vectors
are taken against.

The reference's slice format (``merging_method: {METHOD: {PARAM: [{filter, value}]}}`` on slices or next to
``models``) is translated into this schema when a file is read (:mod:`auto_merge.formats.recipe_files`,
:mod:`auto_merge.formats.reference_recipe`); the mergekit export lives in :mod:`auto_merge.formats.mergekit`. This
module knows only its own schema.

The output vocabulary is ``tokenizer_source`` (base, union or a model) or mergekit's ``tokenizer:`` block
(:class:`TokenizerBlock`, see :mod:`auto_merge.merge.tokenizer`); ``chat_template`` (a name, ``auto`` or a Jinja
template) replaces the output tokenizer's template.

A file may hold several YAML documents (mergekit-multi, :func:`auto_merge.formats.recipe_files.load_stages`): each a recipe with a ``name``, at most
one unnamed (the final merge); a stage's name used as a model means that stage's output.

Errors are :class:`RecipeError` (a ValueError) naming the recipe file and key path and the allowed values, raised
before any model is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from auto_merge.errors import AutoMergeError
from auto_merge.merge.methods import get_method, list_methods
from auto_merge.merge.param_values import ParamEntry, Parameters, normalise_parameters
from auto_merge.merge.tokenizer import CHAT_TEMPLATES, chat_template_kind

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
TOKENIZER_MODES = ("base", "union")
# Accepted by every method (global scope): multiplies the merged tensor. Depth strategies fold a layer's output scale
# into its MLP output projection with it (`output_scale: [{filter: mlp.down_proj, value: s}, {value: 1.0}]`).
OUTPUT_SCALE = "output_scale"
# Keys of the mergekit schema this version does not implement: rejected with a message rather than ignored.
UNSUPPORTED_KEYS = {
    "modules": "multi-module (e.g. vision-language) merges",
    "out_path": "out_path (give the output folder on the command line)",
}
UNSUPPORTED_SLICE_KEYS = {"residual_weight": "residual_weight"}


class RecipeError(AutoMergeError, ValueError):
    """An invalid recipe: names the file, the key path (``slices[1].sources[0].layer_range``) and what is allowed.
    ``key_path`` holds the same path as a tuple (``("slices", 1, "sources", 0, "layer_range")``)."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None,
                 allowed: str | None = None):
        self.source = source
        self.key = key
        self.key_path = split_key(key)
        self.allowed = allowed
        self.detail = message
        text = message if not key else f"{key}: {message}"
        if allowed:
            text += f"; allowed: {allowed}"
        super().__init__(f"{source}: {text}" if source else text)


def split_key(key: str | None) -> tuple:
    """``slices[1].sources[0].layer_range`` → ``("slices", 1, "sources", 0, "layer_range")``."""
    path: list = []
    for part in (key or "").split("."):
        name, _, rest = part.partition("[")
        if name:
            path.append(name)
        for index in rest.rstrip("]").split("][") if rest else ():
            path.append(int(index) if index.isdigit() else index)
    return tuple(path)


# ------------------------------------------------------------------------------------------------ recipe model
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("parameters", mode="before", check_fields=False)
    @classmethod
    def _normalise_parameter_spellings(cls, value):
        return normalise_parameters(value)


class ModelSource(_Strict):
    """One entry of ``models``: a whole model and its per-model parameters."""

    model: str
    parameters: Parameters = Field(default_factory=dict)


class SliceSource(_Strict):
    """One source of a slice: layers ``[start, end)`` of ``model``, with per-source parameters."""

    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = Field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class Slice(_Strict):
    """Output layers made from equally long layer ranges of the sources."""

    sources: list[SliceSource] = Field(min_length=1)
    merge_method: Optional[str] = None
    base_model: Optional[str] = None
    base_layer_range: Optional[tuple[int, int]] = None
    parameters: Parameters = Field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].length


class ModelTokenSource(BaseModel):
    """A token's embedding taken from another token of a model: ``{kind: model_token, model, token | token_id}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = Field(default=None, ge=0)
    token: Optional[str] = None

    @model_validator(mode="after")
    def _one_token(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token and token_id")
        return self


class ZeroSource(BaseModel):
    """A token's embedding set to zeros: ``{kind: zero}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["zero"]


class TokenSetting(BaseModel):
    """How one token's embedding rows are made (mergekit's ``tokenizer.tokens.TOKEN``): ``source`` a model (its row
    of that token), a model's other token, or zeros; ``force`` also replaces the rows of models that have the token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Any
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _source_kind(cls, value):
        if isinstance(value, str) and value:
            return value
        if isinstance(value, Mapping):
            kind = value.get("kind")
            model = {"model_token": ModelTokenSource, "zero": ZeroSource}.get(kind)
            if model is not None:
                try:
                    return model.model_validate(value)
                except ValidationError as error:
                    first = error.errors()[0]
                    where = ".".join(str(part) for part in first["loc"])
                    raise ValueError(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") \
                        from None
        raise ValueError(f"{value!r} is not a token source; allowed: a model reference, "
                         "{kind: model_token, model, token | token_id} or {kind: zero}")

    @property
    def source_model(self) -> str | None:
        if isinstance(self.source, str):
            return self.source
        return self.source.model if isinstance(self.source, ModelTokenSource) else None


class TokenizerBlock(BaseModel):
    """mergekit's ``tokenizer:`` block: the output vocabulary's ``source`` (base, union or a model; default union),
    per-token embedding sources (``tokens``; tokens the vocabulary lacks are added) and ``pad_to_multiple_of``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "union"
    tokens: dict[str, TokenSetting] = Field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = Field(default=None, ge=1)

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, value):
        if not value:
            raise ValueError("must not be empty; allowed: base, union or a model reference")
        return value

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens_mapping(cls, value):
        if value is None:
            return {}
        if isinstance(value, Mapping) and not all(isinstance(token, str) and token for token in value):
            raise ValueError("token keys are non-empty strings")
        return value

    def to_dict(self, name=lambda ref: ref) -> dict:
        data: dict[str, Any] = {"source": self.source if self.source in TOKENIZER_MODES else name(self.source)}
        if self.tokens:
            data["tokens"] = {}
            for token, setting in self.tokens.items():
                source = setting.source
                if isinstance(source, str):
                    source = name(source)
                else:
                    source = source.model_dump(exclude_none=True)
                    if "model" in source:
                        source["model"] = name(source["model"])
                data["tokens"][token] = {"source": source, **({"force": True} if setting.force else {})}
        if self.pad_to_multiple_of is not None:
            data["pad_to_multiple_of"] = self.pad_to_multiple_of
        return data


class Recipe(_Strict):
    """A merge: ``models`` or ``slices``, the method(s), base model, parameters, output dtype and tokenizer."""

    models: Optional[list[ModelSource]] = None
    slices: Optional[list[Slice]] = None
    merge_method: Optional[str] = None
    base_model: Optional[str] = None
    parameters: Parameters = Field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: str = "base"  # with a `tokenizer` block: its source
    tokenizer: Optional[TokenizerBlock] = None
    chat_template: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _block_source(cls, data):
        if isinstance(data, Mapping) and isinstance(data.get("tokenizer"), Mapping):
            if "tokenizer_source" in data and data["tokenizer_source"] != data["tokenizer"].get("source", "union"):
                raise ValueError("give tokenizer_source or a tokenizer block, not both")
            data = {**data, "tokenizer_source": data["tokenizer"].get("source", "union")}
        return data

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, value):
        if value is not None:
            try:
                chat_template_kind(value)
            except ValueError as error:
                raise ValueError(f"{error}; allowed: auto, {', '.join(CHAT_TEMPLATES)} or a Jinja template") from None
        return value

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _canonical_dtype(cls, value):
        if value is None:
            return None
        if value not in DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {value!r}; allowed: {', '.join(sorted(set(DTYPE_ALIASES.values())))}")
        return DTYPE_ALIASES[value]

    @property
    def output_dtype(self) -> str | None:
        """The dtype tensors are written in (``out_dtype``, else ``dtype``); None = the template model's dtype."""
        return self.out_dtype or self.dtype

    def slice_method(self, index: int) -> str:
        assert self.slices is not None
        return self.slices[index].merge_method or self.merge_method  # type: ignore[return-value]

    def methods(self) -> list[str]:
        """The merge methods the recipe uses, in order of first use."""
        if self.slices is None:
            return [self.merge_method] if self.merge_method else []
        seen: list[str] = []
        for index in range(len(self.slices)):
            method = self.slice_method(index)
            if method not in seen:
                seen.append(method)
        return seen

    def model_refs(self) -> list[str]:
        """Every model the recipe names, in order of first mention (base first)."""
        refs: list[str] = []

        def add(ref: str | None) -> None:
            if ref and ref not in refs:
                refs.append(ref)

        add(self.base_model)
        for entry in self.models or []:
            add(entry.model)
        for slice_ in self.slices or []:
            add(slice_.base_model)
            for source in slice_.sources:
                add(source.model)
        if self.tokenizer_source not in TOKENIZER_MODES:
            add(self.tokenizer_source)
        for setting in (self.tokenizer.tokens.values() if self.tokenizer else ()):
            add(setting.source_model)
        return refs

    def to_dict(self) -> dict:
        """Plain data in this module's own schema (mergekit keys plus the extensions), minimal and re-readable."""
        data: dict[str, Any] = {}
        if self.base_model:
            data["base_model"] = self.base_model
        if self.merge_method:
            data["merge_method"] = self.merge_method
        if self.models is not None:
            data["models"] = [_source_dict(entry.model, None, entry.parameters) for entry in self.models]
        if self.slices is not None:
            data["slices"] = [_slice_dict(slice_) for slice_ in self.slices]
        if self.parameters:
            data["parameters"] = parameters_to_data(self.parameters)
        if self.dtype:
            data["dtype"] = self.dtype
        if self.out_dtype:
            data["out_dtype"] = self.out_dtype
        if self.tokenizer is not None:
            data["tokenizer"] = self.tokenizer.to_dict()
        elif self.tokenizer_source != "base":
            data["tokenizer_source"] = self.tokenizer_source
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        return data

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


def _source_dict(model: str, layer_range, parameters: Parameters) -> dict:
    data: dict[str, Any] = {"model": model}
    if layer_range is not None:
        data["layer_range"] = list(layer_range)
    if parameters:
        data["parameters"] = parameters_to_data(parameters)
    return data


def _slice_dict(slice_: Slice) -> dict:
    data: dict[str, Any] = {"sources": [_source_dict(s.model, s.layer_range, s.parameters) for s in slice_.sources]}
    if slice_.merge_method:
        data["merge_method"] = slice_.merge_method
    if slice_.base_model:
        data["base_model"] = slice_.base_model
    if slice_.base_layer_range:
        data["base_layer_range"] = list(slice_.base_layer_range)
    if slice_.parameters:
        data["parameters"] = parameters_to_data(slice_.parameters)
    return data


def parameters_to_data(parameters: Parameters, rename: Mapping[str, str] | None = None) -> dict:
    """Parameters as plain YAML data: a lone fallback entry becomes its bare value, the fallback is written last."""
    data = {}
    for name, entries in parameters.items():
        if len(entries) == 1 and entries[0].is_fallback:
            data[name] = _plain_value(entries[0].value)
            continue
        ordered = [entry for entry in entries if not entry.is_fallback] + [e for e in entries if e.is_fallback][:1]
        data[name] = [({"filter": e.filter} if not e.is_fallback else {}) | {"value": _plain_value(e.value)}
                      for e in ordered]
    return data


def _plain_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class _RecipeDumper(yaml.SafeDumper):
    """Number lists (gradients, layer ranges) in flow style, the rest in block style."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True)


def rename_models(recipe: Recipe, names: Mapping[str, str]) -> Recipe:
    """The recipe with model references replaced as ``names`` says (stage names → their output folders)."""
    if not any(ref in names for ref in recipe.model_refs()):
        return recipe
    data = recipe.to_dict()

    def swap(holder: dict, key: str) -> None:
        if holder.get(key) in names:
            holder[key] = names[holder[key]]

    swap(data, "base_model")
    for entry in data.get("models", []):
        swap(entry, "model")
    for slice_ in data.get("slices", []):
        swap(slice_, "base_model")
        for source_ in slice_["sources"]:
            swap(source_, "model")
    if data.get("tokenizer_source") not in (None, *TOKENIZER_MODES):
        swap(data, "tokenizer_source")
    if recipe.tokenizer is not None:
        data["tokenizer"] = recipe.tokenizer.to_dict(lambda ref: names.get(ref, ref))
    return parse_recipe(data)


def parse_recipe(data: Any, *, source: str | None = None) -> Recipe:
    """Validate recipe data (already parsed YAML). Raises RecipeError naming ``source`` and the key path."""
    if isinstance(data, Recipe):
        return data
    if not isinstance(data, Mapping):
        raise RecipeError(f"a recipe is a mapping, got {type(data).__name__}", source=source)
    data = dict(data)
    for key, what in UNSUPPORTED_KEYS.items():
        if key in data:
            raise RecipeError(f"{what} is not supported by this version", source=source, key=key)
    for index, slice_ in enumerate(data.get("slices") or []):
        if isinstance(slice_, Mapping):
            for key, what in UNSUPPORTED_SLICE_KEYS.items():
                if key in slice_:
                    raise RecipeError(f"{what} is not supported by this version", source=source,
                                      key=f"slices[{index}].{key}")
    if "tokenizer" in data and "tokenizer_source" in data:
        raise RecipeError("give tokenizer_source or a tokenizer block (with its source), not both", source=source,
                          key="tokenizer")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise _from_validation_error(error, source) from None
    check_recipe(recipe, source=source)
    return recipe


def _from_validation_error(error: ValidationError, source: str | None) -> RecipeError:
    first = error.errors()[0]
    key = format_key(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
        parent = first["loc"][:-1]
        allowed = _allowed_keys(parent)
        more = f" (and {error.error_count() - 1} more error(s))" if error.error_count() > 1 else ""
        return RecipeError(message + more, source=source, key=key, allowed=allowed)
    more = f" (and {error.error_count() - 1} more error(s))" if error.error_count() > 1 else ""
    return RecipeError(message + more, source=source, key=key)


def _allowed_keys(parent: tuple) -> str:
    names = [part for part in parent if isinstance(part, str)]
    last = names[-1] if names else None
    if names[:1] == ["tokenizer"]:
        return ", ".join({1: TokenizerBlock, 3: TokenSetting}.get(len(names), ModelTokenSource).model_fields)
    if last is None:
        model = Recipe
    elif last == "models":
        model = ModelSource
    elif last == "slices":
        model = Slice
    elif last == "sources":
        model = SliceSource
    else:
        model = ParamEntry
    return ", ".join(model.model_fields)


def format_key(loc: tuple | list) -> str:
    """('slices', 1, 'sources', 0, 'layer_range') → 'slices[1].sources[0].layer_range'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


# ------------------------------------------------------------------------------------------------ checks
def check_recipe(recipe: Recipe, *, source: str | None = None) -> None:
    """Cross-field checks that need no model: structure, methods, parameter names and scopes, layer ranges."""

    def fail(message: str, key: str | None = None, allowed: str | None = None) -> None:
        raise RecipeError(message, source=source, key=key, allowed=allowed)

    if (recipe.models is None) == (recipe.slices is None):
        fail("give exactly one of `models` and `slices`", key="models" if recipe.models else None,
             allowed="models: [...] (whole models) or slices: [...] (layer ranges)")
    if recipe.models is not None and not recipe.models:
        fail("needs at least one model", key="models")
    if recipe.slices is not None and not recipe.slices:
        fail("needs at least one slice", key="slices")
    _check_method_name(recipe.merge_method, "merge_method", fail)
    if recipe.tokenizer_source in ("", None):
        fail("must not be empty", key="tokenizer_source", allowed="base, union or a model reference")

    if recipe.models is not None:
        if recipe.merge_method is None:
            fail("missing", key="merge_method", allowed=", ".join(list_methods()))
        method = recipe.merge_method
        for index, entry in enumerate(recipe.models):
            _check_parameters(entry.parameters, [method], f"models[{index}].parameters", fail, per_model=True)
        _check_base(method, recipe.base_model, "base_model", fail)
        _check_parameters(recipe.parameters, [method], "parameters", fail, per_model=False)
        return

    for index, slice_ in enumerate(recipe.slices or []):
        key = f"slices[{index}]"
        _check_method_name(slice_.merge_method, f"{key}.merge_method", fail)
        method = slice_.merge_method or recipe.merge_method
        if method is None:
            fail("no merge method: set the recipe's merge_method or this slice's", key=f"{key}.merge_method",
                 allowed=", ".join(list_methods()))
        for source_index, source_ in enumerate(slice_.sources):
            where = f"{key}.sources[{source_index}]"
            _check_layer_range(source_.layer_range, f"{where}.layer_range", fail)
            _check_parameters(source_.parameters, [method], f"{where}.parameters", fail, per_model=True)
            if source_.length != slice_.sources[0].length:
                fail(f"spans {source_.length} layers but {key}.sources[0] spans {slice_.sources[0].length}",
                     key=f"{where}.layer_range", allowed="layer ranges of equal length within a slice")
        if slice_.base_layer_range is not None:
            _check_layer_range(slice_.base_layer_range, f"{key}.base_layer_range", fail)
            if slice_.base_layer_range[1] - slice_.base_layer_range[0] != slice_.length:
                fail(f"spans {slice_.base_layer_range[1] - slice_.base_layer_range[0]} layers, the slice "
                     f"{slice_.length}", key=f"{key}.base_layer_range", allowed="a range as long as the sources'")
        _check_base(method, slice_.base_model or recipe.base_model, f"{key}.base_model", fail)
        _check_parameters(slice_.parameters, [method], f"{key}.parameters", fail, per_model=False)
    _check_parameters(recipe.parameters, recipe.methods(), "parameters", fail, per_model=False)


def _check_method_name(method: str | None, key: str, fail) -> None:
    if method is not None:
        try:
            get_method(method)
        except ValueError:
            fail(f"unknown merge method {method!r}", key=key, allowed=", ".join(list_methods()))


def _check_base(method: str, base_model: str | None, key: str, fail) -> None:
    if get_method(method).base_model == "required" and not base_model:
        fail(f"{method} needs a base model", key=key, allowed="a model reference (local folder, zoo:NAME, hub id)")


def _check_layer_range(layer_range: tuple[int, int], key: str, fail) -> None:
    start, end = layer_range
    if start < 0 or end <= start:
        fail(f"[{start}, {end}] is empty or negative", key=key, allowed="[start, end) with 0 <= start < end")


def accepted_parameter_names(method: str) -> dict[str, str]:
    """Parameter name → scope ('global' or 'per_model') that a recipe may give for ``method``."""
    spec = get_method(method)
    names = {param.name: param.scope for param in spec.params}
    if spec.has_param("rescale_mode"):
        names["rescale"] = "global"  # mergekit's bool spelling, translated by the registry
    names.update({name: "global" for name in spec.ignored_params})  # mergekit's int8_mask: accepted, ignored
    names[OUTPUT_SCALE] = "global"
    return names


def _check_parameters(parameters: Parameters, methods: list[str], key: str, fail, *, per_model: bool) -> None:
    for name in parameters:
        scopes = [accepted_parameter_names(method).get(name) for method in methods]
        known = [scope for scope in scopes if scope is not None]
        if not known:
            allowed = sorted({n for method in methods for n, scope in accepted_parameter_names(method).items()
                              if not per_model or scope == "per_model"})
            fail(f"unknown parameter {name!r} for {' / '.join(methods)}", key=f"{key}.{name}",
                 allowed=", ".join(allowed) or "none")
        if per_model and "per_model" not in known:
            fail(f"{name!r} is a global parameter of {' / '.join(methods)} and cannot be set per model",
                 key=f"{key}.{name}", allowed="set it in the slice's or the recipe's parameters")
