"""The in-memory merge path: source weights stay resident and each candidate is written into a live model in place.

A search evaluates hundreds of candidates over the same sources, so the sources are read once and every candidate
is materialised straight into the parameters of one live `transformers` model: no checkpoint is written, no model is
re-instantiated, and the evaluator wrapping that model sees the new weights on its next call.

Two entry points:

- :class:`LiveMerger` runs the same :class:`~auto_merge.merge.plan.MergePlan` the streaming engine runs (a recipe
  compiled against the models' headers), so a candidate scored live is exactly the checkpoint `auto-merge merge`
  would write for its recipe. Source tensors are loaded once per model and kept where its memory plan
  (:func:`auto_merge.merge.memory_plan.plan_live_memory`, the plan `auto-merge search --dry-run` prints) puts them:
  in fp32 (or as asked: an fp32 base with bf16 task vectors, or bf16 weights) on the GPU when they fit there with the
  live model; else as stored (16-bit checkpoints stay 16-bit) on the GPU; else in pinned host memory, each output
  tensor's inputs copied to the GPU through one reused staging buffer (*streamed*); without a GPU, on the CPU. Every
  layout holds the same values, so a candidate's weights do not depend on it. Each output tensor's task is
  remembered; a tensor whose task did not change since the last candidate (e.g. a layer group the search did not
  touch) is not recomputed. A plan of another depth (DIS, pruning) resizes the live
  model's decoder first (:class:`LiveDepth`): layer modules are kept in a pool and re-used, never re-created per
  candidate.
- :func:`materialise_into` takes a *tensor plan* (tensor name → :class:`TensorSpec`) over one base and a fixed list
  of experts held by :class:`ResidentSources`; the zoo report uses it for its uniform and per-group merges.
"""

from __future__ import annotations

import copy
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from auto_merge.merge.engine import merge_task
from auto_merge.merge.fused import combination, combine_into, linear_coefficients, linear_terms
from auto_merge.merge.methods import get_method, merge_tensor
from auto_merge.merge.memory_plan import (
    GPU_MEMORY_SHARE,
    Capacity,
    LiveModel,
    MemoryPlan,
    ModelShapes,
    aligned,
    gpu_capacity,
    host_capacity,
    kept_dtype,
    pack_blocks,
    plan_live_memory,
    requested_form,
)
from auto_merge.merge.plan import MergePlan, TensorInput, compile_plan
from auto_merge.merge.recipe import Recipe, parse_recipe
from auto_merge.merge.sources import DEPTH_KEYS, ModelCatalog, SourceModel
from auto_merge.models.layers import layer_index, layer_key

