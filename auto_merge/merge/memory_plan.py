"""Where a merge's source weights and live model live, and the peak memory per device, from headers alone.

No torch and no weights here: tensor shapes and dtypes come from safetensors headers (or any object with
``shape`` and ``dtype``), capacities are given or detected. Two plans:

- :func:`plan_live_memory`, the in-memory path of a search (:class:`auto_merge.merge.live.LiveMerger`): the base and
  experts are read once and kept, and every candidate is written into one live model. :class:`LiveMerger` takes its
  placement from this plan, and ``auto-merge search --dry-run`` prints the same plan, so what is printed is what
  runs. Layouts, fastest first; the first one that fits is taken:

  ``resident``
      the sources in the requested form (fp32 by default; or an fp32 base and 16-bit task vectors, or 16-bit
      weights) on the compute device, the GPU when there is one: each output tensor reads them in place.
  ``compact``
      (only for an fp32 request) the sources as stored, 16-bit tensors kept 16-bit, on the compute device. Exactly
      the fp32 layout's values (a 16-bit value widens to fp32 without rounding), so the merges are the same.
  ``streamed``
      the sources in host memory (pinned when the compute device is a GPU, packed into blocks of
      :data:`PINNED_BLOCK_BYTES`), in the compact form; for each output tensor only that tensor's stored inputs are
      copied to the compute device, into one reused staging buffer. The GPU holds the live model, the staging
      buffer and the working memory of one tensor's merge. Same values as the other layouts, so the same merges.

- :func:`plan_merge_memory`, the streaming engine of ``auto-merge merge``: sources memory-mapped and read per tensor,
  one reused output buffer; what ``merge --dry-run`` prints.

A device may be filled up to :data:`MEMORY_SHARE` of its capacity; the rest is left to the Python/torch runtime, the
CUDA context, the evaluator's activations and the allocators' slack (none of which the plan counts).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auto_merge.errors import AutoMergeError
from auto_merge.merge.io import DTYPE_BYTES, SAFETENSORS_DTYPES, parse_size

# Share of a device's memory (GPU, host) a plan may fill.
MEMORY_SHARE = 0.8
GPU_MEMORY_SHARE = MEMORY_SHARE
FP32_BYTES = 4
# Temporaries a method makes (task vectors, masks, sign votes, sort buffers), in units of its fp32 inputs' size;
# measured: TIES over 3 inputs peaked at ~6.6x the inputs above the runtime's footprint, allocator slack included.
METHOD_WORKING_COPIES = 5
# Host copies of streamed sources are packed into blocks of this size (a power of two: torch's pinned-memory
# allocator rounds every allocation up to one, which would waste up to half of a block per tensor).
PINNED_BLOCK_BYTES = 1 << 30
# Offsets of tensors inside a block or the staging buffer are multiples of this.
ALIGNMENT = 256

HALF_DTYPES = ("bfloat16", "float16")
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}

LAYOUTS = ("resident", "compact", "streamed")
# How sources are kept (per tensor, see kept_dtype).
FORMS = ("float32", "task_vectors", "weights16", "as_stored")
# LiveMerger's defaults, which the search uses.
DEFAULT_SOURCE_DTYPE = "float32"
DEFAULT_TASK_VECTORS = True

MEMORY_SIZE_FORM = "a number with a unit, e.g. 80GB, 80GiB, 512MB or 1.5TB"


class MemoryPlanError(AutoMergeError, ValueError):
    """A memory size or plan setting that cannot be used."""


def parse_memory(text: str | int) -> int:
    """'80GB' → 80e9 bytes, '80GiB' → 80·2^30, '512MB', '1.5TB', or a plain byte count; positive."""
    if isinstance(text, bool):
        raise MemoryPlanError(f"{text!r} is not a memory size: write {MEMORY_SIZE_FORM}")
    try:
        value = parse_size(text)
    except ValueError:
        raise MemoryPlanError(f"{str(text)!r} is not a memory size: write {MEMORY_SIZE_FORM}") from None
    if value <= 0:
        raise MemoryPlanError(f"{text!r} is not a memory size: it must be positive ({MEMORY_SIZE_FORM})")
    return value


def format_bytes(count: int | float) -> str:
    """Decimal units, as the rest of the project prints sizes (GB = 10^9 bytes)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def short_dtype(dtype: str) -> str:
    return SHORT_DTYPE.get(dtype, dtype)


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class TensorShape:
    shape: tuple[int, ...]
    dtype: str  # a torch dtype name: float32, bfloat16, ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, dtype: str | None = None) -> int:
        return self.numel * DTYPE_BYTES[dtype or self.dtype]


