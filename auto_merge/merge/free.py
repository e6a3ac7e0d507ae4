"""FREE-Merging (arXiv 2411.16815) as a one-shot merge that gives one model per task.

A FREE folder holds:

- ``backbone/``: the FR-Merging (``fourier`` method) merge of every expert over the base, written once through the
  ordinary engine (:func:`auto_merge.merge.engine.run_recipe`), so it is a normal checkpoint;
- ``experts/<task>.safetensors``: per task, a sparse expert: for each tensor name N the flat indices
  (``N::indices``, int64) and values (``N::values``, fp32) of the entries it sets;
- ``free.json``: format and version, the tasks and the expert model each came from, the parameters, and base and
  backbone information.

Expert of task t, per float tensor of the base (the paper code's "intended reading" for LLMs):
τ_t = expert_t − base in fp32; over each vector (a row, the last dimension, for ``axis: row``; the flattened tensor
for ``axis: tensor``) of n entries, drop the ⌊remove·n⌋ largest |τ_t|, keep the next ⌊density·n⌋ (a 1e-9
tolerance guards the floor against float rounding); E_t is τ_t there and 0 elsewhere. The stored values are
``scale``·E_t (``combine: add``, the default: on the expert's support the model is backbone + scale·τ_t) or
base + scale·τ_t (``combine: replace``, the ViT code's ``sum_two``: on the support the expert replaces the
backbone's value). ``scale: auto`` is λ_t = log10(1/k)·(mean_L mean|E_t|/k) / mean_L mean|F_r(τ_t)|, with k =
density, mean_L the plain average over all float tensors, mean|·| over all entries of a tensor (zeros included) and
F_r the backbone's Fourier filter (2-D tensors only, as the ``fourier`` method filters).

The model for task t is the backbone with its expert applied; a task with no expert uses the backbone alone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from auto_merge.errors import AutoMergeError

FREE_FILE = "free.json"
FREE_FORMAT = "auto-merge-free"
FREE_VERSION = 1
BACKBONE_DIR = "backbone"
EXPERTS_DIR = "experts"
AXES = ("row", "tensor")
COMBINES = ("add", "replace")
DTYPES = ("float32", "bfloat16", "float16")
INDEX_SUFFIX = "::indices"
VALUE_SUFFIX = "::values"
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Defaults: the LLM reading of the paper's code (the top 1 % of |τ_t| per tensor, unscaled, added); the ViT code's
# variant is axis: row, scale: auto, combine: replace.
EXPERT_DEFAULTS = {"density": 0.01, "remove": 0.0, "axis": "tensor", "scale": 1.0, "combine": "add"}
TOP_KEYS = ("base_model", "tasks", "backbone", "expert", "dtype")
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_FLOOR_TOLERANCE = 1e-9


class FreeError(AutoMergeError, ValueError):
    """A FREE recipe, folder or request that cannot be used: the message is the whole story."""


# ------------------------------------------------------------------------------------------------ the recipe
@dataclass(frozen=True)
class ExpertParams:
    density: float = 0.01
    remove: float = 0.0
    axis: str = "tensor"
    scale: float | str = 1.0
    combine: str = "add"

    def as_dict(self) -> dict[str, Any]:
        return {"density": self.density, "remove": self.remove, "axis": self.axis, "scale": self.scale,
                "combine": self.combine}


@dataclass(frozen=True)
class FreeRecipe:
    path: Path
    base_model: str
    tasks: dict[str, str]  # task name → expert model reference
    backbone: dict[str, Any]  # global parameters of the fourier method
    weights: dict[str, float]  # expert model reference → its fourier weight
    expert: ExpertParams
    dtype: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """The distinct expert models, in task order."""
        return list(dict.fromkeys(self.tasks.values()))

    def backbone_recipe(self) -> dict[str, Any]:
        """The backbone as an ordinary engine recipe: ``fourier`` over the base with every distinct expert."""
        recipe: dict[str, Any] = {
            "merge_method": "fourier",
            "base_model": self.base_model,
            "models": [{"model": ref, "parameters": {"weight": self.weights[ref]}} for ref in self.models],
        }
        if self.backbone:
            recipe["parameters"] = dict(self.backbone)
        if self.dtype:
            recipe["dtype"] = self.dtype
        return recipe

    def filter_params(self) -> tuple[float, str]:
        from auto_merge.merge.methods.spec import get_method

        spec = get_method("fourier")
        ratio = self.backbone.get("fr_ratio", spec.param("fr_ratio").default)
        mode = self.backbone.get("fr_mask", spec.param("fr_mask").default)
        return float(ratio), str(mode)


def load_free_recipe(path: str | Path) -> FreeRecipe:
    """Read and validate a FREE recipe; every problem is reported (file:line: key: what; allowed: ...) in one
    ConfigError, before any model is resolved or any weight read."""
    from auto_merge.config.errors import ConfigError, ConfigProblem
    from auto_merge.config.loader import load_yaml_with_includes
    from auto_merge.merge.methods import get_method
    from auto_merge.merge.methods.spec import ParamError

    path = Path(path)
    if not path.is_file():
        raise FreeError(f"{path}: no such recipe file")
    loaded = load_yaml_with_includes(path)
    data, sources = loaded.data, loaded.sources
    problems: list[ConfigProblem] = []

    def problem(key_path: tuple, message: str, allowed: str | None = None, about_key: bool = False) -> None:
        problems.append(ConfigProblem(sources.locate(key_path, about_key=about_key), key_path, message, allowed))

    if not isinstance(data, Mapping):
        raise ConfigError.single(loaded.path, f"a FREE recipe is a mapping, got {type(data).__name__}",
                                 allowed="base_model, tasks, backbone, expert, dtype")
    for key in data:
        if key not in TOP_KEYS:
            problem((key,), "unknown key", ", ".join(TOP_KEYS), about_key=True)

    base = data.get("base_model")
    if not isinstance(base, str) or not base.strip():
        problem(("base_model",), "missing" if base is None else f"must be a model reference, got {base!r}",
                "a model folder, zoo:NAME or a cached hub id")

    tasks: dict[str, str] = {}
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, Mapping) or not raw_tasks:
        problem(("tasks",), "missing" if raw_tasks is None else f"must be a non-empty mapping, got {raw_tasks!r}",
                "a mapping TASK: MODEL_REF (one expert per lm-eval task)")
    else:
        for task, ref in raw_tasks.items():
            if not isinstance(task, str) or not _TASK_NAME.fullmatch(task):
                problem(("tasks", task), f"task name {task!r} cannot name a file",
                        "letters, digits and . _ + - (starting with a letter or digit, at most 128)", about_key=True)
            elif not isinstance(ref, str) or not ref.strip():
                problem(("tasks", task), f"must be a model reference, got {ref!r}",
                        "a model folder, zoo:NAME or a cached hub id")
            elif isinstance(base, str) and ref == base:
                problem(("tasks", task), f"{ref} is the base model: its task vector is zero",
                        "a fine-tune of the base")
            else:
                tasks[task] = ref

    fourier = get_method("fourier")
    backbone: dict[str, Any] = {}
    weights: dict[str, float] = {}
    raw_backbone = data.get("backbone") or {}
    if not isinstance(raw_backbone, Mapping):
        problem(("backbone",), f"must be a mapping, got {raw_backbone!r}",
                "the fourier method's parameters: " + ", ".join(spec.name for spec in fourier.params))
        raw_backbone = {}
    for key, value in raw_backbone.items():
        try:
            spec = fourier.param(key)
        except KeyError:
            problem(("backbone", key), "not a parameter of the fourier method",
                    ", ".join(spec.name for spec in fourier.params), about_key=True)
            continue
        if key == "weight":
            per_task = value if isinstance(value, Mapping) else {task: value for task in tasks}
            for task, weight in per_task.items():
                where = ("backbone", "weight", task) if isinstance(value, Mapping) else ("backbone", "weight")
                if task not in tasks:
                    if isinstance(raw_tasks, Mapping) and task in raw_tasks:
                        continue  # already reported under tasks
                    problem(where, f"{task!r} is not one of the tasks", ", ".join(tasks) or "a task name",
                            about_key=True)
                    continue
                try:
                    weight = spec.coerce(weight, "backbone.weight")
                except ParamError:
                    problem(where, f"must be a number, got {weight!r}",
                            "a finite real number, or a mapping TASK: number")
                    continue
                ref = tasks[task]
                if ref in weights and weights[ref] != weight:
                    problem(where, f"{ref} is the expert of several tasks with different weights ({weights[ref]:g} "
                                   f"and {weight:g})", "one weight per expert model")
                weights.setdefault(ref, weight)
            continue
        try:
            backbone[key] = spec.coerce(value, f"backbone.{key}")
        except ParamError:
            problem(("backbone", key), f"got {value!r}", spec.allowed())
    for ref in tasks.values():
        weights.setdefault(ref, 1.0)

    expert_values = dict(EXPERT_DEFAULTS)
    raw_expert = data.get("expert") or {}
    if not isinstance(raw_expert, Mapping):
        problem(("expert",), f"must be a mapping, got {raw_expert!r}", ", ".join(EXPERT_DEFAULTS))
        raw_expert = {}
    for key, value in raw_expert.items():
        where = ("expert", key)
        if key not in EXPERT_DEFAULTS:
            problem(where, "unknown key", ", ".join(EXPERT_DEFAULTS), about_key=True)
        elif key in ("density", "remove"):
            low_ok = (lambda v: v > 0) if key == "density" else (lambda v: v >= 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low_ok(value) or value > 1:
                problem(where, f"got {value!r}", "a number in (0, 1]" if key == "density" else "a number in [0, 1)")
            else:
                expert_values[key] = float(value)
        elif key == "axis":
            if value not in AXES:
                problem(where, f"got {value!r}", "row (per row, the last dimension) or tensor (the whole tensor)")
            else:
                expert_values[key] = value
        elif key == "combine":
            if value not in COMBINES:
                problem(where, f"got {value!r}",
                        "add (backbone + expert on its support) or replace (base + expert there)")
            else:
                expert_values[key] = value
        elif key == "scale":
            if value == "auto":
                expert_values[key] = value
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problem(where, f"got {value!r}", "a finite real number, or auto (the λ_t rescale of FREE-Merging)")
            else:
                expert_values[key] = float(value)
    if expert_values["density"] + expert_values["remove"] > 1 + _FLOOR_TOLERANCE:
        problem(("expert", "remove"), f"remove {expert_values['remove']:g} + density "
                                      f"{expert_values['density']:g} exceeds 1", "remove + density <= 1")
    if expert_values["scale"] == "auto" and expert_values["density"] >= 1:
        problem(("expert", "scale"), "auto is log10(1/density)·…, which is 0 at density 1",
                "a number, or a density below 1")

    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        problem(("dtype",), f"got {dtype!r}", ", ".join(DTYPES) + " (default: the base model's dtype)")

    if problems:
        raise ConfigError(problems, config_file=loaded.path)
    return FreeRecipe(path=loaded.path, base_model=base, tasks=tasks, backbone=backbone, weights=weights,
                      expert=ExpertParams(**expert_values), dtype=dtype, data=dict(data))


# ------------------------------------------------------------------------------------------- expert selection
def _count(fraction: float, n: int) -> int:
    return min(n, int(math.floor(fraction * n + _FLOOR_TOLERANCE)))


def select_expert(delta, density: float, remove: float = 0.0, axis: str = "row"):
    """Flat indices (int64, ascending) of the expert's support in ``delta``: per vector of n entries (a row, the last
    dimension, or the whole tensor), the ⌊density·n⌋ largest |delta| after dropping the ⌊remove·n⌋ largest. Ties at
    a cut-off are broken by ``torch.topk``."""
    import torch

    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if axis == "row" and delta.dim() >= 1:
        rows = delta.reshape(-1, delta.shape[-1]) if delta.numel() else delta.reshape(0, 1)
    else:
        rows = delta.reshape(1, -1)
    width = rows.shape[1]
    n_remove, n_keep = _count(remove, width), _count(density, width)
    n_keep = min(n_keep, width - n_remove)
    if n_keep <= 0 or rows.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64)
    top = rows.abs().topk(n_remove + n_keep, dim=1, sorted=True).indices[:, n_remove:]
    offsets = torch.arange(rows.shape[0], dtype=torch.int64).unsqueeze(1) * width
    return (top + offsets).reshape(-1).sort().values


def auto_scale(expert_means: Sequence[float], filtered_means: Sequence[float], density: float) -> float:
    """λ_t = log10(1/k)·(mean_L mean|E_t| / k) / mean_L mean|F_r(τ_t)|, k = density; the inputs are
    the per-tensor mean|E_t| and mean|F_r(τ_t)|. 0 when the task vector is zero."""
    if not expert_means:
        return 0.0
    m_expert = sum(expert_means) / len(expert_means)
    m_filtered = sum(filtered_means) / len(filtered_means)
    if m_filtered == 0:
        return 0.0
    return math.log10(1.0 / density) * (m_expert / density) / m_filtered


def expert_tensor_names(base) -> list[str]:
    """The tensors an expert covers: every floating tensor of the base (a SourceModel), in name order."""
    return sorted(name for name, info in base.tensors.items() if info.dtype in FLOAT_DTYPES)


@dataclass
class BuiltExpert:
    indices: dict[str, Any]  # tensor name → int64 flat indices
    values: dict[str, Any]  # tensor name → fp32 values to add (add) or to set (replace)
    scale: float
    entries: int
    total: int


def build_expert(base_reader, expert_reader, names: Sequence[str], params: ExpertParams, fr_ratio: float,
                 fr_mask: str) -> BuiltExpert:
    """One task's expert from the base and the expert model (readers with ``get_tensor``)."""
    import torch

    from auto_merge.merge.methods.fourier import fourier_high_pass

    indices, raw, base_values = {}, {}, {}
    expert_means, filtered_means = [], []
    total = 0
    with torch.no_grad():
        for name in names:
            base = base_reader.get_tensor(name).to(torch.float32)
            delta = expert_reader.get_tensor(name).to(torch.float32) - base
            total += delta.numel()
            chosen = select_expert(delta, params.density, params.remove, params.axis)
            picked = delta.reshape(-1)[chosen]
            if params.scale == "auto" and delta.numel():
                expert_means.append(float(picked.abs().sum(dtype=torch.float64)) / delta.numel())
                filtered = fourier_high_pass(delta, fr_ratio, fr_mask) if delta.dim() == 2 else delta
                filtered_means.append(float(filtered.abs().mean(dtype=torch.float64)))
            if chosen.numel():
                indices[name] = chosen
                raw[name] = picked.clone()
                if params.combine == "replace":
                    base_values[name] = base.reshape(-1)[chosen].clone()
            if hasattr(base_reader, "release"):
                base_reader.release()
                expert_reader.release()
    scale = auto_scale(expert_means, filtered_means, params.density) if params.scale == "auto" \
        else float(params.scale)
    values = {}
    for name, picked in raw.items():
        scaled = picked * scale
        values[name] = (base_values[name] + scaled) if params.combine == "replace" else scaled
    entries = sum(int(chosen.numel()) for chosen in indices.values())
    return BuiltExpert(indices, values, scale, entries, total)


