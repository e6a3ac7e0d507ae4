"""Fused evaluation of merges that are fixed linear combinations of their inputs (linear, task arithmetic,
passthrough), for the in-memory path on a GPU.

Such a tensor is ``out = sum_k c_k * x_k`` with coefficients known before any tensor is read:

- linear: ``c_i = w_i / D`` with ``D = sum_i w_i`` when normalize, else 1;
- task arithmetic: ``base + lambda * sum_i w_i (x_i - base) / D`` = ``(1 - lambda sum_i w_i / D) * base +
  sum_i (lambda w_i / D) * x_i`` (``D`` as above, with the method's floor for a sum near 0);
- passthrough: ``c = scale``;

each times the task's ``output_scale``. A GPU computes it in one pass: every resident term read once, accumulated in
fp32 in registers, the result written once in the live model's dtype (a Triton kernel; memory traffic at the copy
roofline). Resident experts kept as task vectors against the base expand to ``anchor + delta``, so their anchor
coefficients add up and the anchor is read once. The value equals the method's up to fp32 rounding (the order of
the sums differs); the CPU keeps the methods' own evaluation, bit-identical to the streaming engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from auto_merge.merge.methods.task_arithmetic import DIVISOR_FLOOR

# Up to this many distinct resident tensors per output tensor go through one kernel launch; more are chained.
MAX_KERNEL_TERMS = 6
LINEAR_METHODS = ("linear", "task_arithmetic", "passthrough")


def linear_terms(task) -> list[tuple[int | None, float]] | None:
    """``[(input index, or None for the base, coefficient)]`` when the task is a fixed linear combination of its
    inputs, else None."""
    if task.method not in LINEAR_METHODS or any(i.row_map is not None for i in task.reads()):
        return None
    params = task.global_dict()
    per_model = task.per_model_dicts()
    scale = task.output_scale
    if task.method == "passthrough":
        factor = per_model[0].get("scale")
        return [(0, scale * (1.0 if factor is None else float(factor)))]
    weights = [float(p["weight"]) for p in per_model]
    total = sum(weights)
    if task.method == "linear":
        divisor = total if params.get("normalize", True) else 1.0
        return [(i, scale * w / divisor) for i, w in enumerate(weights)]
    if task.base is None:
        return None
    divisor = 1.0
    if params.get("normalize", False):
        divisor = total if abs(total) >= DIVISOR_FLOOR else 1.0
    lam = float(params.get("lambda", 1.0))
    terms = [(None, scale * (1.0 - lam * total / divisor))]
    return terms + [(i, scale * lam * w / divisor) for i, w in enumerate(weights)]


def resident_terms(task, terms: Sequence[tuple[int | None, float]],
                   expand: Callable) -> list[tuple[torch.Tensor, float]]:
    """The terms over resident tensors: ``expand(tensor_input)`` gives ``[(stored tensor, factor)]`` for one input
    (``[(anchor, 1), (delta, 1)]`` for a task vector); equal stored tensors are read once, their coefficients
    summed, and zero coefficients dropped."""
    collected: dict[int, list] = {}
    for index, coefficient in terms:
        tensor_input = task.base if index is None else task.inputs[index]
        for stored, factor in expand(tensor_input):
            slot = collected.setdefault(id(stored), [stored, 0.0])
            slot[1] += coefficient * factor
    return [(stored, coefficient) for stored, coefficient in collected.values() if coefficient != 0.0]


def combine_into(target: torch.Tensor, terms: Sequence[tuple[torch.Tensor, float]]) -> None:
    """``target = sum_k c_k * t_k``, accumulated in fp32, written in ``target``'s dtype."""
    if not terms:
        target.zero_()
        return
    if target.is_cuda and _triton_available() and all(t.is_cuda and t.is_contiguous() for t, _ in terms) \
            and target.is_contiguous():
        _combine_triton(target, list(terms))
        return
    accumulator = terms[0][0].to(torch.float32) * terms[0][1]
    for tensor, coefficient in terms[1:]:
        accumulator.add_(tensor.to(torch.float32), alpha=coefficient)
    target.copy_(accumulator)


_TRITON: dict[str, object] = {}


def _triton_available() -> bool:
    if "kernel" not in _TRITON:
        try:
            _TRITON["kernel"] = _build_kernel()
        except ImportError:
            _TRITON["kernel"] = None
    return _TRITON["kernel"] is not None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def combine_kernel(out_ptr, t0, t1, t2, t3, t4, t5, c0, c1, c2, c3, c4, c5, n_elements,
                       TERMS: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        acc = tl.load(t0 + offsets, mask=mask).to(tl.float32) * c0
        if TERMS > 1:
            acc += tl.load(t1 + offsets, mask=mask).to(tl.float32) * c1
        if TERMS > 2:
            acc += tl.load(t2 + offsets, mask=mask).to(tl.float32) * c2
        if TERMS > 3:
            acc += tl.load(t3 + offsets, mask=mask).to(tl.float32) * c3
        if TERMS > 4:
            acc += tl.load(t4 + offsets, mask=mask).to(tl.float32) * c4
        if TERMS > 5:
            acc += tl.load(t5 + offsets, mask=mask).to(tl.float32) * c5
        if ACCUMULATE:  # a chained launch adds to what the previous one wrote (fp32 targets only)
            acc += tl.load(out_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return combine_kernel


def _combine_triton(target: torch.Tensor, terms: list[tuple[torch.Tensor, float]]) -> None:
    kernel = _TRITON["kernel"]
    n = target.numel()
    block = 4096
    grid = ((n + block - 1) // block,)
    flat_target = target.view(-1)
    if len(terms) > MAX_KERNEL_TERMS and target.dtype != torch.float32:
        # Rare (more than 5 experts): sum in an fp32 buffer, then one cast.
        buffer = torch.empty(n, dtype=torch.float32, device=target.device)
        _combine_triton(buffer, terms)
        flat_target.copy_(buffer)
        return
    for start in range(0, len(terms), MAX_KERNEL_TERMS):
        chunk = terms[start:start + MAX_KERNEL_TERMS]
        tensors = [t.view(-1) for t, _ in chunk]
        coefficients = [float(c) for _, c in chunk]
        while len(tensors) < MAX_KERNEL_TERMS:  # unused slots: never read (TERMS is a compile-time constant)
            tensors.append(tensors[0])
            coefficients.append(0.0)
        kernel[grid](flat_target, *tensors, *coefficients, n, TERMS=len(chunk), ACCUMULATE=start > 0, BLOCK=block)