@dataclass(frozen=True)
class ModelShapes:
    """One model's tensors (name → shape and stored dtype), as the plan needs them."""

    ref: str
    tensors: Mapping[str, TensorShape]

    @classmethod
    def from_infos(cls, ref: str, infos: Mapping[str, Any]) -> "ModelShapes":
        """From objects with ``shape`` and ``dtype`` (a torch dtype name), e.g. a SourceModel's ``tensors``."""
        return cls(ref, {name: TensorShape(tuple(int(d) for d in info.shape), str(info.dtype))
                         for name, info in infos.items()})

    @classmethod
    def from_folder(cls, ref: str, folder: str | Path) -> "ModelShapes":
        """From the safetensors headers of a model folder (no tensor data is read)."""
        from auto_merge.models.inspect import ModelInspectionError, read_safetensors_header

        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise MemoryPlanError(f"model {ref}: no safetensors files in {folder}, so no headers to plan memory "
                                  f"from")
        tensors = {}
        for file in files:
            for name, entry in read_safetensors_header(file).items():
                known = SAFETENSORS_DTYPES.get(entry["dtype"])  # (torch dtype name, bytes)
                if known is None:
                    raise ModelInspectionError(f"{file}: tensor {name} has the unsupported dtype {entry['dtype']}")
                tensors[name] = TensorShape(tuple(entry["shape"]), known[0])
        return cls(ref, tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tensors.values())


def llama_shapes(ref: str, *, layers: int, hidden: int, intermediate: int, vocab: int, kv_hidden: int | None = None,
                 dtype: str = "bfloat16", tied: bool = False) -> ModelShapes:
    """A Llama checkpoint's tensors (``LlamaForCausalLM`` names), e.g. Llama-2-13B: 40 layers, hidden 5120,
    intermediate 13824, vocab 32000."""
    kv = kv_hidden or hidden
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes.update({prefix + "input_layernorm.weight": (hidden,),
                       prefix + "post_attention_layernorm.weight": (hidden,),
                       prefix + "self_attn.q_proj.weight": (hidden, hidden),
                       prefix + "self_attn.k_proj.weight": (kv, hidden),
                       prefix + "self_attn.v_proj.weight": (kv, hidden),
                       prefix + "self_attn.o_proj.weight": (hidden, hidden),
                       prefix + "mlp.gate_proj.weight": (intermediate, hidden),
                       prefix + "mlp.up_proj.weight": (intermediate, hidden),
                       prefix + "mlp.down_proj.weight": (hidden, intermediate)})
    return ModelShapes(ref, {name: TensorShape(shape, dtype) for name, shape in shapes.items()})


# ------------------------------------------------------------------------------------------------ forms
def requested_form(dtype: str, task_vectors: bool) -> str:
    """LiveMerger's ``dtype`` / ``task_vectors`` as a form: fp32 weights, an fp32 base with 16-bit task vectors,
    or 16-bit weights."""
    if dtype == "float32":
        return "float32"
    if dtype not in HALF_DTYPES:
        raise MemoryPlanError(f"resident sources are kept in float32, bfloat16 or float16, not {dtype}")
    return "task_vectors" if task_vectors else "weights16"


def kept_dtype(form: str, stored: str, *, is_anchor: bool, dtype: str) -> str:
    """The dtype one source tensor is kept in: ``stored`` is its dtype in the checkpoint, ``dtype`` the requested
    16-bit dtype (forms task_vectors and weights16), ``is_anchor`` whether its model is the task vectors' base."""
    if form == "float32":
        return "float32"
    if form == "as_stored":
        return stored if stored in HALF_DTYPES else "float32"
    if form == "task_vectors":
        return "float32" if is_anchor else dtype
    if form == "weights16":
        return dtype
    raise MemoryPlanError(f"unknown source form {form!r}; allowed: {', '.join(FORMS)}")