def write_expert(path: Path, expert: BuiltExpert, shapes: Mapping[str, tuple], metadata: Mapping[str, str]) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name in sorted(expert.indices):
        tensors[name + INDEX_SUFFIX] = expert.indices[name].to(torch.int64).contiguous()
        tensors[name + VALUE_SUFFIX] = expert.values[name].to(torch.float32).contiguous()
    meta = {**metadata, "shapes": json.dumps({name: list(shapes[name]) for name in sorted(expert.indices)})}
    save_file(tensors, str(path), metadata=meta)


def read_expert(path: str | Path) -> tuple[dict[str, tuple[Any, Any]], dict[str, str]]:
    """An expert file → (tensor name → (indices, values)), its metadata."""
    from safetensors import safe_open

    entries: dict[str, list] = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():
            for suffix, slot in ((INDEX_SUFFIX, 0), (VALUE_SUFFIX, 1)):
                if key.endswith(suffix):
                    entries.setdefault(key[: -len(suffix)], [None, None])[slot] = handle.get_tensor(key)
    broken = sorted(name for name, (idx, val) in entries.items()
                    if idx is None or val is None or idx.shape != val.shape)
    if broken:
        raise FreeError(f"{path}: expert entries without matching indices and values: {', '.join(broken[:5])}")
    return {name: (idx, val) for name, (idx, val) in entries.items()}, metadata


