"""The models a plan reads: their folders, configs and tensor headers (no weights), and the tensor-name rules the
planner uses (which tensors sit before the layers, which have one row per vocabulary entry).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from auto_merge.merge.io import TensorInfo, tensor_infos
from auto_merge.merge.recipe import RecipeError
from auto_merge.models.inspect import read_model_config, text_config
from auto_merge.models.layers import layer_index, layer_key


# Tensors outside the layers that sit before them (embeddings); all others (norms, heads) come after.
PRE_LAYER_MARKERS = ("embed_tokens", "embed_positions", "embed_in", "wte", "wpe", "word_embeddings",
                     "position_embeddings", "token_type_embeddings")
# Tensors with one row per vocabulary entry, re-mapped by token when vocabularies differ.
VOCAB_MARKERS = ("embed_tokens", "embed_in", "wte", "word_embeddings", "lm_head", "embed_out")
HEAD_MARKERS = ("lm_head", "embed_out")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
MERGEABLE_DTYPES = FLOAT_DTYPES + ("float64",)
DEPTH_KEYS = ("num_hidden_layers", "n_layer")


# ---------------------------------------------------------------------------------------------- tensor names
def with_layer(key: tuple[str, str], index: int) -> str:
    return f"{key[0]}{index}{key[1]}"


def _has_marker(name: str, markers: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(marker in parts for marker in markers)


def is_pre_layer(name: str) -> bool:
    return _has_marker(name, PRE_LAYER_MARKERS)


def is_vocab_tensor(name: str) -> bool:
    return layer_index(name) is None and _has_marker(name, VOCAB_MARKERS)


# ------------------------------------------------------------------------------------------------ source models
@dataclass
class SourceModel:
    """What the planner knows about one model: its folder, config and tensor headers, grouped by layer."""

    ref: str
    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    allow_pickle: bool = False
    layers: dict[int, dict[tuple[str, str], str]] = field(init=False)
    non_layer: list[str] = field(init=False)

    def __post_init__(self):
        self.layers = {}
        self.non_layer = []
        for name in sorted(self.tensors):
            key = layer_key(name)
            if key is None:
                self.non_layer.append(name)
            else:
                self.layers.setdefault(layer_index(name), {})[key] = name

    @classmethod
    def from_folder(cls, ref: str, path: str | Path, *, allow_pickle: bool = False) -> "SourceModel":
        path = Path(path)
        return cls(ref=ref, path=path, config=read_model_config(path),
                   tensors=tensor_infos(path, allow_pickle=allow_pickle), allow_pickle=allow_pickle)

    @property
    def depth(self) -> int:
        """Number of layers, counted from the tensor names (the config's count is only cross-checked)."""
        return max(self.layers) + 1 if self.layers else 0

    @property
    def input_embedding(self) -> str | None:
        candidates = [name for name in self.non_layer if is_vocab_tensor(name) and is_pre_layer(name)]
        return candidates[0] if candidates else None

    @property
    def embedding_rows(self) -> int:
        name = self.input_embedding
        if name is not None:
            return self.tensors[name].shape[0]
        vocab = text_config(self.config).get("vocab_size")
        if not isinstance(vocab, int):
            raise RecipeError(f"model {self.ref} has no input embedding tensor and no vocab_size in its config")
        return vocab

    def lookup(self, name: str) -> str | None:
        """The tensor to read for ``name``: itself, or the input embedding for a missing (tied) LM head."""
        if name in self.tensors:
            return name
        if layer_index(name) is None and _has_marker(name, HEAD_MARKERS):
            return self.input_embedding
        return None

    @property
    def stored_dtype(self) -> str:
        for dtype in (text_config(self.config).get("dtype"), text_config(self.config).get("torch_dtype"),
                      self.config.get("dtype"), self.config.get("torch_dtype")):
            if dtype in FLOAT_DTYPES:
                return dtype
        floats = [info.dtype for info in self.tensors.values() if info.dtype in FLOAT_DTYPES]
        return floats[0] if floats else "float32"


class ModelCatalog:
    """Resolves model references to folders and caches their metadata, so repeated plans read each header once."""

    def __init__(self, *, aliases: Mapping[str, str] | None = None, zoo_seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, search_dirs: Sequence[str | os.PathLike] = (),
                 allow_pickle: bool = False, build_zoo: bool = True, pickle_opt_in: str | None = None):
        self.aliases = dict(aliases or {})
        self.zoo_seed = zoo_seed
        self.cache_dir = cache_dir
        self.search_dirs = list(search_dirs)
        self.allow_pickle = allow_pickle
        self.pickle_opt_in = pickle_opt_in  # how the caller's user allows pickles, when not the config key
        self.build_zoo = build_zoo
        self._models: dict[str, SourceModel] = {}

    def add(self, model: SourceModel) -> None:
        """Register an already inspected model under its reference (tests, callers with their own folders)."""
        self._models[model.ref] = model

    def resolve(self, ref: str) -> Path:
        from auto_merge.models.resolve import resolve_model_ref

        if ref in self._models:
            return self._models[ref].path
        return resolve_model_ref(ref, aliases=self.aliases, zoo_seed=self.zoo_seed, cache_dir=self.cache_dir,
                                 build_zoo=self.build_zoo, search_dirs=self.search_dirs)

    def get(self, ref: str) -> SourceModel:
        model = self._models.get(ref)
        if model is None:
            model = SourceModel.from_folder(ref, self.resolve(ref), allow_pickle=self.allow_pickle)
            self._models[ref] = model
        return model