def pack_blocks(sizes: Sequence[int], block_bytes: int = PINNED_BLOCK_BYTES) -> tuple[int, list[tuple[int, int]], int]:
    """Pack byte sizes (each rounded up to :data:`ALIGNMENT`) into equal blocks, first fit by decreasing size.

    The block is a power of two: ``block_bytes`` when the sizes add up to at least that much (or the next power of
    two of the largest size when that is larger), else the next power of two of the largest size (a small model
    then takes a few small blocks, not one mostly empty large one). Returns ``(block size, [(block index, offset)]
    in the order of sizes, number of blocks)``."""
    padded = [aligned(size) for size in sizes]
    largest = 1 << max(0, (max(padded, default=1) - 1).bit_length())
    block = max(largest, block_bytes) if sum(padded) >= block_bytes else largest
    free: list[int] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-padded[i], i)):
        size = padded[index]
        slot = next((b for b, left in enumerate(free) if left >= size), None)
        if slot is None:
            free.append(block)
            slot = len(free) - 1
        where[index] = (slot, block - free[slot])
        free[slot] -= size
    return block, where, len(free)


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class LiveModel:
    """The model candidates are written into: its bytes, dtype and device ("cuda..." or "cpu")."""

    nbytes: int
    dtype: str
    device: str

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class Placement:
    """One row of a plan: what, where, in which form, how many bytes, against which device's peak."""

    role: str  # base, expert, live model, staging buffer, working memory, sources, output buffer
    name: str
    where: str
    nbytes: int
    device: str  # "gpu" or "host"


@dataclass(frozen=True)
class Capacity:
    """A device's memory as the plan sees it: bytes (None: unknown) and where that number came from."""

    nbytes: int | None
    source: str  # "given", "detected", "free now", "none"

    @property
    def usable(self) -> int | None:
        return None if self.nbytes is None else int(self.nbytes * MEMORY_SHARE)

    def describe(self, label: str) -> str:
        if self.nbytes is None:
            return f"{label} size unknown"
        return f"{label} {format_bytes(self.nbytes)} {self.source}"


@dataclass(frozen=True)
class MemoryPlan:
    """A live merge's placement (what :class:`LiveMerger` does) and its peaks per device."""

    layout: str  # resident, compact or streamed
    compute_device: str  # where each output tensor is merged: "cuda", "cuda:N" or "cpu"
    source_device: str  # where the sources are kept (the compute device, or "cpu" when streamed)
    form: str  # see FORMS
    dtype: str  # the requested 16-bit dtype (forms task_vectors, weights16), else float32
    anchor: str | None  # the model the task vectors are kept against (form task_vectors)
    pinned: bool  # streamed sources in pinned host memory
    block_bytes: int  # streamed sources are packed into blocks of this size (0: not packed)
    staging_bytes: int  # the reused device buffer of one output tensor's stored inputs (0: not streamed)
    working_bytes: int  # the largest output tensor's merge: fp32 copies, the method's temporaries, the result
    rows: tuple[Placement, ...]
    gpu_peak: int
    host_peak: int
    gpu: Capacity
    host: Capacity
    fits: bool | None  # None: a GPU of unknown size
    advice: str  # what to change when it does not fit ("" when it fits)
    rejected: tuple[str, ...] = ()  # the faster layouts that did not fit, and why
    notes: tuple[str, ...] = field(default=())

    @property
    def streamed(self) -> bool:
        return self.layout == "streamed"

    def summary(self) -> str:
        on = "the GPU" if self.compute_device.startswith("cuda") else "the CPU"
        return f"{self.layout} (merging on {on}; GPU peak {format_bytes(self.gpu_peak)}, host peak " \
               f"{format_bytes(self.host_peak)})"

    def describe(self) -> str:
        """The plan as `search --dry-run` prints it."""
        on = f"GPU ({self.compute_device})" if self.compute_device.startswith("cuda") else "CPU"
        head = (f"memory plan: {self.layout}, each output tensor merged on the {on}; "
                f"{self.gpu.describe('GPU') if self.uses_gpu else 'no GPU'}, {self.host.describe('host')}, "
                f"{MEMORY_SHARE:.0%} of each usable")
        lines = [head] + placement_table(self.rows)
        lines.append("  " + self.peaks())
        lines += [f"  rejected: {line}" for line in self.rejected]
        lines += [f"  note: {note}" for note in self.notes]
        if self.advice:
            lines.append(f"  to make it fit: {self.advice}")
        return "\n".join(lines)

    @property
    def uses_gpu(self) -> bool:
        return self.gpu_peak > 0 or self.compute_device.startswith("cuda")

    def peaks(self) -> str:
        parts = []
        if self.uses_gpu:
            parts.append(peak_line("GPU", self.gpu_peak, self.gpu))
        parts.append(peak_line("host", self.host_peak, self.host))
        verdict = {True: "fits", False: "does NOT fit", None: "GPU size unknown: pass --gpu-memory SIZE to check"}
        return f"peak: {'; '.join(parts)} (plus the Python/torch runtime): {verdict[self.fits]}"


