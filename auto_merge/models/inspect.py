"""Model metadata without loading weights: `config.json` and tensor names from safetensors headers.

A safetensors file starts with an 8-byte little-endian header length and a JSON header naming every tensor, so the
names cost one small read. Pickle (`.bin`) checkpoints are refused unless explicitly allowed, because unpickling can
run code; when allowed, names are read with `torch.load(weights_only=True, mmap=True)`, which maps but does not
read the tensor data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auto_merge.errors import AutoMergeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Headers are small (tens of kB to a few MB); anything near this is a corrupt file, not a header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelInspectionError(AutoMergeError, ValueError):
    """A model folder whose config or tensor names cannot be read."""


class PickleRefusedError(ModelInspectionError):
    """A folder with only pickle weights, read without the user's opt-in. `opt_in` says how to give it; each entry
    point names its own (a config key, a command-line flag) with :meth:`with_opt_in`."""

    def __init__(self, folder: Path, file_name: str, opt_in: str = "set global_params.allow_pickle: true"):
        self.folder, self.file_name, self.opt_in = folder, file_name, opt_in
        super().__init__(f"{folder} holds only a pickle checkpoint ({file_name}), refused because unpickling can run "
                         f"code; convert it to safetensors or {opt_in}")

    def with_opt_in(self, opt_in: str) -> "PickleRefusedError":
        return PickleRefusedError(self.folder, self.file_name, opt_in)


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a model folder."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelInspectionError(f"{path} is not a model folder: no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelInspectionError(f"cannot read {config_file}: {error}") from error
    if not isinstance(config, dict):
        raise ModelInspectionError(f"{config_file} does not hold a JSON object")
    return config


def list_tensor_names(path: str | Path, *, allow_pickle: bool = False) -> list[str]:
    """Sorted tensor names of the checkpoint in a model folder, read from headers/indexes only."""
    folder = Path(path)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _names_from_index(folder / SAFETENSORS_INDEX)
    if (folder / SAFETENSORS_SINGLE).is_file():
        return sorted(read_safetensors_header(folder / SAFETENSORS_SINGLE))
    other_safetensors = sorted(folder.glob("*.safetensors"))
    if other_safetensors:  # shards without an index
        return sorted({name for file in other_safetensors for name in read_safetensors_header(file)})
    pickle_files = [folder / PICKLE_INDEX] if (folder / PICKLE_INDEX).is_file() else sorted(folder.glob("*.bin"))
    if pickle_files:
        if not allow_pickle:
            raise PickleRefusedError(folder, pickle_files[0].name)
        if pickle_files[0].name == PICKLE_INDEX:
            return _names_from_index(pickle_files[0])
        return sorted({name for file in pickle_files for name in _names_from_pickle(file)})
    present = ", ".join(sorted(entry.name for entry in folder.iterdir())) if folder.is_dir() else "(not a folder)"
    raise ModelInspectionError(f"no checkpoint in {folder} (expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}); "
                               f"found: {present or 'nothing'}")


def read_safetensors_header(file: str | Path) -> dict[str, dict[str, Any]]:
    """Tensor name → {dtype, shape, data_offsets} from a safetensors file's header (the data is not read)."""
    file = Path(file)
    try:
        with file.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) != 8:
                raise ModelInspectionError(f"{file} is too short to be a safetensors file")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > min(_MAX_HEADER_BYTES, file.stat().st_size - 8):
                raise ModelInspectionError(f"{file} is truncated or corrupt: its header length ({header_length}) "
                                           f"does not fit in the file")
            header = json.loads(stream.read(header_length).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelInspectionError(f"cannot read the safetensors header of {file}: {error}") from error
    if not isinstance(header, dict):
        raise ModelInspectionError(f"{file} has a malformed safetensors header")
    header.pop("__metadata__", None)
    _check_data_offsets(file, header, data_bytes=file.stat().st_size - 8 - header_length)
    return header


# Bytes per element of safetensors dtypes (others are accepted without the size check).
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _check_data_offsets(file: Path, header: dict, data_bytes: int) -> None:
    """Every tensor's bytes lie inside the file and match its shape: a truncated or corrupt file is found from the
    header, before any weight is read (reading it would fault or give garbage mid-run)."""
    for name, entry in header.items():
        try:
            start, end = (int(x) for x in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            dtype = entry["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ModelInspectionError(f"{file}: the safetensors header entry of {name!r} is malformed") from None
        if not 0 <= start <= end or end > data_bytes:
            raise ModelInspectionError(
                f"{file} is truncated or corrupt: tensor {name!r} lies at bytes {start}-{end} of the data, but the "
                f"file holds only {data_bytes} bytes of data (an interrupted download or copy?)")
        width = _DTYPE_BYTES.get(dtype)
        if width is not None:
            expected = width
            for dim in shape:
                expected *= dim
            if end - start != expected:
                raise ModelInspectionError(f"{file} is corrupt: tensor {name!r} of shape {shape} ({dtype}) should take "
                                           f"{expected} bytes, its header gives {end - start}")


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from every safetensors file of a model folder (headers only; checks each file's data
    offsets too). Empty for a pickle checkpoint."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        for name, entry in read_safetensors_header(file).items():
            shapes[name] = tuple(entry["shape"])
    return shapes


def _names_from_index(index_file: Path) -> list[str]:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ModelInspectionError(f"cannot read the weight map of {index_file}: {error}") from error
    missing = sorted({shard for shard in weight_map.values() if not (index_file.parent / shard).is_file()})
    if missing:
        raise ModelInspectionError(f"{index_file} lists shards that are missing: {', '.join(missing)}")
    return sorted(weight_map)


def _names_from_pickle(file: Path) -> list[str]:
    return sorted(load_pickle_state(file))


def load_pickle_state(file: Path) -> dict:
    """A pickle checkpoint's state dict, loaded with weights_only (callers check the user opted in to pickles)."""
    import torch  # only for explicitly allowed pickle checkpoints

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types (UnpicklingError, RuntimeError, ...) for bad files
        raise ModelInspectionError(f"cannot read {file} with weights_only=True: {error}") from error
    if not isinstance(state, dict):
        raise ModelInspectionError(f"{file} does not hold a state dict")
    return state


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it under `text_config`)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) and "num_hidden_layers" not in config else config


def model_depth(config: dict[str, Any]) -> int | None:
    """Number of transformer layers (`num_hidden_layers`, or GPT-2's `n_layer`)."""
    inner = text_config(config)
    depth = inner.get("num_hidden_layers", inner.get("n_layer"))
    return depth if isinstance(depth, int) and not isinstance(depth, bool) else None


@dataclass
class ModelInfo:
    """What validation knows about one model: where it is, its config and its tensor names."""

    reference: str
    path: Path
    config: dict[str, Any]
    tensor_names: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # from safetensors headers (empty: pickle)

    @property
    def depth(self) -> int | None:
        return model_depth(self.config)


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def model_chat_template(folder: Path) -> str | None:
    """The chat template a tokenizer folder declares: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (its ``default`` entry when it holds several), else ``chat_template.json``'s."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            continue
        if isinstance(template, list):  # [{name, template}, ...]
            template = next((entry.get("template") for entry in template
                             if isinstance(entry, dict) and entry.get("name") == "default"), None)
        if isinstance(template, str) and template:
            return template
    return None


def has_chat_template(path: str | Path) -> bool:
    """Whether the tokenizer in a model folder carries a chat template."""
    return model_chat_template(path) is not None


def inspect_model(reference: str, path: str | Path, *, allow_pickle: bool = False) -> ModelInfo:
    """Config and tensor names of the model folder `path` (headers only)."""
    path = Path(path)
    return ModelInfo(reference=reference, path=path, config=read_model_config(path),
                     tensor_names=list_tensor_names(path, allow_pickle=allow_pickle), shapes=tensor_shapes(path))


# Files whose change changes what a model computes (weights, their index, its config, its tokenizer).
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model")


def model_identity(path: str | Path) -> str:
    """A digest of a model folder's files as they are now (name, size and modification time of each weight, config
    and tokenizer file), without reading the weights: it changes when a file is replaced in place, so results
    recorded for the old files are never reused for the new ones."""
    import hashlib

    digest = hashlib.sha256()
    folder = Path(path)
    for file in sorted(folder.iterdir()) if folder.is_dir() else []:
        if file.is_file() and file.suffix in _IDENTITY_SUFFIXES:
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# config.json fields that must agree for tensors to be mergeable, with GPT-2 style alternative names.
ARCHITECTURE_FIELDS: dict[str, tuple[str, ...]] = {
    "model_type": ("model_type",),
    "architectures": ("architectures",),
    "hidden_size": ("hidden_size", "n_embd"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size", "n_inner"),
}


def architecture_signature(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of ARCHITECTURE_FIELDS, with the usual defaults filled in (kv heads = heads, head_dim = hidden /
    heads) so that configs that spell them out and configs that do not compare equal."""
    inner = text_config(config)
    signature = {}
    for name, spellings in ARCHITECTURE_FIELDS.items():
        source = config if name in ("model_type", "architectures") else inner
        signature[name] = next((source[key] for key in spellings if key in source), None)
    if signature["num_key_value_heads"] is None:
        signature["num_key_value_heads"] = signature["num_attention_heads"]
    if signature["head_dim"] is None and signature["hidden_size"] and signature["num_attention_heads"]:
        signature["head_dim"] = signature["hidden_size"] // signature["num_attention_heads"]
    return signature


def architecture_differences(config: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """The architecture fields on which ``config`` differs from ``reference`` (as text); a field missing on either
    side (e.g. no `architectures` in an old config.json) cannot show a difference."""
    actual, expected = architecture_signature(config), architecture_signature(reference)
    return [f"{name} {actual[name]!r} (base: {expected[name]!r})" for name in ARCHITECTURE_FIELDS
            if None not in (actual[name], expected[name]) and actual[name] != expected[name]]
