"""Checkpoint input and output for the merge engine: lazy name-indexed reading and atomic, sharded writing.

Reading: a model folder holds one safetensors file, shards with a `model.safetensors.index.json`, or shards without an
index. :class:`CheckpointReader` maps every tensor name to its file from the index or the headers alone and reads a
tensor only when asked, one at a time, as a zero-copy view of the memory-mapped file (its pages are dropped from the
process again by :meth:`CheckpointReader.release`). A file must not be rewritten while it is being read (as with
safetensors' own ``safe_open``, a mapping of a file cut short would fault). Pickle checkpoints (`.bin`) are read only with ``allow_pickle=True``, and then
with ``torch.load(weights_only=True, mmap=True)``, which refuses arbitrary objects and maps rather than reads the data.

Writing: the shard layout is fixed up front from the output tensors' shapes and dtypes, so file names
(``model-00001-of-00003.safetensors``) and each shard's safetensors header are final from the start, and
:class:`ShardedWriter` streams every tensor's bytes to disk as it arrives (in layout order): no shard is buffered. 
:func:`auto_merge.output_dirs.atomic_folder` builds the output in a temporary folder beside ``OUT_DIR`` and renames it
into place at the end; an existing ``OUT_DIR`` is replaced only with ``overwrite``, only when auto-merge wrote it, and
only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import shutil
import struct
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_merge.models.inspect import (
    PICKLE_INDEX,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    ModelInspectionError,
    load_pickle_state,
    list_tensor_names,
    read_safetensors_header,
)

# safetensors dtype codes → torch dtype names, and bytes per element of each.
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
               "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}
DEFAULT_SHARD_SIZE = "2GB"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model")
SIDE_FILES = ("generation_config.json",)


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about a tensor: its shape and its stored dtype (a torch dtype name)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    def nbytes(self, dtype: str | None = None) -> int:
        return self.numel * DTYPE_BYTES[dtype or self.dtype]


def parse_size(text: str | int) -> int:
    """'2GB' → 2_000_000_000, '500MiB' → 524_288_000, 1000 → 1000."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 2GB, 500MB, 1GiB or a byte count")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"the size {text!r} must be positive")
    return size


# ------------------------------------------------------------------------------------------------------ reading
def checkpoint_files(folder: str | Path, *, allow_pickle: bool = False) -> dict[str, Path]:
    """Tensor name → the file that holds it, from the index JSON or the headers (no tensor data is read)."""
    folder = Path(folder)
    # Same order of preference as list_tensor_names, which also refuses pickles unless allowed.
    names = list_tensor_names(folder, allow_pickle=allow_pickle)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _from_index(folder, SAFETENSORS_INDEX, names)
    if (folder / SAFETENSORS_SINGLE).is_file():
        return {name: folder / SAFETENSORS_SINGLE for name in names}
    files = sorted(folder.glob("*.safetensors"))
    if not files and (folder / PICKLE_INDEX).is_file():
        return _from_index(folder, PICKLE_INDEX, names)
    files = files or sorted(folder.glob("*.bin"))
    located: dict[str, Path] = {}
    for file in files:
        keys = read_safetensors_header(file) if file.suffix == ".safetensors" else load_pickle_state(file)
        for name in keys:
            located.setdefault(name, file)
    return located


def _from_index(folder: Path, index_name: str, names: list[str]) -> dict[str, Path]:
    weight_map = json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"]
    return {name: folder / weight_map[name] for name in names}