def placement_table(rows: Sequence[Placement]) -> list[str]:
    labels = [f"{row.role} {row.name}".strip() for row in rows]
    width = max(len(label) for label in labels)
    where = max(len(row.where) for row in rows)
    return [f"  {label:<{width}}  {row.where:<{where}}  {format_bytes(row.nbytes):>9} "
            f"{'GPU' if row.device == 'gpu' else 'host'}" for label, row in zip(labels, rows)]


def peak_line(label: str, peak: int, capacity: Capacity) -> str:
    if capacity.usable is None:
        return f"{label} {format_bytes(peak)}"
    return f"{label} {format_bytes(peak)} of {format_bytes(capacity.usable)} usable"


@dataclass(frozen=True)
class _Candidate:
    layout: str
    compute: str
    form: str

    @property
    def streamed(self) -> bool:
        return self.layout == "streamed"


def plan_live_memory(models: Sequence[ModelShapes], *, anchor: str, live: LiveModel, device: str = "auto",
                     dtype: str = DEFAULT_SOURCE_DTYPE, task_vectors: bool = DEFAULT_TASK_VECTORS,
                     gpu: Capacity | None = None, host: Capacity | None = None, layout: str = "auto",
                     notes: Iterable[str] = ()) -> MemoryPlan:
    """The placement of a live merge over ``models`` (the base ``anchor`` first or not; every model the merger
    will read) and the peaks per device.

    ``device``: "cpu", "cuda[:N]", or "auto" (the GPU when ``gpu`` has a size and a layout fits there, else the
    CPU). ``dtype`` / ``task_vectors``: how the caller asked for the sources to be kept (:func:`requested_form`).
    ``layout``: "auto" (the first of :data:`LAYOUTS` that fits) or one of them, forced (``streamed`` also on the
    CPU, where it runs the same code without pinning; for tests). ``gpu``/``host``: capacities (None: unknown).
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise MemoryPlanError(f"unknown memory layout {layout!r}; allowed: auto, {', '.join(LAYOUTS)}")
    if not models:
        raise MemoryPlanError("a memory plan needs at least one source model")
    if anchor not in {model.ref for model in models}:
        raise MemoryPlanError(f"the base model {anchor} is not among the planned models")
    gpu = gpu or Capacity(None, "none")
    host = host or Capacity(None, "none")
    form = requested_form(dtype, task_vectors)
    compact_differs = form == "float32" and any(
        t.dtype in HALF_DTYPES for model in models for t in model.tensors.values())
    stream_form = "as_stored" if form == "float32" else form

    if device == "auto":
        computes = (["cuda"] if gpu.nbytes is not None else []) + ["cpu"]
    else:
        computes = [device]
    candidates = []
    for compute in computes:
        options = [_Candidate("resident", compute, form)]
        if compact_differs:
            options.append(_Candidate("compact", compute, "as_stored"))
        if compute.startswith("cuda") or layout == "streamed":
            options.append(_Candidate("streamed", compute, stream_form))
        candidates += [c for c in options if layout in ("auto", c.layout)]
    if not candidates:  # compact requested where it would equal resident
        candidates = [_Candidate("resident", compute, form) for compute in computes[:1]]

    costed = [(candidate, _cost(candidate, models, anchor, live, dtype)) for candidate in candidates]
    verdicts = [budget_fits(cost, gpu, host) for _, cost in costed]
    chosen = next((i for i, verdict in enumerate(verdicts) if verdict is not False), None)
    if chosen is None:  # nothing fits: the leanest layout of the preferred device (the CPU for "auto")
        preferred = computes[-1] if device == "auto" else computes[0]
        chosen = max(i for i, (candidate, _) in enumerate(costed) if candidate.compute == preferred)
    candidate, cost = costed[chosen]
    rejected = tuple(_rejection(c, k, gpu, host) for (c, k), verdict in zip(costed[:chosen], verdicts[:chosen])
                     if verdict is False)
    fits = verdicts[chosen]
    return MemoryPlan(
        layout=candidate.layout, compute_device=candidate.compute,
        source_device="cpu" if candidate.streamed else candidate.compute, form=candidate.form,
        dtype=dtype if candidate.form in ("task_vectors", "weights16") else "float32",
        anchor=anchor if candidate.form == "task_vectors" else None,
        pinned=candidate.streamed and candidate.compute.startswith("cuda"),
        block_bytes=cost["block_bytes"], staging_bytes=cost["staging"], working_bytes=cost["working"],
        rows=tuple(cost["rows"]), gpu_peak=cost["gpu"], host_peak=cost["host"], gpu=gpu, host=host, fits=fits,
        advice="" if fits is not False else _advice(candidate, cost, live, gpu, host),
        rejected=rejected, notes=tuple(notes))


def _cost(candidate: _Candidate, models: Sequence[ModelShapes], anchor: str, live: LiveModel, dtype: str) -> dict:
    """Rows, peaks and the buffers of one candidate layout."""
    on_gpu = candidate.compute.startswith("cuda")
    sources_on_gpu = on_gpu and not candidate.streamed
    rows: list[Placement] = []
    block_bytes = 0
    kept: dict[str, dict[str, str]] = {}
    for model in models:
        is_anchor = model.ref == anchor
        kept[model.ref] = {name: kept_dtype(candidate.form, t.dtype, is_anchor=is_anchor, dtype=dtype)
                           for name, t in model.tensors.items()}
        sizes = [t.nbytes(kept[model.ref][name]) for name, t in model.tensors.items()]
        if candidate.streamed:
            block_bytes, _, blocks = pack_blocks(sizes)
            nbytes = block_bytes * blocks
        else:
            nbytes = sum(sizes)
        where = _where(candidate, on_gpu, sources_on_gpu) + ", " + _form_text(candidate.form, kept[model.ref],
                                                                            is_anchor)
        rows.append(Placement("base" if is_anchor else "expert", model.ref, where, nbytes,
                              "gpu" if sources_on_gpu else "host"))
    rows.sort(key=lambda row: row.role != "base")
    rows.append(Placement("live model", "", f"{'GPU' if live.on_gpu else 'CPU'} {short_dtype(live.dtype)}",
                          live.nbytes, "gpu" if live.on_gpu else "host"))
    staging, working, largest = _per_tensor_buffers(candidate, models, kept)
    compute_side = "gpu" if on_gpu else "host"
    if candidate.streamed:
        rows.append(Placement("staging buffer", "", f"{'GPU' if on_gpu else 'CPU'}, one tensor's stored inputs "
                              f"({largest}), reused", staging, compute_side))
    rows.append(Placement("working memory", "", f"{'GPU' if on_gpu else 'CPU'} fp32, the merge of the largest "
                          f"tensor ({largest})", working, compute_side))
    gpu_peak = sum(row.nbytes for row in rows if row.device == "gpu")
    host_peak = sum(row.nbytes for row in rows if row.device == "host")
    return {"rows": rows, "gpu": gpu_peak, "host": host_peak, "staging": staging if candidate.streamed else 0,
            "working": working, "block_bytes": block_bytes if candidate.streamed else 0}


def _where(candidate: _Candidate, on_gpu: bool, sources_on_gpu: bool) -> str:
    if sources_on_gpu:
        return "GPU"
    if candidate.streamed:
        return ("pinned CPU" if on_gpu else "CPU") + ", streamed per tensor"
    return "CPU"


def _form_text(form: str, kept: Mapping[str, str], is_anchor: bool) -> str:
    dtypes = sorted(set(kept.values()), key=lambda d: (d != "float32", d))
    names = "/".join(short_dtype(d) for d in dtypes) or "fp32"
    if form == "as_stored":
        return f"{names} as stored"
    if form == "task_vectors":
        return "fp32 (the task vectors' base)" if is_anchor else f"{names} task vectors"
    return names


def _per_tensor_buffers(candidate: _Candidate, models: Sequence[ModelShapes],
                        kept: Mapping[str, Mapping[str, str]]) -> tuple[int, int, str]:
    """The staging bytes (streamed) and working bytes of the worst output tensor, and the largest tensor's name.

    An output tensor reads the same-name tensor of every model. Working memory: an fp32 copy of every input not
    kept in fp32 (16-bit tensors; a task vector comes back as its base plus itself), :data:`METHOD_WORKING_COPIES`
    times the fp32 inputs for the method's temporaries, and the fp32 result."""
    staging = working = 0
    largest, largest_numel = "", -1
    names = set().union(*(model.tensors for model in models))
    for name in sorted(names):
        reads = [(model, model.tensors[name]) for model in models if name in model.tensors]
        numel = max(t.numel for _, t in reads)
        if numel > largest_numel:
            largest, largest_numel = name, numel
        stored = sum(aligned(t.nbytes(kept[model.ref][name])) for model, t in reads)
        conversions = sum(t.numel * FP32_BYTES for model, t in reads if kept[model.ref][name] != "float32")
        method = METHOD_WORKING_COPIES * sum(t.numel * FP32_BYTES for _, t in reads)
        staging = max(staging, stored)
        working = max(working, conversions + method + numel * FP32_BYTES)
    return staging, working, largest


