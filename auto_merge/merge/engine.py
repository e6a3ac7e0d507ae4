"""The streaming merge engine: run a plan tensor by tensor into a sharded safetensors checkpoint.

For each output tensor, in plan order, the engine reads that tensor's inputs (one lazy read each: views of the
memory-mapped sources, whose pages are released after the tensor), merges them in fp32 (on the CPU, or on CUDA with
``device="cuda"``) into one reused output buffer, cast once to the output dtype, and streams it into its shard file.
Fixed linear combinations (linear, task arithmetic, passthrough) are one chunked fp32 sum straight into that buffer
(:mod:`auto_merge.merge.fused`, shared with the in-memory path, so both give bit-identical tensors); the other
methods run through the registry. Nothing else is kept: memory holds the current task's inputs, the method's
working copies and the output buffer, whatever the model size (the shard layout is fixed from the plan's shapes, so
shards are written as the tensors come, not buffered). Random methods are seeded with ``(seed, output tensor name)``, so the
result does not depend on tensor order or sharding.

The output folder gets the tensors, ``config.json`` (layer count, vocabulary size, dtype), the tokenizer
(:mod:`auto_merge.merge.tokenizer`), the template model's ``generation_config.json``, the recipe
(``auto_merge_recipe.yml``), its mergekit export (``mergekit_config.yml``, when mergekit can express it) and a model
card (``README.md``) that records both and how to reproduce the merge. It is built beside ``OUT_DIR`` and renamed
into place at the end (:func:`auto_merge.output_dirs.atomic_folder`).

A file of several recipe documents (mergekit-multi) runs stage by stage (:func:`run_stages`): the final merge into
``OUT_DIR``, every other stage into ``OUT_DIR.stages/NAME``, each written as above.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_merge.errors import AutoMergeError
from auto_merge.formats.mergekit import MergekitExportError, to_mergekit_yaml
from auto_merge.formats.recipe_files import RecipeStage, load_recipe, load_stages
from auto_merge.merge.io import (
    DEFAULT_SHARD_SIZE,
    SIDE_FILES,
    CheckpointReader,
    OutputTensor,
    ShardedWriter,
    copy_files,
    parse_size,
    plan_shards,
    shard_file_names,
    write_json,
)
from auto_merge.merge import fused_gta
from auto_merge.merge.fused import combination, combine_into, linear_terms
from auto_merge.merge.memory_plan import Capacity
from auto_merge.merge.merge_memory import plan_merge_memory, task_memory
from auto_merge.merge.methods import merge_tensor
from auto_merge.merge.plan import MergePlan, ModelCatalog, TensorInput, TensorTask, compile_plan
from auto_merge.merge.recipe import Recipe, RecipeError, rename_models
from auto_merge.merge.tokenizer import align_rows, write_chat_template, write_tokenizer
from auto_merge.output_dirs import atomic_folder, check_replaceable

RECIPE_FILE = "auto_merge_recipe.yml"
MERGEKIT_FILE = "mergekit_config.yml"


def merge_task(task: TensorTask, fetch: Callable[[TensorInput], Any], *, seed: int = 0, device=None, out=None,
               expand: Callable[[TensorInput], list] | None = None):
    """Compute one planned tensor from its inputs (``fetch`` returns a stored tensor for an input).

    Fixed linear combinations (linear, task arithmetic, passthrough; :mod:`auto_merge.merge.fused`) are evaluated as
    one fp32 sum over the stored tensors, written straight into ``out``; other methods run through the registry in
    fp32. ``expand(input)`` may give an input's stored form ``(weight, delta)``, whose sum is the input (``delta``
    None for a plain tensor; default ``(fetch(input), None)``). ``out``: a tensor of the task's shape on ``device``
    (any floating dtype) that receives the result, cast once; it is returned. Without it the fp32 result is returned
    (a new tensor).
    """
    import torch

    form = linear_terms(task)
    if form is not None:
        if expand is None:
            fetched: dict[tuple, Any] = {}  # one object per stored tensor, so that repeated inputs are read once

            def expand(tensor_input: TensorInput):
                key = (tensor_input.model, tensor_input.name)
                if key not in fetched:
                    tensor = fetch(tensor_input)
                    fetched[key] = tensor.to(device=device) if device is not None else tensor
                return fetched[key], None

        base_part = expand(task.base) if task.base is not None else None
        input_parts = [expand(tensor_input) for tensor_input in task.inputs]
        stored = [tensor for part in (base_part, *input_parts) if part is not None for tensor in part
                  if tensor is not None]
        if all(tuple(tensor.shape) == tuple(task.shape) for tensor in stored):
            target = out
            if target is None:
                where = device if device is not None else (stored[0].device if stored else None)
                target = torch.empty(task.shape, dtype=torch.float32, device=where)
            return combine_into(target, combination(form, base_part, input_parts))
        # Shapes disagree: the method reports it.

    if task.method in fused_gta.KERNEL_METHODS and device is not None and fused_gta.available(device) \
            and all(tensor_input.row_map is None for tensor_input in task.reads()):
        merged = _fused_gta(task, fetch, expand, device, seed, out)
        if merged is not None:
            return merged

    reads = task.reads()
    tensors = [fetch(tensor_input).to(device=device, dtype=torch.float32) for tensor_input in reads]
    if any(tensor_input.row_map is not None for tensor_input in reads):  # vocabularies differ: rows by token
        tensors = align_rows(tensors, [tensor_input.row_map for tensor_input in reads],
                             base=len(task.inputs) if task.base is not None else None,
                             models=[tensor_input.model for tensor_input in reads])
    inputs = tensors[:len(task.inputs)]
    base = tensors[len(task.inputs)] if task.base is not None else None
    scaled = task.output_scale != 1.0
    merged = merge_tensor(task.method, inputs, base, task.global_dict(), task.per_model_dicts(), seed=seed,
                          tensor_name=task.name, out=None if scaled else out)
    if scaled:
        merged = merged * task.output_scale  # not in place: a method's result may be one of its inputs
        if out is not None:
            return out.copy_(merged)
    return merged


def _fused_gta(task: TensorTask, fetch, expand, device, seed: int, out):
    """TIES, DARE, Breadcrumbs or DELLA on CUDA (:mod:`auto_merge.merge.fused_gta`) over the stored tensors, as read:
    the models' tensors, or the resident task vectors when every input is stored against the base. None where the
    inputs do not fit the kernels (mixed forms or dtypes); the registry method then runs."""
    if expand is None:
        def expand(tensor_input: TensorInput):
            return fetch(tensor_input).to(device=device), None

    base, base_delta = expand(task.base)
    parts = [expand(tensor_input) for tensor_input in task.inputs]
    if base_delta is not None:
        return None
    if all(delta is None for _, delta in parts):
        models, relative = [weight for weight, _ in parts], False
    elif all(delta is not None and weight is base for weight, delta in parts):
        models, relative = [delta for _, delta in parts], True
    else:
        return None
    tensors = [base, *models]
    if len({model.dtype for model in models}) != 1 or any(
            tuple(tensor.shape) != tuple(task.shape) or not tensor.is_cuda or not tensor.is_contiguous()
            or tensor.device != base.device for tensor in tensors):
        return None
    params = fused_gta.resolved_params(task.method, task.global_params, task.per_model_params)
    return fused_gta.gta_merge_fused(task.method, params, base, models, relative=relative, out=out, seed=seed,
                                     tensor_name=task.name, output_scale=task.output_scale)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a streaming merge beyond the Python/torch runtime: the largest task's tensors."""

    largest_task: str
    peak_bytes: int