def apply_expert(tensor, indices, values, combine: str):
    """backbone tensor + expert (``add``) or with the expert's values set (``replace``), computed in fp32 and cast
    back to the tensor's dtype. Returns a new tensor."""
    import torch

    flat = tensor.to(torch.float32).reshape(-1).clone()
    if indices.numel() and int(indices.max()) >= flat.numel():
        raise FreeError(f"expert index {int(indices.max())} is outside a tensor of {flat.numel()} entries")
    if combine == "add":
        flat[indices] += values.to(torch.float32)
    else:
        flat[indices] = values.to(torch.float32)
    return flat.reshape(tensor.shape).to(tensor.dtype)


# --------------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class FreeResult:
    out_dir: Path
    tasks: dict[str, dict[str, Any]]
    seconds: float


def _check_models(recipe: FreeRecipe, catalog) -> tuple[Any, dict[str, Any]]:
    """Resolve base and experts (headers only); each expert must hold every float tensor of the base, same shape."""
    from auto_merge.config.errors import ConfigError, ConfigProblem, Location

    def fail(key_path: tuple, message: str, allowed: str | None = None):
        return ConfigError([ConfigProblem(Location(recipe.path), key_path, message, allowed)],
                           config_file=recipe.path)

    try:
        base = catalog.get(recipe.base_model)
    except (ValueError, OSError) as error:
        raise fail(("base_model",), str(error)) from None
    names = expert_tensor_names(base)
    experts = {}
    for task, ref in recipe.tasks.items():
        try:
            model = catalog.get(ref)
        except (ValueError, OSError) as error:
            raise fail(("tasks", task), str(error)) from None
        missing = [name for name in names if name not in model.tensors]
        wrong = [name for name in names
                 if name in model.tensors and model.tensors[name].shape != base.tensors[name].shape]
        if missing:
            raise fail(("tasks", task), f"{ref} lacks {len(missing)} tensor(s) of the base ({', '.join(missing[:3])})",
                       "a fine-tune of the base with the same tensors")
        if wrong:
            name = wrong[0]
            raise fail(("tasks", task), f"{ref} has {len(wrong)} tensor(s) of another shape than the base "
                                        f"({name}: {model.tensors[name].shape} vs {base.tensors[name].shape})",
                       "a fine-tune of the base with the same shapes (same vocabulary)")
        experts[ref] = model
    return base, experts


