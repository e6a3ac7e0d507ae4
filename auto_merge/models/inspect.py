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

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Headers are small (tens of kB to a few MB); anything near this is a corrupt file, not a header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelInspectionError(ValueError):
    """A model folder whose config or tensor names cannot be read."""


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
            raise ModelInspectionError(
                f"{folder} holds only a pickle checkpoint ({pickle_files[0].name}), refused because unpickling can "
                f"run code; convert it to safetensors or set global_params.allow_pickle: true")
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
                raise ModelInspectionError(f"{file} has an invalid safetensors header length ({header_length})")
            header = json.loads(stream.read(header_length).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelInspectionError(f"cannot read the safetensors header of {file}: {error}") from error
    if not isinstance(header, dict):
        raise ModelInspectionError(f"{file} has a malformed safetensors header")
    header.pop("__metadata__", None)
    return header


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

    @property
    def depth(self) -> int | None:
        return model_depth(self.config)


def inspect_model(reference: str, path: str | Path, *, allow_pickle: bool = False) -> ModelInfo:
    """Config and tensor names of the model folder `path` (headers only)."""
    path = Path(path)
    return ModelInfo(reference=reference, path=path, config=read_model_config(path),
                     tensor_names=list_tensor_names(path, allow_pickle=allow_pickle))