def estimate_memory(plan: MergePlan) -> MemoryEstimate:
    """Per task (:func:`auto_merge.merge.merge_memory.task_memory`): inputs as read, their fp32 (and row-mapped)
    copies, the method's working copies, the fp32 result and its cast copy. An estimate: methods differ in how many
    temporaries they make."""
    worst, worst_bytes = "", 0
    for task in plan.tasks:
        parts = task_memory(plan, task)
        total = parts["as_read"] + parts["copies"] + parts["method"] + parts["result"] + parts["cast"]
        if total > worst_bytes:
            worst, worst_bytes = task.name, total
    return MemoryEstimate(worst, worst_bytes)


def output_layout(plan: MergePlan, out_shard_size: str | int) -> list[list[OutputTensor]]:
    tensors = [OutputTensor(task.name, task.shape, plan.out_dtype) for task in plan.tasks]
    return plan_shards(tensors, parse_size(out_shard_size))


def describe_plan(plan: MergePlan, out_shard_size: str | int = DEFAULT_SHARD_SIZE, *, device: str = "cpu",
                  gpu: Capacity | None = None, host: Capacity | None = None) -> str:
    """What --dry-run prints: the plan summary, the output files, the memory estimate and the memory plan per
    device (:func:`auto_merge.merge.merge_memory.plan_merge_memory`; ``device`` "cuda" for a merge on the GPU,
    ``gpu``/``host`` the capacities, default: the host's detected memory, the GPU's unknown)."""
    from auto_merge.merge.memory_plan import host_capacity

    shards = output_layout(plan, out_shard_size)
    memory = estimate_memory(plan)
    methods = sorted({task.method for task in plan.tasks})
    lines = [plan.summary(),
             f"methods: {', '.join(methods)}; models read: {', '.join(plan.models)}",
             f"shards: {len(shards)} ({', '.join(shard_file_names(len(shards))[:3])}"
             f"{', ...' if len(shards) > 3 else ''})",
             f"memory estimate: {memory.peak_bytes / 1e6:.1f} MB peak for tensors (largest task: "
             f"{memory.largest_task}), plus the Python/torch runtime; shards are streamed, not buffered",
             plan_merge_memory(plan, device=device, gpu=gpu, host=host or host_capacity()).describe()]
    return "\n".join(lines)


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    tensors: int
    shards: int
    bytes_written: int
    seconds: float
    reads: int


def merge_to_disk(
    plan: MergePlan,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = False,
    recipe_source: str | None = None,
    reader_factory: Callable[..., CheckpointReader] = CheckpointReader,
    notes: Sequence[tuple[str, Sequence[str]]] = (),
) -> MergeResult:
    """Execute ``plan`` into ``out_dir`` (atomically). ``reader_factory(folder, allow_pickle=...)`` opens sources;
    ``notes`` are (heading, lines) sections of the model card."""
    import torch
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--cuda was given but torch sees no CUDA device")
    out_dir = Path(out_dir)
    sources = [model.path for model in plan.models.values()]
    check_replaceable(out_dir, overwrite=overwrite, protected=sources)
    out_dtype = getattr(torch, plan.out_dtype)
    shards = output_layout(plan, out_shard_size)
    readers: dict[str, CheckpointReader] = {}

    def fetch(tensor_input: TensorInput):
        reader = readers.get(tensor_input.model)
        if reader is None:
            model = plan.models[tensor_input.model]
            reader = reader_factory(model.path, allow_pickle=model.allow_pickle)
            readers[tensor_input.model] = reader
        return reader.get_tensor(tensor_input.name)

    try:
        with atomic_folder(out_dir, overwrite=overwrite, protected=sources) as staging:
            writer = ShardedWriter(staging, shards)
            # One output buffer, reused for every tensor: results are computed (or cast) straight into it, so no
            # result-sized tensor is allocated (and page-faulted) per output tensor. (Writing from a second buffer
            # in a background thread was measured slower on 2 vCPUs: more page faults and sys time than it hid.)
            largest = max((_numel(task.shape) for task in plan.tasks), default=0)
            buffer = torch.empty(largest, dtype=out_dtype, device=device)
            try:
                with torch.no_grad():
                    for task in tqdm(plan.tasks, desc="merging", unit="tensor", disable=not progress,
                                     dynamic_ncols=True):
                        out = buffer[:_numel(task.shape)].view(task.shape)
                        merged = merge_task(task, fetch, seed=seed, device=device, out=out)
                        check_finite_tensor(task, merged)
                        writer.add(task.name, merged.cpu())
                        del merged, out
                        for reader in readers.values():
                            reader.release()  # the inputs' pages leave this process (they stay in the page cache)
                writer.finish()
            finally:
                writer.close()
            write_side_files(plan, staging, seed=seed, recipe_source=recipe_source, notes=notes)
            bytes_written = writer.total_bytes
    finally:
        reads = sum(reader.reads for reader in readers.values())
        for reader in readers.values():
            reader.close()
    return MergeResult(out_dir=out_dir, tensors=len(plan.tasks), shards=len(shards), bytes_written=bytes_written,
                       seconds=time.perf_counter() - started, reads=reads)


def _auto_map_entries(auto_map: dict) -> list[str]:
    """`module.Class` references of a config's auto_map (values may be strings or [slow, fast] tokenizer pairs)."""
    entries = []
    for value in auto_map.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str):
                entries.append(item)
    return entries


class NonFiniteOutputError(AutoMergeError, ValueError):
    """A merged tensor holds NaN or infinite values: the output is not written."""


def check_finite_tensor(task: TensorTask, merged) -> None:
    """Refuse NaN/inf in a merged tensor (a NaN source weight, an overflowing dtype). One reduction pass, no
    allocation: a non-finite element makes the sum non-finite; only then is the tensor searched element-wise."""
    import torch

    if bool(torch.isfinite(merged.sum(dtype=torch.float32))):
        return
    bad = int((~torch.isfinite(merged)).sum())
    if bad == 0:  # the sum overflowed, every element is finite
        return
    sources = ", ".join(sorted({i.model for i in task.reads()}))
    raise NonFiniteOutputError(
        f"merged tensor {task.name} has {bad} NaN or infinite value(s) (read from {sources}); nothing was written. "
        f"Check those models' weights for NaN/inf, or choose an output dtype wide enough for the merge")


def write_side_files(plan: MergePlan, folder: Path, *, seed: int, recipe_source: str | None,
                     notes: Sequence[tuple[str, Sequence[str]]] = ()) -> None:
    """config.json, tokenizer, generation config, the recipe, its mergekit export and the model card."""
    output_config = dict(plan.output_config)
    if output_config.get("auto_map"):  # custom-code models: the output needs the code files auto_map names
        template = plan.models[plan.template].path
        code_files = sorted({f"{str(entry).split('--')[-1].split('.')[0]}.py"
                             for entry in _auto_map_entries(output_config["auto_map"])})
        if all((template / name).is_file() for name in code_files):
            copy_files(template, folder, code_files)
        else:  # a config that points at missing code would not load anywhere: the plain architecture instead
            del output_config["auto_map"]
    write_json(folder / "config.json", output_config)
    copy_files(plan.models[plan.template].path, folder, SIDE_FILES)
    write_tokenizer(plan.vocabulary, {ref: model.path for ref, model in plan.models.items()}, folder)
    if plan.chat_template is not None:
        write_chat_template(folder, plan.chat_template)
    # The saved recipe must re-run as it is: a reference that only an alias (or a working directory) made resolvable
    # is written as the folder it resolved to.
    portable = _portable_names(plan)
    recipe_yaml = rename_models(plan.recipe, portable).to_yaml()
    (folder / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    try:
        mergekit_yaml = to_mergekit_yaml(plan.recipe, model_names={**portable, **_mergekit_names(plan)},
                                         out_dtype=plan.out_dtype,
                                         chat_template=plan.chat_template)
        (folder / MERGEKIT_FILE).write_text(mergekit_yaml, encoding="utf-8")
        mergekit_note = None
    except MergekitExportError as error:
        mergekit_yaml, mergekit_note = None, error.detail
    (folder / "README.md").write_text(
        model_card(plan, recipe_yaml, mergekit_yaml, mergekit_note, seed=seed, recipe_source=recipe_source,
                   notes=notes),
        encoding="utf-8")


def _portable_names(plan: MergePlan) -> dict[str, str]:
    """Model reference → its folder, for every reference that would not resolve to the same folder on its own (an
    alias of the search config, a path relative to another folder); zoo and cached hub references stay."""
    from auto_merge.models.resolve import ModelResolutionError, resolve_model_ref

    names = {}
    for ref, model in plan.models.items():
        if ref.startswith("zoo:"):
            continue
        folder = Path(model.path).resolve()
        try:
            same = Path(resolve_model_ref(ref, build_zoo=False)).resolve() == folder
        except (ModelResolutionError, OSError):
            same = False
        if not same:
            names[ref] = str(folder)
    return names


def _mergekit_names(plan: MergePlan) -> dict[str, str]:
    """mergekit cannot resolve `zoo:` references; point it at the folders they resolved to."""
    return {ref: str(model.path) for ref, model in plan.models.items() if ref.startswith("zoo:")}


def model_card(plan: MergePlan, recipe_yaml: str, mergekit_yaml: str | None, mergekit_note: str | None, *,
               seed: int, recipe_source: str | None, notes: Sequence[tuple[str, Sequence[str]]] = ()) -> str:
    models = list(plan.models)
    front = "---\nlibrary_name: transformers\ntags:\n- merge\n- auto-merge\n"
    front += "base_model:\n" + "".join(f"- {ref}\n" for ref in models) + "---\n\n"
    random = any(task.is_random for task in plan.tasks)
    seed_flag = f" --seed {seed}" if random or seed else ""
    lines = [
        "# Merged model",
        "",
        f"Made with auto-merge from {', '.join(f'`{m}`' for m in models)}: "
        f"{plan.num_layers} layers, {plan.out_dtype}.",
        "",
        "## Reproduce",
        "",
        "```bash",
        f"auto-merge merge {RECIPE_FILE} OUT_DIR{seed_flag}",
        "```",
        "",
        f"(`{RECIPE_FILE}` is in this folder{'; the original recipe was ' + Path(recipe_source).name if recipe_source else ''}.)",
        "",
        "## Plan",
        "",
        "```",
        plan.summary(),
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
        "## mergekit",
        "",
    ]
    if mergekit_yaml is not None:
        lines += [f"The same merge as a mergekit config (`{MERGEKIT_FILE}`; fp32 maths, so outputs agree up to "
                  "rounding; random methods draw different masks):", "", "```yaml", mergekit_yaml.rstrip(), "```"]
    else:
        lines += [f"This recipe cannot be expressed in mergekit: {mergekit_note}."]
    for heading, items in notes:
        lines += ["", f"## {heading}", ""] + ([f"- {item}" for item in items] or ["None."])
    return front + "\n".join(lines) + "\n"


def prepare_plan(
    recipe: Recipe | str | Path,
    *,
    catalog: ModelCatalog | None = None,
    allow_pickle: bool = False,
    zoo_seed: int = 0,
    pickle_opt_in: str | None = None,
    source: str | None = None,
) -> MergePlan:
    """Load (if a path), validate and compile a recipe; relative model folders resolve against the recipe's folder.
    ``source`` names where a Recipe object came from, for error messages (a path names itself)."""
    search_dirs: list[Path] = []
    if not isinstance(recipe, Recipe):
        source = str(recipe)
        search_dirs.append(Path(recipe).resolve().parent)
        recipe = load_recipe(recipe)
    if catalog is None:
        catalog = ModelCatalog(search_dirs=search_dirs, allow_pickle=allow_pickle, zoo_seed=zoo_seed,
                               pickle_opt_in=pickle_opt_in)
    return compile_plan(recipe, catalog, source=source)


def run_recipe(
    recipe: Recipe | str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = False,
    allow_pickle: bool = False,
    catalog: ModelCatalog | None = None,
    source: str | None = None,
    notes: Sequence[tuple[str, Sequence[str]]] = (),
) -> MergeResult:
    """Recipe file (or Recipe) → merged checkpoint in ``out_dir``: what `auto-merge merge` runs. ``source`` names
    the file a Recipe object came from (errors and the model card); ``notes`` are (heading, lines) sections added to
    the model card."""
    plan = prepare_plan(recipe, catalog=catalog, allow_pickle=allow_pickle, source=source)  # headers only
    # Before any weight is read: never a source's folder (merge_to_disk checks again, just before writing).
    check_replaceable(out_dir, overwrite=overwrite, protected=[model.path for model in plan.models.values()])
    source = source if isinstance(recipe, Recipe) else str(recipe)
    return merge_to_disk(plan, out_dir, seed=seed, device=device, out_shard_size=out_shard_size,
                         overwrite=overwrite, progress=progress, recipe_source=source, notes=notes)



# ------------------------------------------------------------------------------------------ multi-stage recipes
STAGES_SUFFIX = ".stages"


def stage_folders(stages: Sequence[RecipeStage], out_dir: str | Path) -> dict[str | None, Path]:
    """Where each stage of a mergekit-multi file is written: the final merge to ``OUT_DIR``, every other stage to
    ``OUT_DIR.stages/NAME`` beside it (kept, so they can be inspected or reused, and never inside the final model's
    folder). Absolute paths: later stages name them as models."""
    out_dir = Path(out_dir).absolute()
    root = out_dir.parent / f"{out_dir.name}{STAGES_SUFFIX}"
    return {stage.name: out_dir if stage.final else root / stage.name for stage in stages}


@dataclass(frozen=True)
class StageOutcome:
    """One stage of a multi-stage run: where it went and what was written (None for a dry run)."""

    stage: RecipeStage
    out_dir: Path
    result: MergeResult | None
    plan_text: str = ""


def run_stages(
    path: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = False,
    allow_pickle: bool = False,
    pickle_opt_in: str | None = None,
    dry_run: bool = False,
    on_stage: Callable[[StageOutcome], None] | None = None,
    dry_run_memory: tuple[str, Capacity, Capacity] | None = None,
) -> list[StageOutcome]:
    """Run a mergekit-multi file: every stage in order (:func:`auto_merge.merge.recipe.load_stages`), each written
    atomically to its folder (:func:`stage_folders`); a stage's name used as a model means its output folder.

    Before any weight is read: every document is validated, every model that is not a stage is resolved and every
    stage that merges no other stage's output is planned; no output folder may exist (unless ``overwrite`` and
    auto-merge wrote it) or hold a source. A stage that merges another's output is planned once that is written.
    ``dry_run``: plan what can be planned and write nothing; ``dry_run_memory``: the (device, GPU, host) its memory
    plans are made for (:func:`describe_plan`; default: the CPU, this host). ``on_stage`` is called after each
    stage."""
    source = str(path)
    plan_device, plan_gpu, plan_host = dry_run_memory or ("cpu", None, None)
    stages = load_stages(path)
    folders = stage_folders(stages, out_dir)
    catalog = ModelCatalog(search_dirs=[Path(path).resolve().parent], allow_pickle=allow_pickle,
                           pickle_opt_in=pickle_opt_in)

    def stage_source(stage: RecipeStage) -> str:
        return f"{source} (document {stage.document + 1}, {stage.label})"

    plans: dict[int, MergePlan] = {}
    real_sources: set[Path] = set()
    for stage in stages:
        if not stage.uses:
            plans[stage.document] = compile_plan(stage.recipe, catalog, source=stage_source(stage))
            real_sources |= {model.path for model in plans[stage.document].models.values()}
        else:  # resolve its other models now, so that a missing one stops the run before any merge
            for ref in stage.recipe.model_refs():
                if ref not in stage.uses:
                    try:
                        real_sources.add(catalog.resolve(ref))
                    except (ValueError, OSError) as error:
                        raise RecipeError(str(error), source=stage_source(stage)) from None
    if not dry_run:
        for stage in stages:
            check_replaceable(folders[stage.name], overwrite=overwrite, protected=sorted(real_sources),
                              what=f"output folder of {stage.label}")
    outcomes = []
    for stage in stages:
        plan = plans.get(stage.document)
        if plan is None and dry_run:
            used = ", ".join(repr(name) for name in stage.uses)
            text = f"merges the output(s) of {used}: planned when they are written"
            outcomes.append(StageOutcome(stage, folders[stage.name], None, text))
        else:
            if plan is None:
                recipe = rename_models(stage.recipe, {name: str(folders[name]) for name in stage.uses})
                plan = compile_plan(recipe, catalog, source=stage_source(stage))
            if dry_run:
                outcomes.append(StageOutcome(stage, folders[stage.name], None, describe_plan(
                    plan, out_shard_size, device=plan_device, gpu=plan_gpu, host=plan_host)))
            else:
                note = (f"{stage.label} (document {stage.document + 1}) of the multi-stage recipe {Path(source).name}: "
                        f"`auto-merge merge {Path(source).name} OUT_DIR` makes every stage, the final merge in OUT_DIR "
                        f"and the others in OUT_DIR{STAGES_SUFFIX}/NAME")
                used = [f"`{name}`: {folders[name]}" for name in stage.uses]
                notes = [("Stages", [note] + [f"merges the output of stage {item}" for item in used])]
                folders[stage.name].parent.mkdir(parents=True, exist_ok=True)
                result = merge_to_disk(plan, folders[stage.name], seed=seed, device=device,
                                       out_shard_size=out_shard_size, overwrite=overwrite, progress=progress,
                                       recipe_source=source, notes=notes)
                outcomes.append(StageOutcome(stage, folders[stage.name], result))
        if on_stage is not None:
            on_stage(outcomes[-1])
    return outcomes