def build_free(recipe_path: str | Path, out_dir: str | Path, *, overwrite: bool = False, device: str = "cpu",
               progress: bool = False) -> FreeResult:
    """`auto-merge free RECIPE.yml OUT_DIR`: backbone, one expert per task and free.json, written atomically."""
    import time

    from auto_merge.merge.engine import run_recipe
    from auto_merge.merge.io import CheckpointReader
    from auto_merge.merge.plan import ModelCatalog
    from auto_merge.merge.recipe import parse_recipe
    from auto_merge.output_dirs import atomic_folder, check_replaceable

    started = time.perf_counter()
    recipe = load_free_recipe(recipe_path)
    catalog = ModelCatalog(search_dirs=[recipe.path.parent])
    base, experts = _check_models(recipe, catalog)
    sources = [base.path] + [model.path for model in experts.values()]
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite=overwrite, protected=sources)
    engine_recipe = parse_recipe(recipe.backbone_recipe(), source=str(recipe.path))
    fr_ratio, fr_mask = recipe.filter_params()
    names = expert_tensor_names(base)
    shapes = {name: tuple(base.tensors[name].shape) for name in names}
    summary: dict[str, dict[str, Any]] = {}
    with atomic_folder(out_dir, overwrite=overwrite, protected=sources, kind="free") as staging:
        note = [f"the backbone of a FREE-Merging folder (`{FREE_FILE}` beside this folder): the `fourier` merge of "
                f"every expert; a task's model is this backbone with its expert from `../{EXPERTS_DIR}/` applied "
                f"(`auto-merge free materialise FREE_DIR TASK MODEL_DIR`)"]
        run_recipe(engine_recipe, staging / BACKBONE_DIR, device=device, catalog=catalog, source=str(recipe.path),
                   progress=progress, notes=[("FREE-Merging", note)])
        (staging / EXPERTS_DIR).mkdir()
        built: dict[str, BuiltExpert] = {}
        with CheckpointReader(base.path) as base_reader:
            for task, ref in recipe.tasks.items():
                if ref not in built:
                    with CheckpointReader(experts[ref].path) as expert_reader:
                        built[ref] = build_expert(base_reader, expert_reader, names, recipe.expert, fr_ratio, fr_mask)
                expert = built[ref]
                file = f"{EXPERTS_DIR}/{task}.safetensors"
                write_expert(staging / file, expert, shapes, {
                    "format": FREE_FORMAT, "version": str(FREE_VERSION), "task": task, "model": ref,
                    "combine": recipe.expert.combine, "scale": repr(expert.scale)})
                summary[task] = {"model": ref, "path": str(experts[ref].path), "file": file, "scale": expert.scale,
                                 "entries": expert.entries, "of": expert.total,
                                 "tensors": len(expert.indices)}
        manifest = {
            "format": FREE_FORMAT,
            "version": FREE_VERSION,
            "combine": recipe.expert.combine,
            "base_model": {"ref": recipe.base_model, "path": str(base.path)},
            "backbone": {"folder": BACKBONE_DIR, "method": "fourier", "parameters": dict(recipe.backbone),
                         "weights": dict(recipe.weights), "dtype": engine_recipe.output_dtype or base.stored_dtype},
            "expert": recipe.expert.as_dict(),
            "tasks": summary,
            "recipe": _plain(recipe.data),
        }
        (staging / FREE_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return FreeResult(out_dir=out_dir, tasks=summary, seconds=time.perf_counter() - started)


def _plain(value):
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


__all__ = [
    "FreeError", "FreeRecipe", "ExpertParams", "apply_expert", "auto_scale", "build_expert", "build_free",
    "load_free_recipe", "read_expert", "select_expert",
]