__all__ = ["GPU_MEMORY_SHARE", "LiveDepth", "LiveMerger", "LiveUpdate", "ResidentModels", "ResidentSources",
           "StagingBuffer", "TensorSpec", "TensorPlan", "layer_index", "live_footprint", "materialise_into",
           "read_state"]


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is merged: a registered method with its global and per-model parameters."""

    method: str
    global_params: dict = field(default_factory=dict)
    per_model_params: tuple[dict, ...] = ()


TensorPlan = Callable[[str], TensorSpec]


class ResidentSources:
    """Base and expert tensors by name, read once from safetensors and kept in fp32 on one device."""

    def __init__(self, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]):
        names = set(base)
        for i, expert in enumerate(experts):
            if set(expert) != names:
                diff = sorted(names.symmetric_difference(expert))[:5]
                raise ValueError(f"expert {i} does not have the base model's tensors (first differences: {diff})")
        self.base = base
        self.experts = experts
        self.names = sorted(names)

    @classmethod
    def from_checkpoints(cls, base_path: str | Path, expert_paths: list[str | Path], device: str = "cpu"):
        return cls(read_state(base_path, device), [read_state(p, device) for p in expert_paths])


def read_state(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint folder (single file or sharded with an index), as fp32."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=device) as handle:
            for name in handle.keys():
                state[name] = handle.get_tensor(name).to(torch.float32)
    return state


@torch.no_grad()
def materialise_into(model: torch.nn.Module, sources: ResidentSources, plan: TensorPlan, seed: int = 0) -> None:
    """Overwrite `model`'s weights in place with the merge `plan` describes.

    As in :class:`LiveMerger`, fixed linear combinations (linear, task arithmetic, passthrough) are summed straight
    into the parameter (:mod:`auto_merge.merge.fused`), and other methods write their fp32 result into it when it is
    an fp32 tensor on the sources' device.
    """
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    for name in sources.names:
        if name not in targets:
            raise KeyError(f"the live model has no tensor named {name!r}")
        spec = plan(name)
        takes_base = get_method(spec.method).base_model != "none"
        base = sources.base[name] if takes_base else None
        experts = [expert[name] for expert in sources.experts]
        target = targets[name]
        form = linear_coefficients(spec.method, spec.global_params, list(spec.per_model_params) or
                                   [{} for _ in experts], has_base=base is not None)
        same_place = target.device == (base if base is not None else experts[0]).device
        if form is not None and same_place and all(t.shape == target.shape for t in [*experts, base] if t is not None):
            combine_into(target, combination(form, (base, None) if base is not None else None,
                                             [(expert, None) for expert in experts]))
            continue
        merged = merge_tensor(spec.method, experts, base, spec.global_params, list(spec.per_model_params),
                              seed=seed, tensor_name=name, out=target if same_place else None)
        if merged is not target:
            target.copy_(merged.to(device=target.device, dtype=target.dtype))


# ------------------------------------------------------------------------------------------ recipes, live
class ResidentModels:
    """Source tensors by (model, name), each model read completely on first use and kept on one device.

    How each tensor is kept is the ``form`` of :mod:`auto_merge.merge.memory_plan` (:func:`kept_dtype`): ``float32``
    keeps every tensor in fp32; ``task_vectors`` (a 16-bit ``dtype`` with an ``anchor``) keeps the anchor model (the
    base) in fp32 and the other models as 16-bit *task vectors* against it (same-name tensors of equal shape; others
    as weights), rebuilt in fp32 on each read: rounding then hits the small differences a merge is about, not the
    large weights they ride on; ``weights16`` keeps every model in ``dtype``; ``as_stored`` keeps 16-bit tensors as
    the checkpoint stores them and the others in fp32 (the fp32 values, in less memory). Without a ``form`` it
    follows from ``dtype`` and ``anchor``. With ``block_bytes`` (the streamed layout) a model's tensors are packed
    into blocks of that size (:func:`pack_blocks`), in pinned memory with ``pin``.
    """

    def __init__(self, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 anchor: SourceModel | None = None, form: str | None = None, pin: bool = False,
                 block_bytes: int = 0):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"resident sources are kept in float32, bfloat16 or float16, not {dtype}")
        self.device = _indexed(torch.device(device))
        self.dtype = dtype
        self.form = form or requested_form(_dtype_name(dtype), anchor is not None)
        if self.form == "task_vectors" and anchor is None:
            raise ValueError("task vectors need the anchor model they are kept against")
        self.anchor = anchor if self.form == "task_vectors" else None
        self.pin = pin
        self.block_bytes = block_bytes
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._deltas: dict[str, set[str]] = {}
        self._blocks: dict[str, list[torch.Tensor]] = {}

    def tensor(self, model: SourceModel, name: str) -> torch.Tensor:
        state = self._state(model)
        stored = state[name]
        if name in self._deltas[model.ref]:
            return self._state(self.anchor)[name] + stored.to(torch.float32)
        return stored

    def stored(self, model: SourceModel, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, delta)`` whose sum is ``tensor(model, name)``: ``(tensor, None)``, or (anchor, task vector)."""
        stored = self._state(model)[name]
        if name in self._deltas[model.ref]:
            return self._state(self.anchor)[name], stored
        return stored, None

    def _state(self, model: SourceModel) -> dict[str, torch.Tensor]:
        if model.ref not in self._states:
            self.load(model)
        return self._states[model.ref]

    def load(self, model: SourceModel, read: Callable[[str], torch.Tensor] | None = None) -> None:
        """Read every tensor of ``model`` (from its checkpoint, or ``read(name)`` for each of ``model.tensors``)
        and keep it as the form says. A model already kept is read again."""
        if read is not None:
            self._keep(model, sorted(model.tensors), read)
            return
        from auto_merge.merge.io import CheckpointReader

        with CheckpointReader(model.path, allow_pickle=model.allow_pickle) as reader:
            self._keep(model, list(reader.names), reader.get_tensor, after_each=reader.release)

    def _keep(self, model: SourceModel, names: list[str], read: Callable[[str], torch.Tensor],
              after_each: Callable[[], None] | None = None) -> None:
        is_anchor = self.anchor is not None and model.ref == self.anchor.ref
        anchor_state = self._state(self.anchor) if self.anchor is not None and not is_anchor else None
        requested = _dtype_name(self.dtype)

        def keep_dtype(name: str, stored: torch.dtype) -> torch.dtype:
            info = model.tensors.get(name)
            stored_name = info.dtype if info is not None else _dtype_name(stored)
            return getattr(torch, kept_dtype(self.form, stored_name, is_anchor=is_anchor, dtype=requested))

        destinations: dict[str, torch.Tensor] = {}
        if self.block_bytes:
            missing = [name for name in names if name not in model.tensors]
            if missing:
                raise KeyError(f"model {model.ref}: no header entry for {missing[:3]}")
            kept = [keep_dtype(name, torch.float32) for name in names]
            sizes = [model.tensors[n].numel * torch.tensor([], dtype=k).element_size() for n, k in zip(names, kept)]
            block, where, count = pack_blocks(sizes, self.block_bytes)
            blocks = [torch.empty(block, dtype=torch.uint8, device=self.device, pin_memory=self.pin)
                      for _ in range(count)]
            self._blocks[model.ref] = blocks
            for name, dtype, size, (index, offset) in zip(names, kept, sizes, where):
                destinations[name] = blocks[index][offset:offset + size].view(dtype).view(model.tensors[name].shape)

        state, deltas = {}, set()
        for name in names:
            source = read(name)
            keep = keep_dtype(name, source.dtype)
            reference = anchor_state.get(name) if anchor_state is not None else None
            if reference is not None and reference.shape == source.shape:
                # A copy: the reader hands out views of the file's pages.
                tensor = source.to(device=self.device, dtype=torch.float32, copy=True).sub_(reference)
                deltas.add(name)
            else:
                tensor = source
            target = destinations.get(name)
            if target is not None:
                target.copy_(tensor)
                state[name] = target
            else:
                state[name] = tensor.to(device=self.device, dtype=keep, copy=tensor is source)
            del source, tensor
            if after_each is not None:
                after_each()
        self._states[model.ref] = state
        self._deltas[model.ref] = deltas

    def adopt(self, ref: str, state: dict[str, torch.Tensor]) -> None:
        """Keep tensors already in memory as model ``ref``'s weights, as they are (no copy, no conversion)."""
        self._states[ref] = state
        self._deltas[ref] = set()

    @property
    def models(self) -> list[str]:
        return sorted(self._states)

    @property
    def nbytes(self) -> int:
        """Bytes held: the tensors, or the blocks they are packed into."""
        total = sum(block.numel() for blocks in self._blocks.values() for block in blocks)
        return total + sum(t.numel() * t.element_size() for ref, state in self._states.items()
                           if ref not in self._blocks for t in state.values())


