"""The memory plan of `auto-merge merge` (the streaming engine): per output tensor, its inputs as read and their fp32
working copies, and the peak per device; the live search's plan is :mod:`auto_merge.merge.memory_plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from auto_merge.merge.io import DTYPE_BYTES
from auto_merge.merge.memory_plan import (
    FP32_BYTES,
    MEMORY_SHARE,
    METHOD_WORKING_COPIES,
    Capacity,
    Placement,
    budget_fits,
    format_bytes,
    peak_line,
    placement_table,
    short_dtype,
)

@dataclass(frozen=True)
class MergeMemoryPlan:
    """The streaming engine's memory (``auto-merge merge``): per device, for the worst output tensor."""

    device: str
    largest_task: str
    rows: tuple[Placement, ...]
    gpu_peak: int
    host_peak: int
    gpu: Capacity
    host: Capacity
    fits: bool | None
    advice: str

    def describe(self) -> str:
        on = "GPU" if self.device.startswith("cuda") else "CPU"
        head = (f"memory plan: streaming merge on the {on}; "
                f"{self.gpu.describe('GPU') + ', ' if on == 'GPU' else ''}{self.host.describe('host')}, "
                f"{MEMORY_SHARE:.0%} of each usable")
        lines = [head] + placement_table(self.rows)
        parts = ([peak_line("GPU", self.gpu_peak, self.gpu)] if on == "GPU" else []) + [
            peak_line("host", self.host_peak, self.host)]
        verdict = {True: "fits", False: "does NOT fit", None: "GPU size unknown: pass --gpu-memory SIZE to check"}
        lines.append(f"  peak: {'; '.join(parts)} (plus the Python/torch runtime): {verdict[self.fits]}")
        if self.advice:
            lines.append(f"  to make it fit: {self.advice}")
        return "\n".join(lines)


def task_memory(plan, task) -> dict[str, int]:
    """What merging one planned task holds: its inputs as read (views of the mapped files), their fp32 copies
    (16-bit or row-mapped inputs), the method's working copies, the fp32 result and its cast into the output dtype.
    ``plan`` is a :class:`~auto_merge.merge.plan.MergePlan`, ``task`` one of its tasks."""
    as_read = copies = method_inputs = 0
    for tensor_input in task.reads():
        info = plan.input_info(tensor_input)
        as_read += info.nbytes()
        if info.dtype != "float32":
            copies += info.numel * FP32_BYTES
        numel = info.numel
        if tensor_input.row_map is not None:
            numel = info.numel // max(1, info.shape[0]) * tensor_input.row_map.rows
            copies += numel * FP32_BYTES
        method_inputs += numel * FP32_BYTES
    output = plan.output_bytes(task)
    result = output // DTYPE_BYTES[plan.out_dtype] * FP32_BYTES
    return {"as_read": as_read, "copies": copies, "fp32_inputs": method_inputs,
            "method": METHOD_WORKING_COPIES * method_inputs, "result": result,
            "cast": output if plan.out_dtype != "float32" else 0, "output": output}


def _model_bytes(model) -> int:
    return sum(math.prod(info.shape) * DTYPE_BYTES.get(info.dtype, 4) for info in model.tensors.values())


def plan_merge_memory(plan, *, device: str = "cpu", gpu: Capacity | None = None,
                      host: Capacity | None = None) -> MergeMemoryPlan:
    """The streaming engine's peaks (:func:`auto_merge.merge.engine.merge_to_disk`) for a MergePlan: sources are
    memory-mapped and read per output tensor (their pages released after it), results go through one output buffer
    of the largest tensor on ``device``. On the CPU everything counts against the host; with ``cuda`` the inputs
    are copied to the GPU in fp32 and each result comes back to the host in the output dtype."""
    gpu = gpu or Capacity(None, "none")
    host = host or Capacity(None, "none")
    on_gpu = device.startswith("cuda")
    worst_name, worst_device, worst_read, worst_back = "", 0, 0, 0
    for task in plan.tasks:
        parts = task_memory(plan, task)
        if on_gpu:  # every input is copied to the GPU in fp32
            work = parts["fp32_inputs"] + parts["method"] + parts["result"]
        else:
            work = parts["copies"] + parts["method"] + parts["result"]
        total = parts["as_read"] + work
        if total > worst_device + worst_read or not worst_name:
            worst_name, worst_device, worst_read = task.name, work, parts["as_read"]
            worst_back = parts["output"]
    buffer = max((plan.output_bytes(task) for task in plan.tasks), default=0)
    side = "gpu" if on_gpu else "host"
    where = "GPU" if on_gpu else "CPU"
    sources = sorted({tensor_input.model for task in plan.tasks for tensor_input in task.reads()})
    rows = [Placement("source", ref, f"memory-mapped file ({format_bytes(_model_bytes(plan.models[ref]))} on disk), "
                      "read per tensor", 0, "host") for ref in sources]
    rows += [Placement("inputs", "", f"CPU, one output tensor's inputs as read ({worst_name}), pages released after "
                       "it", worst_read, "host"),
             Placement("output buffer", "", f"{where} {short_dtype(plan.out_dtype)}, the largest output tensor, "
                       "reused", buffer, side),
             Placement("working memory", "", f"{where} fp32, the merge of {worst_name}", worst_device, side)]
    if on_gpu:
        rows.append(Placement("result copy", "", f"CPU {short_dtype(plan.out_dtype)}, each result on its way to "
                              "its shard", worst_back, "host"))
    gpu_peak = sum(row.nbytes for row in rows if row.device == "gpu")
    host_peak = sum(row.nbytes for row in rows if row.device == "host")
    cost = {"gpu": gpu_peak, "host": host_peak}
    fits = budget_fits(cost, gpu, host) if on_gpu else (host.usable is None or host_peak <= host.usable)
    advice = ""
    if fits is False:
        fixes = []
        if on_gpu and gpu.usable is not None and gpu_peak > gpu.usable:
            fixes.append(f"merge on the CPU (drop --cuda) or use a GPU of at least "
                         f"{format_bytes(math.ceil(gpu_peak / MEMORY_SHARE))}")
        if host.usable is not None and host_peak > host.usable:
            fixes.append(f"give the host at least {format_bytes(math.ceil(host_peak / MEMORY_SHARE))} of memory")
        advice = "; ".join(fixes) + "."
    return MergeMemoryPlan(device, worst_name, tuple(rows), gpu_peak, host_peak, gpu, host, fits, advice)
