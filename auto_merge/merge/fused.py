"""Fused evaluation of merges that are fixed linear combinations of their inputs (linear, task arithmetic,
passthrough): how both the streaming engine and the in-memory path compute them, on every device.

Such a tensor's coefficients are known before any tensor is read (:class:`LinearForm`):

- linear: ``out = sum_i c_i x_i``, ``c_i = w_i / D`` with ``D = sum_i w_i`` when normalize, else 1;
- passthrough: ``out = scale * x``;
- task arithmetic, kept *relative to the base* so that the small task vectors are what gets rounded:
  ``out = base + sum_i c_i (x_i - base)`` with ``c_i = lambda w_i / D`` (``D`` as above, with the method's floor
  for a sum near 0);

everything times the task's ``output_scale``. The value equals the method's own evaluation up to fp32 rounding of the
result (the order of the operations differs; on the benchmark models no element differs by more than 8 ulp of the
result or the base, and most are bit-identical). The terms are summed in a fixed order, so the engine and the
in-memory path, which both go through :func:`combine_into`, give bit-identical results.

- CPU: the sum runs over cache-sized chunks, accumulated in fp32 straight in the target when it is fp32 (else in a
  chunk buffer, cast once into the target): every stored tensor is read once from memory and the result written
  once, with no temporary the size of the tensor.
- CUDA: one pass per up to 6 terms (a Triton kernel), accumulating in fp32 registers and writing in the target's
  dtype (in the expanded form ``sum_k c_k t_k``, with the base's coefficient ``1 - sum_i c_i``); without Triton,
  whole-tensor torch operations.

Stored tensors are given as ``(weight, delta)`` pairs (``delta`` None for a plain tensor): resident experts kept as
task vectors against the base are ``anchor + delta``, so an input's ``x_i - base`` is just its delta when its
anchor is the base, and equal stored tensors are read once, their coefficients added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from auto_merge.merge.methods import get_method, validate_params
from auto_merge.merge.methods.gta_variants import DIVISOR_FLOOR

# Up to this many distinct resident tensors per output tensor go through one kernel launch; more are chained.
MAX_KERNEL_TERMS = 6
LINEAR_METHODS = ("linear", "task_arithmetic", "passthrough")
# CPU chunk: 256K elements (1 MB in fp32) per operand: the accumulator and the operands' chunks stay in L2/L3, and
# the per-operation overhead (a few microseconds per torch call) is spread over enough elements (measured best
# between 128K and 512K on a 1 MB-L2 / 32 MB-L3 EPYC).
CPU_CHUNK_ELEMENTS = 1 << 18

Stored = tuple  # (weight tensor, delta tensor or None): the stored form of one input


@dataclass(frozen=True)
class LinearForm:
    """``out = base_coefficient * base + sum_i coefficients[i] * (x_i - base)`` when ``base_coefficient`` is set
    (task arithmetic), else ``out = sum_i coefficients[i] * x_i``."""

    coefficients: tuple[float, ...]
    base_coefficient: float | None = None

    def expanded(self) -> list[tuple[int | None, float]]:
        """``[(input index, or None for the base, coefficient)]`` of ``out = sum_k c_k t_k``."""
        terms = [(index, c) for index, c in enumerate(self.coefficients)]
        if self.base_coefficient is None:
            return terms
        return [(None, self.base_coefficient - sum(self.coefficients))] + terms


def linear_coefficients(method: str, global_params: Mapping | None, per_model_params: Sequence[Mapping | None],
                        *, has_base: bool, output_scale: float = 1.0) -> LinearForm | None:
    """The :class:`LinearForm` of ``method`` with these parameters, or None when it is not a fixed linear
    combination. Parameters are validated (and defaults filled) as the method would."""
    if method not in LINEAR_METHODS:
        return None
    spec = get_method(method)
    if (has_base and spec.base_model == "none") or (not has_base and spec.base_model == "required"):
        return None  # the method itself reports the error
    params = validate_params(method, global_params, list(per_model_params))
    scale = float(output_scale)
    if method == "passthrough":
        factor = params.per_model("scale")[0]
        return LinearForm((scale * (1.0 if factor is None else float(factor)),))
    weights = [float(w) for w in params.per_model("weight")]
    total = sum(weights)
    if method == "linear":
        divisor = total if params.global_params["normalize"] else 1.0
        return LinearForm(tuple(scale * w / divisor for w in weights))
    divisor = 1.0
    if params.global_params["normalize"]:
        divisor = total if abs(total) >= DIVISOR_FLOOR else 1.0
    lam = float(params.global_params["lambda"])
    return LinearForm(tuple(scale * (lam * w / divisor) for w in weights), base_coefficient=scale)


def linear_terms(task) -> LinearForm | None:
    """:func:`linear_coefficients` for a planned task (None when an input is row-mapped: a vocabulary alignment)."""
    if task.method not in LINEAR_METHODS or any(i.row_map is not None for i in task.reads()):
        return None
    return _planned_form(task.method, task.global_params, task.per_model_params, task.base is not None,
                         task.output_scale)


@lru_cache(maxsize=16384)
def _planned_form(method: str, global_params: tuple, per_model_params: tuple, has_base: bool,
                  output_scale: float) -> LinearForm | None:
    """Cached per parameter set: validating parameters costs ~0.1 ms, which a GPU candidate of a few hundred tensors
    would pay on every candidate (a planned task's parameters are validated already, so their types are exact)."""
    return linear_coefficients(method, dict(global_params), [dict(params) for params in per_model_params],
                               has_base=has_base, output_scale=output_scale)


@dataclass
class Combination:
    """What :func:`combine_into` sums: ``anchor_coefficient * anchor + sum_k c_k * (t_k - anchor if relative_k else
    t_k)`` over stored tensors, each listed once."""

    terms: list[tuple[torch.Tensor, float, bool]]
    anchor: torch.Tensor | None = None
    anchor_coefficient: float = 0.0

    def expanded(self) -> list[tuple[torch.Tensor, float]]:
        """The same value as ``sum_k c_k t_k`` (the relative terms' anchor parts folded into the anchor's)."""
        collected: dict[int, list] = {}
        anchor_coefficient = self.anchor_coefficient
        for tensor, coefficient, relative in self.terms:
            collected.setdefault(id(tensor), [tensor, 0.0])[1] += coefficient
            if relative:
                anchor_coefficient -= coefficient
        terms = list(collected.values())
        if self.anchor is not None:
            slot = collected.get(id(self.anchor))
            if slot is not None:
                slot[1] += anchor_coefficient
            else:
                terms.insert(0, [self.anchor, anchor_coefficient])
        return [(tensor, coefficient) for tensor, coefficient in terms if coefficient != 0.0]


def combination(form: LinearForm, base: Stored | None, inputs: Sequence[Stored]) -> Combination:
    """The stored tensors and coefficients of ``form`` over ``base`` and ``inputs`` (each ``(weight, delta)``)."""
    collected: dict[tuple[int, bool], list] = {}

    def add(tensor, coefficient: float, relative: bool) -> None:
        if tensor is not None:
            collected.setdefault((id(tensor), relative), [tensor, 0.0, relative])[1] += coefficient

    anchor = None
    relative_form = form.base_coefficient is not None and base is not None and base[1] is None
    if relative_form:
        anchor = base[0]
        for (weight, delta), coefficient in zip(inputs, form.coefficients):
            if weight is not anchor:  # x_i - base = (weight - base) + delta; the anchor's own part is 0
                add(weight, coefficient, True)
            add(delta, coefficient, False)
    else:
        for (index, coefficient) in form.expanded():
            weight, delta = base if index is None else inputs[index]
            add(weight, coefficient, False)
            add(delta, coefficient, False)
    terms = [(tensor, coefficient, relative) for tensor, coefficient, relative in collected.values()
             if coefficient != 0.0]
    return Combination(terms, anchor, form.base_coefficient if relative_form else 0.0)


def combine_into(target: torch.Tensor, terms: Combination | Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """``target = `` the combination (or ``sum_k c_k t_k`` for a list of pairs), accumulated in fp32 in a fixed
    order, written in ``target``'s dtype; returns ``target``.

    Every tensor must have ``target``'s number of elements and device. A term may be ``target`` itself (or overlap
    it): the sum then goes through a temporary.
    """
    if not isinstance(terms, Combination):
        terms = Combination([(tensor, float(coefficient), False) for tensor, coefficient in terms])
    operands = [tensor for tensor, _, _ in terms.terms] + ([terms.anchor] if terms.anchor is not None else [])
    for tensor in operands:
        if tensor.numel() != target.numel() or tensor.device != target.device:
            raise ValueError(f"cannot combine a {tuple(tensor.shape)} tensor on {tensor.device} into a "
                             f"{tuple(target.shape)} target on {target.device}")
    if any(_overlaps(tensor, target) for tensor in operands):
        staging = torch.empty(target.shape, dtype=torch.float32, device=target.device)
        combine_into(staging, terms)
        target.copy_(staging)
        return target
    if target.device.type == "cpu":
        _combine_chunked(target, terms)
        return target
    expanded = terms.expanded()
    if not expanded:
        target.zero_()
        return target
    if target.is_cuda and _triton_available() and all(t.is_cuda and t.is_contiguous() for t, _ in expanded) \
            and target.is_contiguous():
        _combine_triton(target, expanded)
        return target
    accumulator = expanded[0][0].reshape(-1).to(torch.float32) * expanded[0][1]
    for tensor, coefficient in expanded[1:]:
        accumulator.add_(tensor.reshape(-1).to(torch.float32), alpha=coefficient)
    target.copy_(accumulator.view(target.shape))
    return target


def _combine_chunked(target: torch.Tensor, terms: Combination) -> None:
    """The CPU sum, chunk by chunk: ``acc = c_0 u_0; acc += c_k u_k; acc += a * anchor`` in fp32 (``u_k`` = ``t_k``
    or ``t_k - anchor``; other dtypes are upcast first, as the methods do), then one cast into the target."""
    numel = target.numel()
    if numel == 0:
        return
    if not target.is_contiguous():  # rare: sum into a contiguous fp32 buffer, then one strided copy
        staging = torch.empty(numel, dtype=torch.float32)
        _combine_chunked(staging, terms)
        target.copy_(staging.view(target.shape))
        return
    flat_target = target.view(-1)
    direct = target.dtype == torch.float32
    step = min(numel, CPU_CHUNK_ELEMENTS)
    scratch = lambda: torch.empty(step, dtype=torch.float32)  # noqa: E731
    accumulator = None if direct else scratch()
    flats = [(tensor.reshape(-1), float(coefficient), relative) for tensor, coefficient, relative in terms.terms]
    anchor = terms.anchor.reshape(-1) if terms.anchor is not None else None
    anchor_coefficient = float(terms.anchor_coefficient)
    converted = scratch() if any(flat.dtype != torch.float32 for flat, _, _ in flats) else None
    anchor_converted = scratch() if anchor is not None and anchor.dtype != torch.float32 else None
    difference = scratch() if any(relative for _, _, relative in flats) else None
    if not flats and (anchor is None or anchor_coefficient == 0.0):
        target.zero_()
        return
    for start in range(0, numel, step):
        end = min(start + step, numel)
        size = end - start
        acc = flat_target[start:end] if direct else accumulator[:size]
        anchor_chunk = None
        if anchor is not None:
            anchor_chunk = anchor[start:end]
            if anchor_converted is not None:
                anchor_chunk = anchor_converted[:size].copy_(anchor_chunk)
        first = True
        for flat, coefficient, relative in flats:
            chunk = flat[start:end]
            if converted is not None and chunk.dtype != torch.float32:
                chunk = converted[:size].copy_(chunk)
            if relative:
                chunk = torch.sub(chunk, anchor_chunk, out=difference[:size])
            if first:
                torch.mul(chunk, coefficient, out=acc)
                first = False
            else:
                acc.add_(chunk, alpha=coefficient)
        if anchor_chunk is not None and anchor_coefficient != 0.0:
            if first:
                torch.mul(anchor_chunk, anchor_coefficient, out=acc)
            else:
                acc.add_(anchor_chunk, alpha=anchor_coefficient)
        if not direct:
            flat_target[start:end].copy_(acc)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' storages share memory (conservative: whole storages are compared)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes()


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
