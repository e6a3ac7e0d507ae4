"""The in-memory merge path: source weights stay resident and each candidate is written into a live model in place.

A search evaluates hundreds of candidates over the same sources, so the sources are read once and every candidate
is materialised straight into the parameters of one live `transformers` model: no checkpoint is written, no model is
re-instantiated, and the evaluator wrapping that model sees the new weights on its next call.

Two entry points:

- :class:`LiveMerger` runs the same :class:`~auto_merge.merge.plan.MergePlan` the streaming engine runs (a recipe
  compiled against the models' headers), so a candidate scored live is exactly the checkpoint `auto-merge merge`
  would write for its recipe. Source tensors are loaded once per model and kept, in fp32 (or, to save memory, the
  experts as bf16 task vectors against an fp32 base), on the GPU when there is one and they fit, else on the CPU.
  Each output tensor's task is remembered; a tensor whose task did not change since the last candidate (e.g. a
  layer group the search did not touch) is not recomputed. A plan of another depth (DIS, pruning) resizes the live
  model's decoder first (:class:`LiveDepth`): layer modules are kept in a pool and re-used, never re-created per
  candidate.
- :func:`materialise_into` takes a *tensor plan* (tensor name → :class:`TensorSpec`) over one base and a fixed list
  of experts held by :class:`ResidentSources`; the zoo report uses it for its uniform and per-group merges.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from auto_merge.merge.engine import merge_task
from auto_merge.merge.fused import combination, combine_into, linear_coefficients, linear_terms
from auto_merge.merge.methods import get_method, merge_tensor
from auto_merge.merge.plan import (
    DEPTH_KEYS,
    MergePlan,
    ModelCatalog,
    SourceModel,
    TensorInput,
    compile_plan,
    layer_index,
    layer_key,
)
from auto_merge.merge.recipe import Recipe, parse_recipe

__all__ = ["LiveDepth", "LiveMerger", "LiveUpdate", "ResidentModels", "ResidentSources", "TensorSpec", "TensorPlan",
           "layer_index", "materialise_into", "read_state"]

# Share of free GPU memory the resident sources may take when the device is chosen automatically.
GPU_MEMORY_SHARE = 0.8


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

    In fp32 every tensor is kept as read. With a 16-bit ``dtype`` the ``anchor`` model (the base) stays in fp32 and
    the other models are kept as 16-bit *task vectors* against it (same-name tensors of equal shape; others as
    weights), rebuilt in fp32 on each read: rounding then hits the small differences a merge is about, not the
    large weights they ride on.
    """

    def __init__(self, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 anchor: SourceModel | None = None):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"resident sources are kept in float32, bfloat16 or float16, not {dtype}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Tensors report "cuda:0": an index-less device would never compare equal to the live model's.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.anchor = anchor if dtype != torch.float32 else None
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._deltas: dict[str, set[str]] = {}

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
        state = self._states.get(model.ref)
        if state is None:
            state = self._load(model)
            self._states[model.ref] = state
        return state

    def _load(self, model: SourceModel) -> dict[str, torch.Tensor]:
        from auto_merge.merge.io import CheckpointReader

        is_anchor = self.anchor is not None and model.ref == self.anchor.ref
        anchor_state = self._state(self.anchor) if self.anchor is not None and not is_anchor else None
        keep_dtype = torch.float32 if is_anchor else self.dtype
        state, deltas = {}, set()
        with CheckpointReader(model.path, allow_pickle=model.allow_pickle) as reader:
            for name in reader.names:
                # A copy: the reader hands out views of the file's pages.
                tensor = reader.get_tensor(name).to(device=self.device, dtype=torch.float32, copy=True)
                reader.release()
                reference = anchor_state.get(name) if anchor_state is not None else None
                if reference is not None and reference.shape == tensor.shape:
                    tensor = tensor.sub_(reference)
                    deltas.add(name)
                state[name] = tensor.to(keep_dtype)
        self._deltas[model.ref] = deltas
        return state

    def adopt(self, ref: str, state: dict[str, torch.Tensor]) -> None:
        """Keep tensors already in memory as model ``ref``'s weights, as they are (no copy, no conversion)."""
        self._states[ref] = state
        self._deltas[ref] = set()

    @property
    def models(self) -> list[str]:
        return sorted(self._states)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self._states.values() for t in state.values())


def choose_device(models: Mapping[str, SourceModel], dtype: torch.dtype, preferred: str = "auto") -> str:
    """``preferred`` unless "auto": then CUDA when available and the sources fit in its free memory, else CPU."""
    if preferred != "auto":
        return preferred
    if not torch.cuda.is_available():
        return "cpu"
    element = torch.tensor([], dtype=dtype).element_size()
    needed = sum(info.numel * element for model in models.values() for info in model.tensors.values())
    free, _total = torch.cuda.mem_get_info()
    return "cuda" if needed <= GPU_MEMORY_SHARE * free else "cpu"


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
                 dtype: torch.dtype = torch.float32, task_vectors: bool = True, fused: bool = True):
        """``dtype``: how sources are kept. With a 16-bit dtype and ``task_vectors``, the first plan's base stays
        fp32 and the other models are kept as 16-bit task vectors against it; without, every model is kept as
        16-bit weights (half the memory of the base's fp32 copy, less precise task vectors). ``fused`` (default):
        evaluate linear combinations (linear, task arithmetic, passthrough) in one pass over the resident tensors,
        straight into the parameters (:mod:`auto_merge.merge.fused`), as the streaming engine does, so a CPU
        candidate is bit-identical to the checkpoint `auto-merge merge` writes; False runs the methods' own
        evaluation instead (equal up to fp32 rounding; for comparisons)."""
        self.model = model
        self.catalog = catalog or ModelCatalog()
        self.preferred_device = device
        self.dtype = dtype
        self.task_vectors = task_vectors
        self.fused = fused
        self.resident: ResidentModels | None = None
        self.depth = LiveDepth(model)
        self._applied: dict[str, Any] = {}

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
            device = choose_device(plan.models, self.dtype, self.preferred_device)
            anchor = plan.models[plan.recipe.base_model or plan.template] if self.task_vectors else None
            self.resident = ResidentModels(device=device, dtype=self.dtype, anchor=anchor)
        resident = self.resident

        def fetch(tensor_input: TensorInput) -> torch.Tensor:
            return resident.tensor(plan.models[tensor_input.model], tensor_input.name)

        def expand(tensor_input: TensorInput) -> tuple[torch.Tensor, torch.Tensor | None]:
            return resident.stored(plan.models[tensor_input.model], tensor_input.name)

        recomputed, reused = [], []
        for task in plan.tasks:
            if task.name in tied:
                continue
            key = (task, seed if task.is_random else None)
            if self._applied.get(task.name) == key:
                reused.append(task.name)
                continue
            target = targets[task.name]
            if not self.fused and linear_terms(task) is not None:
                merged = merge_tensor(task.method, [fetch(i) for i in task.inputs],
                                      fetch(task.base) if task.base is not None else None, task.global_dict(),
                                      task.per_model_dicts(), seed=seed, tensor_name=task.name)
                target.copy_((merged * task.output_scale).to(device=target.device, dtype=target.dtype))
            elif target.device == resident.device:
                merge_task(task, fetch, seed=seed, device=resident.device, out=target, expand=expand)
            else:
                merged = merge_task(task, fetch, seed=seed, device=resident.device, expand=expand)
                target.copy_(merged.to(device=target.device, dtype=target.dtype))
            self._applied[task.name] = key
            recomputed.append(task.name)
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