def tensor_infos(folder: str | Path, *, allow_pickle: bool = False) -> dict[str, TensorInfo]:
    """Shape and dtype of every tensor of a checkpoint, from safetensors headers (pickles: a mapped load)."""
    infos: dict[str, TensorInfo] = {}
    files = checkpoint_files(folder, allow_pickle=allow_pickle)
    for file in sorted(set(files.values())):
        if file.suffix == ".safetensors":
            for name, entry in read_safetensors_header(file).items():
                dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise ModelInspectionError(f"{file}: tensor {name} has the unsupported dtype {entry['dtype']}")
                infos[name] = TensorInfo(tuple(entry["shape"]), dtype[0])
        else:
            for name, tensor in load_pickle_state(file).items():
                infos[name] = TensorInfo(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    return {name: infos[name] for name in files}


class CheckpointReader:
    """Reads single tensors by name from a model folder.

    Safetensors files are memory-mapped (private, copy-on-write) and a tensor is a zero-copy view of its byte range,
    as safetensors' own ``safe_open`` gives: its data comes straight from the page cache, with no read into a fresh
    buffer. A mapping keeps every page it touched resident, so a streaming merge would grow to the size of its
    sources; :meth:`release` therefore drops the pages of the tensors handed out so far from this process
    (``madvise(MADV_DONTNEED)``; they stay in the page cache). The engine calls it after each output tensor.

    The views must be treated as read-only: a write lands in a private copy of the page (never in the file), and
    :meth:`release` discards it. A view that is still referenced after :meth:`release` stays valid (its pages fault
    back in from the file), so callers may keep them, at the cost of memory. A tensor whose offset is not aligned to
    its element size, or a platform without mmap, falls back to a positioned read into a fresh tensor. Pickles
    (``.bin``, only with ``allow_pickle``) are loaded with ``torch.load(weights_only=True, mmap=True)`` and cloned
    one tensor at a time. ``reads`` counts get_tensor calls (the engine reads each input once per output tensor).
    """

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.allow_pickle = allow_pickle
        self.files = checkpoint_files(self.folder, allow_pickle=allow_pickle)
        self._handles: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()
        self._handed_out: list[tuple[Any, int, int]] = []  # (mapping, start, end) not yet released
        self.reads = 0

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    def get_tensor(self, name: str):
        file = self.files.get(name)
        if file is None:
            raise KeyError(f"{self.folder} has no tensor named {name!r}")
        handle = self._handles.get(file)
        if handle is None:
            handle = self._open(file)
            self._handles[file] = handle
        self.reads += 1
        if isinstance(handle, _SafetensorsFile):
            return handle.tensor(name, self._handed_out)
        return handle[name].clone()  # materialise the mapped pickle tensor, one at a time

    def release(self) -> None:
        """Drop the pages of every tensor handed out so far from this process's memory (see the class docstring)."""
        for mapping, start, end in self._handed_out:
            _drop_pages(mapping, start, end)
        self._handed_out.clear()

    def _open(self, file: Path):
        if file.suffix == ".safetensors":
            return _SafetensorsFile(file, self._stack)
        return load_pickle_state(file)

    def close(self) -> None:
        self.release()
        for handle in self._handles.values():
            if isinstance(handle, _SafetensorsFile):
                handle.close()
        self._handles.clear()
        self._stack.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SafetensorsFile:
    """One open safetensors file: its header, a file handle for positioned reads and (where possible) a mapping."""

    def __init__(self, file: Path, stack: contextlib.ExitStack):
        self.file = file
        self.header = read_safetensors_header(file)
        self.stream = stack.enter_context(file.open("rb"))
        (header_length,) = struct.unpack("<Q", self.stream.read(8))
        self.data_start = 8 + header_length
        self.size = os.fstat(self.stream.fileno()).st_size
        self.mapping = None
        if self.size > self.data_start and sys.byteorder == "little":
            try:
                self.mapping = mmap.mmap(self.stream.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):  # a file system that cannot map: positioned reads instead
                self.mapping = None

    def tensor(self, name: str, handed_out: list):
        import torch

        entry = self.header[name]
        label = f"{self.file}:{name}"
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelInspectionError(f"{label} has the unsupported dtype {entry['dtype']}")
        if sys.byteorder != "little":  # safetensors stores little-endian
            raise ModelInspectionError("reading safetensors on a big-endian machine is not supported")
        start, end = entry["data_offsets"]
        torch_dtype = getattr(torch, dtype[0])
        if end == start:
            return torch.empty(entry["shape"], dtype=torch_dtype)
        if self.data_start + end > self.size:  # checked before mapping: a view past the end would crash the process
            raise ModelInspectionError(f"{label}: the file ends inside the tensor's data")
        offset = self.data_start + start
        if self.mapping is None or offset % dtype[1]:
            return _read_range(self.stream, self.data_start, entry, label)
        _will_need(self.mapping, offset, self.data_start + end)
        handed_out.append((self.mapping, offset, self.data_start + end))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about sharing memory with a Python buffer
            view = torch.frombuffer(self.mapping, dtype=torch_dtype, count=(end - start) // dtype[1], offset=offset)
        return view.reshape(entry["shape"])

    def close(self) -> None:
        # Not mapping.close(): torch.frombuffer keeps a reference to the mapping but no buffer export, so closing
        # it would unmap pages that views still use. The mapping is unmapped when the last reference goes.
        self.mapping = None


def _page_range(start: int, end: int) -> tuple[int, int]:
    first = start - start % mmap.PAGESIZE
    return first, end - first


def _will_need(mapping, start: int, end: int) -> None:
    """Ask the kernel to read the range ahead (helps when the file is not in the page cache yet)."""
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
        with contextlib.suppress(OSError, ValueError):
            mapping.madvise(mmap.MADV_WILLNEED, *_page_range(start, end))


def _drop_pages(mapping, start: int, end: int) -> None:
    if mapping.closed or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    with contextlib.suppress(OSError, ValueError):
        mapping.madvise(mmap.MADV_DONTNEED, *_page_range(start, end))


def _read_range(stream, data_start: int, entry: dict, label: str):
    import torch

    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ModelInspectionError(f"{label} has the unsupported dtype {entry['dtype']}")
    start, end = entry["data_offsets"]
    torch_dtype = getattr(torch, dtype[0])
    if end == start:
        return torch.empty(entry["shape"], dtype=torch_dtype)
    if sys.byteorder != "little":  # safetensors stores little-endian
        raise ModelInspectionError("reading safetensors on a big-endian machine is not supported")
    # Read straight into the tensor's own (uninitialised) storage: a bytearray would be zero-filled first, which
    # costs as much again as the read.
    buffer = torch.empty(end - start, dtype=torch.uint8)
    stream.seek(data_start + start)
    if stream.readinto(memoryview(buffer.numpy())) != end - start:
        raise ModelInspectionError(f"{label}: the file ends inside the tensor's data")
    return buffer.view(torch_dtype).reshape(entry["shape"])


# ------------------------------------------------------------------------------------------------------ writing
TORCH_TO_SAFETENSORS = {torch_name: code for code, (torch_name, _size) in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class OutputTensor:
    """An output tensor's place in the layout: its name, shape and dtype (a torch dtype name)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return TensorInfo(self.shape, self.dtype).nbytes()


def plan_shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard alone)."""
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    current_bytes = 0
    for tensor in tensors:
        if current and current_bytes + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(tensor)
        current_bytes += tensor.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(count: int) -> list[str]:
    """Hugging Face's names: one `model.safetensors`, or `model-0000i-of-0000n.safetensors` with an index."""
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Streams tensors into safetensors shards whose layout is fixed in advance; nothing is buffered.

    Each shard's header (names, dtypes, shapes, offsets) is written when its first tensor arrives, and each tensor's
    bytes go to disk as soon as it is added, so tensors must arrive in layout order.
    """

    def __init__(self, folder: str | Path, shards: Sequence[Sequence[OutputTensor]]):
        self.folder = Path(folder)
        self.shards = [list(shard) for shard in shards]
        self.file_names = shard_file_names(len(self.shards))
        self._order = [(index, tensor) for index, shard in enumerate(self.shards) for tensor in shard]
        self._next = 0
        self._stream = None
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        if self._next >= len(self._order):
            raise RuntimeError(f"tensor {name!r} is not in the output layout (all {len(self._order)} were written)")
        index, expected = self._order[self._next]
        if name != expected.name:
            raise RuntimeError(f"output tensors out of order: got {name!r}, expected {expected.name!r}")
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tuple(tensor.shape) != expected.shape or dtype != expected.dtype:
            raise RuntimeError(f"{name}: got {list(tensor.shape)} {dtype}, the layout says {list(expected.shape)} "
                               f"{expected.dtype}")
        if self._stream is None:
            self._stream = self._open_shard(index)
        import torch

        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._stream.write(memoryview(data))
        self.total_bytes += expected.nbytes
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != index:
            self._stream.close()
            self._stream = None

    def _open_shard(self, index: int):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.shards[index]:
            header[tensor.name] = {"dtype": TORCH_TO_SAFETENSORS[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        stream = (self.folder / self.file_names[index]).open("wb")
        stream.write(struct.pack("<Q", len(encoded)))
        stream.write(encoded)
        return stream

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def finish(self) -> None:
        """Check that every tensor arrived and write the index (for more than one shard)."""
        self.close()
        if self._next != len(self._order):
            raise RuntimeError(f"output incomplete: {len(self._order) - self._next} tensor(s) never arrived, "
                               f"first {self._order[self._next][1].name!r}")
        if len(self.shards) > 1:
            weight_map = {tensor.name: self.file_names[index] for index, tensor in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_files(source: Path, target: Path, names: Sequence[str]) -> list[str]:
    """Copy the named files that exist in ``source``; returns the names copied."""
    copied = []
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied
