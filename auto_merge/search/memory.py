"""What `auto-merge search --dry-run` prints about memory, from the config and the models' headers alone."""

from __future__ import annotations


def search_memory_plan(config, gpu_memory: int | None, host_memory: int | None) -> str:
    """What `search --dry-run` prints about memory: the plan the trials' LiveMerger will follow (its defaults, the
    base loaded in evaluation.torch_dtype on evaluation.device, every model of the config), or for the one-shot
    strategies the streaming engine's plan. ``gpu_memory``: plan for a GPU of that size instead."""
    from auto_merge.merge.memory_plan import (
        DTYPE_BYTES,
        Capacity,
        LiveModel,
        MemoryPlanError,
        ModelShapes,
        gpu_capacity,
        host_capacity,
        plan_live_memory,
    )

    evaluation = config.global_params.evaluation
    device = "cuda" if gpu_memory is not None else evaluation.device or "auto"
    if device == "auto" or device.startswith("cuda"):
        from auto_merge.evaluation.lm_eval_runner import resolve_device

        device = resolve_device(device)
    if gpu_memory is not None:
        gpu = Capacity(gpu_memory, "given")
    elif device.startswith("cuda"):
        gpu = gpu_capacity(device)
    else:
        gpu = Capacity(None, "none")
    host = host_capacity(host_memory)
    from auto_merge.strategies import get_strategy

    if get_strategy(config.strategy).one_shot:  # one merge through the streaming engine
        from auto_merge.merge.merge_memory import plan_merge_memory
        from auto_merge.search.oneshot import plan_oneshot

        _, plan = plan_oneshot(config)
        engine_device = "cuda" if device.startswith("cuda") else "cpu"
        return plan_merge_memory(plan, device=engine_device, gpu=gpu, host=host).describe()
    block = config.selected
    paths = config.model_paths
    refs = list(dict.fromkeys([block.base_model, *paths]))
    try:
        models = [ModelShapes.from_folder(ref, paths[ref]) for ref in refs]
    except MemoryPlanError as error:
        return f"memory plan: not available ({error})"
    live_dtype = evaluation.torch_dtype if evaluation.torch_dtype != "auto" else "float32"  # as the trials load it
    live = LiveModel(models[0].numel * DTYPE_BYTES[live_dtype], live_dtype, device)
    notes = []
    if evaluation.vllm:
        # vLLM holds a copy of the live model, in the same dtype
        gpu, note = _vllm_share(gpu, live.nbytes, evaluation.gpu_memory_utilization)
        notes.append(note)
    workers = getattr(block, "n_workers", 1)
    if getattr(block, "dask_scheduler", None):
        notes.append("each dask worker holds this plan (its own live model and sources) on its machine")
    elif workers > 1 and getattr(block, "optimizer", None) != "cmaes":
        notes.append(f"n_workers {workers}: each local worker process holds its own copy of this plan")
    if getattr(block, "layers", 0) > getattr(block, "num_hidden_layers", float("inf")):  # DIS may stack deeper
        notes.append("a candidate deeper than the base adds copies of decoder layers to the live model")
    if gpu.source == "detected":
        notes.append("at run time the merger plans again with the GPU's free memory once the live model is on it")
    return plan_live_memory(models, anchor=block.base_model, live=live, device=device, gpu=gpu, host=host,
                            notes=notes).describe()


def _vllm_share(gpu, model_bytes: int, utilization: float):
    """The GPU left to the merge once the vLLM engine has taken its share, and a note saying what that share holds."""
    from auto_merge.merge.memory_plan import Capacity, format_bytes

    if gpu.nbytes is None:
        return gpu, (f"vLLM takes {utilization:.0%} of the GPU (evaluation.gpu_memory_utilization) for its copy of the "
                     f"model ({format_bytes(model_bytes)}) and its KV cache, besides this plan")
    share = int(gpu.nbytes * utilization)
    note = (f"vLLM takes {utilization:.0%} of the GPU ({format_bytes(share)}, evaluation.gpu_memory_utilization) for "
            f"its copy of the model ({format_bytes(model_bytes)}) and its KV cache; this plan uses the other "
            f"{format_bytes(gpu.nbytes - share)}")
    if share < model_bytes:
        note += (f". That share cannot hold the model: raise gpu_memory_utilization above "
                 f"{model_bytes / gpu.nbytes:.2f}, or use a bigger GPU")
    return Capacity(gpu.nbytes - share, gpu.source), note