def budget_fits(cost: dict, gpu: Capacity, host: Capacity) -> bool | None:
    if host.usable is not None and cost["host"] > host.usable:
        return False
    if cost["gpu"] == 0:
        return True
    if gpu.usable is None:
        return None
    return cost["gpu"] <= gpu.usable


def _layout_text(candidate: _Candidate) -> str:
    on = "GPU" if candidate.compute.startswith("cuda") else "CPU"
    form = {"float32": "fp32", "task_vectors": "fp32 base + 16-bit task vectors", "weights16": "16-bit weights",
            "as_stored": "as stored"}[candidate.form]
    return f"{candidate.layout} on the {on} ({form})"


def _rejection(candidate: _Candidate, cost: dict, gpu: Capacity, host: Capacity) -> str:
    over = []
    if gpu.usable is not None and cost["gpu"] > gpu.usable:
        over.append(f"GPU {format_bytes(cost['gpu'])} > {format_bytes(gpu.usable)} usable")
    if host.usable is not None and cost["host"] > host.usable:
        over.append(f"host {format_bytes(cost['host'])} > {format_bytes(host.usable)} usable")
    return f"{_layout_text(candidate)}: {', '.join(over)}"


def _advice(candidate: _Candidate, cost: dict, live: LiveModel, gpu: Capacity, host: Capacity) -> str:
    """One sentence: what to change so that the chosen (leanest) layout fits."""
    fixes = []
    if gpu.usable is not None and cost["gpu"] > gpu.usable:
        needed = cost["gpu"]
        if live.on_gpu and live.dtype == "float32":
            smaller = needed - live.nbytes // 2
            if smaller <= gpu.usable:
                fixes.append(f"load the live model in bfloat16 (evaluation.torch_dtype: bfloat16), which brings the "
                             f"GPU peak from {format_bytes(needed)} to {format_bytes(smaller)} of "
                             f"{format_bytes(gpu.usable)} usable")
                needed = 0
        if needed:
            fixes.append(f"use a GPU of at least {format_bytes(math.ceil(needed / MEMORY_SHARE))} (the GPU peak is "
                         f"{format_bytes(needed)}, {format_bytes(gpu.usable)} usable)")
    if host.usable is not None and cost["host"] > host.usable:
        fixes.append(f"give the host at least {format_bytes(math.ceil(cost['host'] / MEMORY_SHARE))} of memory "
                     f"(the host peak is {format_bytes(cost['host'])}, {format_bytes(host.usable)} usable), or merge "
                     f"fewer experts at once")
    return "; ".join(fixes) + "."


# ------------------------------------------------------------------------------------------------ capacities
def host_capacity(given: int | None = None) -> Capacity:
    """The host's memory: ``given``, else its physical memory (os.sysconf)."""
    if given is not None:
        return Capacity(given, "given")
    try:
        return Capacity(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "detected")
    except (ValueError, OSError, AttributeError):
        return Capacity(None, "none")


def gpu_capacity(device: str = "cuda", given: int | None = None, *, free: bool = False,
                 held: int = 0) -> Capacity:
    """A CUDA device's memory: ``given``; else detected (imports torch): its total memory, or with ``free`` what is
    free now plus ``held`` (bytes of this process the plan counts itself, e.g. the live model already on it)."""
    if given is not None:
        return Capacity(given, "given")
    import torch

    if not torch.cuda.is_available():
        return Capacity(None, "none")
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    free_bytes, total = torch.cuda.mem_get_info(index)
    if free:
        return Capacity(free_bytes + held, "free now")
    return Capacity(total, "detected")