class StagingBuffer:
    """One reused buffer on the compute device that a streamed output tensor's stored inputs are copied into.

    :meth:`begin` starts an output tensor; :meth:`stage` returns a tensor's copy in the buffer, the same object for
    the same source within one output tensor (an input read twice is copied once, and identity checks such as
    "this expert's task vector is against the base" keep working). Copies from pinned memory are asynchronous on
    the current stream, so they are ordered before the merge that reads them and after the previous tensor's merge.
    """

    def __init__(self, device: str | torch.device, nbytes: int = 0):
        self.device = _indexed(torch.device(device))
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.used = 0
        self.copied_bytes = 0
        self._staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self) -> None:
        self.used = 0
        self._staged.clear()

    def stage(self, tensor: torch.Tensor) -> torch.Tensor:
        staged = self._staged.get(id(tensor))
        if staged is not None:
            return staged[0]
        nbytes = tensor.numel() * tensor.element_size()
        if self.used + aligned(nbytes) > self.buffer.numel():
            # More than planned: a larger buffer; the copies made so far stay valid in the old one until begin().
            self.buffer = torch.empty(max(2 * self.buffer.numel(), aligned(nbytes)), dtype=torch.uint8,
                                      device=self.device)
            self.used = 0
        view = self.buffer[self.used:self.used + nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor, non_blocking=True)
        self.used += aligned(nbytes)
        self.copied_bytes += nbytes
        self._staged[id(tensor)] = (view, tensor)  # the source is held, so its id is not reused meanwhile
        return view


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _indexed(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        # Tensors report "cuda:0": an index-less device would never compare equal to the live model's.
        return torch.device("cuda", torch.cuda.current_device())
    return device


def live_footprint(model: torch.nn.Module) -> LiveModel:
    """The live model's bytes (parameters and buffers, shared storages once), dtype and device."""
    seen: set[tuple[str, int]] = set()
    total, dtype, device = 0, None, "cpu"
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        key = (str(tensor.device), tensor.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
        if dtype is None and tensor.is_floating_point():
            dtype, device = _dtype_name(tensor.dtype), str(tensor.device)
    return LiveModel(total, dtype or "float32", device)


class LiveDepth:
    """Sets the number of decoder layers of a live `transformers` model, for plans that change the depth.

    The decoder's layer list (found from the plan's tensor names, e.g. ``model.layers``) is cut or extended from a
    pool of layer modules: the model's own layers, plus copies of its first layer made when a plan is deeper than
    any before. A pooled layer keeps its module (and its weights) while it is out of the list, so position ``i``
    is always the same module. Each layer's ``layer_idx`` (its KV-cache slot) and the config's depth and
    ``layer_types`` are updated, which is what generation and the attention masks read.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layers: torch.nn.ModuleList | None = None
        self.pool: list[torch.nn.Module] = []

    def fit(self, plan: MergePlan) -> None:
        """Give the model exactly ``plan.num_layers`` decoder layers (nothing happens when it has them already)."""
        if self.layers is None:
            self.layers = self._find_layers(plan)
            if self.layers is None:
                return
            self.pool = list(self.layers)
        depth = plan.num_layers
        if depth == len(self.layers):
            return
        while len(self.pool) < depth:
            self.pool.append(copy.deepcopy(self.pool[0]))
        if depth < len(self.layers):
            del self.layers[depth:]
        else:
            self.layers.extend(self.pool[len(self.layers):depth])
        for index, layer in enumerate(self.layers):
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = index
        self._update_config(plan.output_config, depth)

    def _find_layers(self, plan: MergePlan) -> torch.nn.ModuleList | None:
        named = next((task.name for task in plan.tasks if task.layer is not None), None)
        key = layer_key(named) if named else None
        if key is None:
            return None
        try:
            layers = self.model.get_submodule(key[0].rstrip("."))
        except AttributeError:
            return None
        return layers if isinstance(layers, torch.nn.ModuleList) else None

    def _update_config(self, output_config: Mapping, depth: int) -> None:
        config = getattr(self.model, "config", None)
        if config is None:
            return
        planned = output_config.get("text_config", output_config) if isinstance(output_config, Mapping) else {}
        targets = [config]
        if hasattr(config, "get_text_config") and config.get_text_config() is not config:
            targets.append(config.get_text_config())
        for target in targets:
            for key in DEPTH_KEYS:
                if isinstance(getattr(target, key, None), int):
                    setattr(target, key, depth)
            if isinstance(getattr(target, "layer_types", None), list):
                layer_types = planned.get("layer_types") or output_config.get("layer_types")
                target.layer_types = list(layer_types) if isinstance(layer_types, list) and \
                    len(layer_types) == depth else [target.layer_types[0]] * depth


@dataclass(frozen=True)
class LiveUpdate:
    """What one :meth:`LiveMerger.apply` did: tensors recomputed, tensors left as they were, tied duplicates."""

    recomputed: tuple[str, ...]
    reused: tuple[str, ...]
    tied: tuple[str, ...] = ()
    seconds: float = 0.0


class LiveMerger:
    """Writes merge candidates (recipes or plans) into one live model in place, recomputing only changed tensors."""

    def __init__(self, model: torch.nn.Module, catalog: ModelCatalog | None = None, *, device: str = "auto",
                 dtype: torch.dtype = torch.float32, task_vectors: bool = True, fused: bool = True,
                 layout: str = "auto", models: Iterable[str] | None = None, gpu_memory: int | None = None,
                 host_memory: int | None = None):
        """``dtype``: how sources are kept. With a 16-bit dtype and ``task_vectors``, the first plan's base stays
        fp32 and the other models are kept as 16-bit task vectors against it; without, every model is kept as
        16-bit weights (half the memory of the base's fp32 copy, less precise task vectors). ``fused`` (default):
        evaluate linear combinations (linear, task arithmetic, passthrough) in one pass over the resident tensors,
        straight into the parameters (:mod:`auto_merge.merge.fused`), as the streaming engine does, so a CPU
        candidate is bit-identical to the checkpoint `auto-merge merge` writes; False runs the methods' own
        evaluation instead (equal up to fp32 rounding; for comparisons).

        Where the sources go is the memory plan's decision (:meth:`plan_memory`), made at the first candidate:
        ``device`` ("auto", "cpu", "cuda[:N]") is where tensors are merged, ``layout`` "auto" or a forced one of
        :data:`auto_merge.merge.memory_plan.LAYOUTS`; ``models`` lists every model the candidates will read (a
        search's base and experts; default: the first candidate's), ``gpu_memory`` / ``host_memory`` (bytes)
        replace the detected capacities (default: the GPU's free memory plus the live model on it, the host's
        physical memory)."""
        self.model = model
        self.catalog = catalog or ModelCatalog()
        self.preferred_device = device
        self.dtype = dtype
        self.task_vectors = task_vectors
        self.fused = fused
        self.layout = layout
        self.models = list(models) if models is not None else None
        self.gpu_memory = gpu_memory
        self.host_memory = host_memory
        self.memory_plan: MemoryPlan | None = None
        self.resident: ResidentModels | None = None
        self.depth = LiveDepth(model)
        self._applied: dict[str, Any] = {}
        self._compute_device: torch.device | None = None
        self._staging: StagingBuffer | None = None

    def plan_memory(self, plan: MergePlan) -> MemoryPlan:
        """The placement of the sources, the live model and the per-tensor buffers (computed once, from headers
        and the capacities): what :meth:`apply` does, and what `auto-merge search --dry-run` prints."""
        if self.memory_plan is not None:
            return self.memory_plan
        anchor = plan.recipe.base_model or plan.template
        refs = list(dict.fromkeys([anchor, *(self.models or ()), *plan.models]))
        sources = [plan.models[ref] if ref in plan.models else self.catalog.get(ref) for ref in refs]
        live = live_footprint(self.model)
        device = self.preferred_device
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available() and self.gpu_memory is None):
            gpu = Capacity(None, "none")
        else:
            gpu_device = device if device.startswith("cuda") else "cuda"
            same = live.on_gpu and torch.cuda.is_available() and _indexed(torch.device(live.device)) == \
                _indexed(torch.device(gpu_device))
            gpu = gpu_capacity(gpu_device, self.gpu_memory, free=True, held=live.nbytes if same else 0)
        self.memory_plan = plan_live_memory(
            [ModelShapes.from_infos(model.ref, model.tensors) for model in sources], anchor=anchor, live=live,
            device=device, dtype=_dtype_name(self.dtype), task_vectors=self.task_vectors, gpu=gpu,
            host=host_capacity(self.host_memory), layout=self.layout)
        return self.memory_plan

    def prepare(self, plan: MergePlan) -> None:
        """Set up the resident store (and, streamed, the staging buffer) as the memory plan says; the first
        :meth:`apply` does it. Models are read on first use (or given with ``self.resident.load``)."""
        memory = self.plan_memory(plan)
        if memory.fits is False:
            warnings.warn(f"the live merge's memory plan does not fit ({memory.summary()}): {memory.advice}",
                          RuntimeWarning, stacklevel=3)
        anchor = None
        if memory.anchor is not None:
            anchor = plan.models.get(memory.anchor) or self.catalog.get(memory.anchor)
        self.resident = ResidentModels(device=memory.source_device, dtype=self.dtype, anchor=anchor,
                                       form=memory.form, pin=memory.pinned, block_bytes=memory.block_bytes)
        self._compute_device = _indexed(torch.device(memory.compute_device))
        self._staging = StagingBuffer(self._compute_device, memory.staging_bytes) if memory.streamed else None

    def compile(self, recipe: Recipe | Mapping, *, source: str | None = None) -> MergePlan:
        """The plan for a recipe (or recipe data); model headers are read once, through the catalog."""
        return compile_plan(parse_recipe(recipe, source=source), self.catalog, source=source)

    def invalidate(self) -> None:
        """Forget what was written: call after anything else changed the model's weights."""
        self._applied.clear()

    @torch.no_grad()
    def apply(self, candidate: MergePlan | Recipe | Mapping, *, seed: int = 0) -> LiveUpdate:
        """Materialise ``candidate`` into the live model; unchanged tensors since the last call are skipped."""
        started = time.perf_counter()
        plan = candidate if isinstance(candidate, MergePlan) else self.compile(candidate)
        self.depth.fit(plan)
        targets, tied = self._targets(plan)
        if self.resident is None:
            self.prepare(plan)
        resident = self.resident
        # A store set from outside (tensors adopted) is used where it lies.
        compute = self._compute_device if self._compute_device is not None else resident.device
        staging = self._staging

        def expand(tensor_input: TensorInput) -> tuple[torch.Tensor, torch.Tensor | None]:
            weight, delta = resident.stored(plan.models[tensor_input.model], tensor_input.name)
            if staging is None:
                return weight, delta
            return staging.stage(weight), staging.stage(delta) if delta is not None else None

        def fetch(tensor_input: TensorInput) -> torch.Tensor:
            if staging is None:
                return resident.tensor(plan.models[tensor_input.model], tensor_input.name)
            weight, delta = expand(tensor_input)  # as ResidentModels.tensor, from the staged copies
            return weight if delta is None else weight + delta.to(torch.float32)

        recomputed, reused = [], []
        for task in plan.tasks:
            if task.name in tied:
                continue
            key = (task, seed if task.is_random else None)
            if self._applied.get(task.name) == key:
                reused.append(task.name)
                continue
            target = targets[task.name]
            if staging is not None:
                staging.begin()
            if not self.fused and linear_terms(task) is not None:
                merged = merge_tensor(task.method, [fetch(i) for i in task.inputs],
                                      fetch(task.base) if task.base is not None else None, task.global_dict(),
                                      task.per_model_dicts(), seed=seed, tensor_name=task.name)
                target.copy_((merged * task.output_scale).to(device=target.device, dtype=target.dtype))
            elif target.device == compute:
                merge_task(task, fetch, seed=seed, device=compute, out=target, expand=expand)
            else:
                merged = merge_task(task, fetch, seed=seed, device=compute, expand=expand)
                target.copy_(merged.to(device=target.device, dtype=target.dtype))
            self._applied[task.name] = key
            recomputed.append(task.name)
        if staging is not None:
            staging.begin()  # drop the last tensor's references
        return LiveUpdate(tuple(recomputed), tuple(reused), tuple(sorted(tied)), time.perf_counter() - started)

    def _targets(self, plan: MergePlan) -> tuple[dict[str, torch.Tensor], set[str]]:
        """The model's tensor for each planned name (checked before anything is written) and tied duplicates.

        A tied LM head shares its storage with the input embedding; the embedding (planned first) is written and
        the head skipped, as loading a checkpoint with tied weights does.
        """
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(dict(self.model.named_buffers(remove_duplicate=False)))
        missing = [task.name for task in plan.tasks if task.name not in targets]
        if missing:
            raise KeyError(f"the live model has no tensor(s) {missing[:5]} of the plan "
                           f"({len(missing)} in all); the recipe changes the architecture (depth or names)")
        wrong = [f"{t.name}: plan {list(t.shape)}, model {list(targets[t.name].shape)}"
                 for t in plan.tasks if tuple(targets[t.name].shape) != tuple(t.shape)]
        if wrong:
            raise ValueError(f"planned shapes differ from the live model's: {'; '.join(wrong[:3])}")
        storages: dict[int, str] = {}
        tied = set()
        for task in plan.tasks:
            pointer = targets[task.name].data_ptr()
            if pointer in storages:
                tied.add(task.name)
            else:
                storages[pointer] = task.name
        return targets, tied
