"""Triton kernels of :mod:`auto_merge.merge.fused_gta` (imported only where Triton is installed and CUDA is used).

Arithmetic follows the CPU pipeline's IEEE operations step by step: divisions are ``div_rn`` (Triton's ``/`` is an
approximate division on NVIDIA GPUs) and the launches turn floating-point contraction off (no FMA), so the same inputs
round as they do on the CPU.

Kernel arguments avoid the names of Triton's generated argument binder (``params``, ``options``, ``specialization``):
Triton 3.6's binder shadows an argument called ``params`` with its own dict of all arguments."""

import triton
import triton.language as tl


@triton.jit
def task_vector(base_ptr, pointers, model0_ptr, model, offsets, mask, RELATIVE: tl.constexpr):
    pointer = tl.load(pointers + model).to(tl.pointer_type(model0_ptr.dtype.element_ty))
    value = tl.load(pointer + offsets, mask=mask, other=0.0).to(tl.float32)
    if not RELATIVE:
        value = value - tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return value


@triton.jit
def keep_mask(magnitude, table, seeds, rho, n, model, offsets, mask, COLUMNS: tl.constexpr, RANDOM: tl.constexpr,
              RANKED: tl.constexpr):
    """Which entries of one model's block are kept, and their keep probability (column 2, or DELLA's per entry)."""
    row = table + model * COLUMNS
    keep = (magnitude >= tl.load(row + 0)) & (magnitude <= tl.load(row + 1))
    probability = tl.load(row + 2) + tl.zeros_like(magnitude)
    if RANKED:  # DELLA, for models that drop (column 6 set): p = rho * span + floor, rho the entry's relative rank
        relative_rank = tl.load(rho + tl.cast(model, tl.int64) * n + offsets, mask=mask, other=0.0)
        probability = tl.where(tl.load(row + 6) != 0, relative_rank * tl.load(row + 7) + tl.load(row + 8),
                               probability)
    if RANDOM:
        uniform = tl.rand(tl.load(seeds + model), offsets.to(tl.int32))
        keep = keep & (uniform < probability)
    return keep, probability


@triton.jit
def bracket_kernel(base_ptr, pointers, model0_ptr, n, query_models, lows, highs, counts, candidates, capacity,
                   queries, RELATIVE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """Per query, counts of the magnitudes below ``low``, equal to ``low``, strictly inside and equal to ``high``
    (rows 0-3 of ``counts``), and the strictly inside ones gathered into the query's row of ``candidates``. Ties on
    the bracket's ends are counted, not gathered: bf16 task vectors hold long runs of equal magnitudes.

    A program covers ``TILES`` blocks and adds to each counter once: atomics on one address serialise, and one per
    block per counter made this kernel ten times slower than its memory traffic on an H200. The gathering pass reads
    the program's tiles a second time (from the cache)."""
    first = tl.program_id(0).to(tl.int64) * (BLOCK * TILES)
    lanes = tl.arange(0, BLOCK)
    for query in range(queries):
        model = tl.load(query_models + query)
        low = tl.load(lows + query)
        high = tl.load(highs + query)
        below = tl.zeros([BLOCK], dtype=tl.int32)
        at_low = tl.zeros([BLOCK], dtype=tl.int32)
        at_high = tl.zeros([BLOCK], dtype=tl.int32)
        inside = tl.zeros([BLOCK], dtype=tl.int32)
        for tile in range(TILES):
            offsets = first + tile * BLOCK + lanes
            mask = offsets < n
            magnitude = tl.abs(task_vector(base_ptr, pointers, model0_ptr, model, offsets, mask, RELATIVE))
            below += ((magnitude < low) & mask).to(tl.int32)
            at_low += ((magnitude == low) & mask).to(tl.int32)
            at_high += ((magnitude == high) & (magnitude != low) & mask).to(tl.int32)
            inside += ((magnitude > low) & (magnitude < high) & mask).to(tl.int32)
        tl.atomic_add(counts + query, tl.sum(below, axis=0))
        tl.atomic_add(counts + queries + query, tl.sum(at_low, axis=0))
        tl.atomic_add(counts + 3 * queries + query, tl.sum(at_high, axis=0))
        start = tl.atomic_add(counts + 2 * queries + query, tl.sum(inside, axis=0))
        row = candidates + tl.cast(query, tl.int64) * capacity
        for tile in range(TILES):
            offsets = first + tile * BLOCK + lanes
            mask = offsets < n
            magnitude = tl.abs(task_vector(base_ptr, pointers, model0_ptr, model, offsets, mask, RELATIVE))
            selected = ((magnitude > low) & (magnitude < high) & mask).to(tl.int32)
            # The gathered order varies between runs (atomics); only the sorted values are used.
            slot = start + tl.cumsum(selected, axis=0) - 1
            tl.store(row + slot, magnitude, mask=(selected != 0) & (slot < capacity))
            start += tl.sum(selected, axis=0)


@triton.jit
def norms_kernel(base_ptr, pointers, model0_ptr, n, table, seeds, rho, partial, blocks, models,
                 COLUMNS: tl.constexpr, RELATIVE: tl.constexpr, RANDOM: tl.constexpr, RANKED: tl.constexpr,
                 BLOCK: tl.constexpr):
    block = tl.program_id(0)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    for model in range(models):
        magnitude = tl.abs(task_vector(base_ptr, pointers, model0_ptr, model, offsets, mask, RELATIVE))
        keep, _ = keep_mask(magnitude, table, seeds, rho, n, model, offsets, mask, COLUMNS, RANDOM, RANKED)
        keep = keep & mask
        row = partial + tl.cast(model, tl.int64) * 2 * blocks
        tl.store(row + block, tl.sum(tl.where(mask, magnitude, 0.0), axis=0))
        tl.store(row + blocks + block, tl.sum(tl.where(keep, magnitude, 0.0), axis=0))


@triton.jit
def weighted(base_ptr, pointers, model0_ptr, table, seeds, rho, n, model, offsets, mask, COLUMNS: tl.constexpr,
             RELATIVE: tl.constexpr, RANDOM: tl.constexpr, RANKED: tl.constexpr, DIVIDE_BY_P: tl.constexpr):
    # (delta * keep * factor) / divide * weight, in the CPU pipeline's order (exact where factor or divide is 1).
    value = task_vector(base_ptr, pointers, model0_ptr, model, offsets, mask, RELATIVE)
    keep, probability = keep_mask(tl.abs(value), table, seeds, rho, n, model, offsets, mask, COLUMNS, RANDOM, RANKED)
    row = table + model * COLUMNS
    value = tl.where(keep, value, 0.0) * tl.load(row + 3)
    divide = tl.load(row + 4) + tl.zeros_like(value)
    if DIVIDE_BY_P:  # DELLA with inverse_p: each kept entry of a dropping model divided by its own probability
        divide = tl.where(tl.load(row + 6) != 0, tl.maximum(probability, 1.1754943508222875e-38), divide)
    value = tl.math.div_rn(value, divide)
    return value * tl.load(row + 5)


@triton.jit
def mix_kernel(base_ptr, pointers, model0_ptr, out_ptr, n, table, seeds, rho, models, scale, output_scale, divisor,
               divisor_floor, COLUMNS: tl.constexpr, RELATIVE: tl.constexpr, RANDOM: tl.constexpr,
               RANKED: tl.constexpr, DIVIDE_BY_P: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
               BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    total = tl.zeros([BLOCK], dtype=tl.float32)
    if CONSENSUS:
        # One pass: each model's weighted task vector is computed once (its loads, Philox draws and divisions), and
        # the sums for either elected sign are kept; the sign then picks one. The adds run in model order as on the
        # CPU (the other sign's terms add exact zeros), so the result is the same as a second pass's.
        positive = tl.zeros([BLOCK], dtype=tl.float32)
        negative = tl.zeros([BLOCK], dtype=tl.float32)
        positive_weight = tl.zeros([BLOCK], dtype=tl.float32)
        negative_weight = tl.zeros([BLOCK], dtype=tl.float32)
        for model in range(models):
            value = weighted(base_ptr, pointers, model0_ptr, table, seeds, rho, n, model, offsets, mask, COLUMNS,
                             RELATIVE, RANDOM, RANKED, DIVIDE_BY_P)
            total += value
            positive += tl.maximum(value, 0.0)
            negative += tl.maximum(-value, 0.0)
            if NORMALIZE:
                weight = tl.load(table + model * COLUMNS + 5)
                positive_weight += tl.where(value > 0, weight, 0.0)
                negative_weight += tl.where(value < 0, weight, 0.0)
        # Elected sign: copysign(1, total), i.e. -1 exactly where the sign bit is set (-0.0 included).
        elected_negative = total.to(tl.int32, bitcast=True) < 0
        elected = tl.where(elected_negative, -1.0, 1.0)
        mixed = tl.where(elected_negative, negative, positive) * elected
        if NORMALIZE:
            weight_sum = tl.where(elected_negative, negative_weight, positive_weight)
            mixed = tl.math.div_rn(mixed, tl.where(tl.abs(weight_sum) >= divisor_floor, weight_sum, 1.0))
    else:
        for model in range(models):
            total += weighted(base_ptr, pointers, model0_ptr, table, seeds, rho, n, model, offsets, mask, COLUMNS,
                              RELATIVE, RANDOM, RANKED, DIVIDE_BY_P)
        mixed = total
        if NORMALIZE:
            mixed = tl.math.div_rn(mixed, divisor)
    base = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    result = (base + mixed * scale) * output_scale
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


KERNELS = {"bracket": bracket_kernel, "norms": norms_kernel, "mix": mix_kernel}
