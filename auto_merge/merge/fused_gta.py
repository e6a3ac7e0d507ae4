"""The GTA pipeline (TIES, DARE, Breadcrumbs, DELLA and variants) as fused Triton kernels: how CUDA evaluates them.

Same semantics as :func:`auto_merge.merge.methods.task_arithmetic.gta_merge` (see there and
:mod:`auto_merge.merge.sparsify`), in at most three passes over the stored tensors instead of about twenty
whole-tensor operations on fp32 copies:

1. thresholds (magnitude trims): a strided sample of each task vector brackets the wanted order statistics (as on the
   CPU); one kernel counts, per query, the magnitudes below the bracket and on each of its ends, and gathers those
   strictly inside it (a few percent), and a sort of the gathered values gives the exact k-th value (a rank on an
   end's run of equal values, common in bf16 task vectors, is that end). A missed bracket falls back to the exact
   whole-tensor search, so results never depend on the sample.
2. L1 norms, only when ``rescale_mode`` is ``l1`` (DARE's and DELLA's default): per-block partial sums of ``|delta|``
   and of the kept ``|delta|``, added in float64 in a fixed order (deterministic).
3. one mixing kernel: per element and model (once each), the task vector, its keep decision, the rescale and the
   weight; the elected sign; the disjoint (or plain) mean; ``base + lambda * mixed``, times ``output_scale``, cast
   into the target's dtype.

Task vectors are read as stored: ``x_i - base`` from the models' tensors in their own dtype, or (``relative``) the
resident bf16/fp16 task vectors themselves, never rebuilt as fp32 tensors. DARE's and DELLA's keep masks come from
Philox counters (``tl.rand``) keyed by a stable hash of ``(seed, tensor name, model index)`` and the element's flat
index, so a mask does not depend on block size, tensor order or launch shape; it is the same on any CUDA GPU (and in
Triton's interpreter), but differs from the CPU's ``torch.rand`` stream. DELLA's per-row ranks come from one stable
``argsort`` per model (torch's), which the kernels then read as relative ranks.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from auto_merge.merge import sparsify
from auto_merge.merge.methods.spec import ResolvedParams, validate_params
from auto_merge.merge.methods.gta_variants import DIVISOR_FLOOR, GTA_VARIANTS

# Methods the kernels evaluate (task_arithmetic itself is a fixed linear combination: auto_merge.merge.fused).
KERNEL_SPARSIFIERS = ("magnitude", "magnitude_outliers", "bernoulli", "della_magprune")
KERNEL_METHODS = tuple(variant.name for variant in GTA_VARIANTS
                       if variant.sparsifier in KERNEL_SPARSIFIERS)
DISABLE_VARIABLE = "AUTO_MERGE_FUSED_GTA"
_VARIANTS = {variant.name: variant for variant in GTA_VARIANTS}
# Below this many elements the thresholds come from one sort of every magnitude (cheaper than sample + bracket).
SMALL_NUMEL = 1 << 17
BLOCK = 2048
# Launch options: no fused multiply-add, so products and sums round as the CPU's separate operations do; 8 warps, so
# a thread holds 8 elements of a block (with 4 warps and 16 elements the kernels need 170-200 registers per thread on
# sm_90, which leaves too few warps resident to hide memory latency; cuobjdump -res-usage of the AOT build).
LAUNCH_OPTIONS = {"enable_fp_fusion": False, "num_warps": 8}
# Per-model parameter columns of the kernels' fp32 table: keep lower <= |delta| <= upper, and uniform < keep_p (or,
# where ranked is set, DELLA's rho * span + floor); multiply by factor, divide by divide, multiply by weight.
_LOW, _HIGH, _KEEP_P, _FACTOR, _DIVIDE, _WEIGHT, _RANKED, _SPAN, _FLOOR = range(9)
_COLUMNS = 9


def available(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` use the kernels: a CUDA device, an importable Triton, and not turned off with
    ``AUTO_MERGE_FUSED_GTA=0`` (which restores the generic path, with the CUDA generator's DARE masks)."""
    return (torch.device(device).type == "cuda" and os.environ.get(DISABLE_VARIABLE, "1") != "0"
            and _kernels() is not None)


def philox_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """The 63-bit Philox key of one (seed, tensor, model): the same stable hash as the CPU generators'."""
    key = f"auto-merge/v1\x00{int(seed)}\x00{tensor_name}\x00{int(model_index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


@lru_cache(maxsize=16384)
def resolved_params(method: str, global_params: tuple, per_model_params: tuple) -> ResolvedParams:
    """Validated parameters of a planned task (cached: validation costs ~0.1 ms, a GPU tensor takes less)."""
    return validate_params(method, dict(global_params), [dict(params) for params in per_model_params])


def gta_merge_fused(method: str, params: ResolvedParams, base: Tensor, models: Sequence[Tensor], *,
                    relative: bool = False, out: Tensor | None = None, seed: int = 0, tensor_name: str = "",
                    output_scale: float = 1.0) -> Tensor:
    """``method`` (one of :data:`KERNEL_METHODS`) over ``models``, written into ``out`` (any floating dtype;
    allocated as fp32 when None) and returned.

    ``models[i]`` is model i's tensor, or with ``relative`` its task vector against ``base``. All tensors share
    ``base``'s shape and device and are contiguous; the models share one dtype. ``output_scale`` multiplies the result.
    """
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("the fused GTA kernels need Triton")
    variant = _VARIANTS[method]
    device, numel, count = base.device, base.numel(), len(models)
    if out is None:
        out = torch.empty(base.shape, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    if numel >= 1 << 31:
        raise ValueError(f"{tensor_name}: {numel} elements exceed the kernels' 32-bit offsets")
    base_flat = base.reshape(-1)
    flats = [model.reshape(-1) for model in models]
    table = to_device([flat.data_ptr() for flat in flats]
                      + [philox_seed(seed, tensor_name, index) for index in range(count)], torch.int64, device)
    pointers, seeds = table[:count], table[count:]

    columns, queries, scaled = _keep_rules(variant.sparsifier, params, numel)
    weights = [float(w) for w in params.per_model("weight")]
    rescale_mode = params.global_params["rescale_mode"]
    ranked = variant.sparsifier == "della_magprune" and any(scaled)
    random = variant.sparsifier in ("bernoulli", "della_magprune") and any(scaled)

    params_table = to_device(columns, torch.float32, device)
    rho = _della_relative_ranks(base, flats, relative, scaled) if ranked else params_table
    if queries:
        values = _order_statistics(kernels, base_flat, flats, pointers, relative, queries)
        rows, cols = to_device([[model for model, _, _ in queries], [column for _, _, column in queries]],
                               torch.int64, device)
        params_table.index_put_((rows, cols), values)
    blocks = triton_cdiv(numel, BLOCK)
    if rescale_mode == "l1" and any(scaled):
        partial = torch.empty(count, 2, blocks, dtype=torch.float32, device=device)
        kernels["norms"][(blocks,)](base_flat, pointers, flats[0], numel, params_table, seeds, rho, partial, blocks,
                                    count, COLUMNS=_COLUMNS, RELATIVE=relative, RANDOM=random, RANKED=ranked,
                                    BLOCK=BLOCK, **LAUNCH_OPTIONS)
        norms = partial.double().sum(dim=2).to(torch.float32)  # fixed-order sums: deterministic
        original, kept = norms[:, 0], norms[:, 1]
        usable = (original >= sparsify.L1_NORM_FLOOR) & (kept >= sparsify.L1_NORM_FLOOR)
        usable &= to_device(scaled, torch.bool, device)
        factor = torch.where(usable, original / torch.where(usable, kept, 1.0), 1.0)
        params_table[:, _FACTOR] = factor
    normalize = bool(params.global_params["normalize"])
    divisor = sum(weights)
    divisor = divisor if abs(divisor) >= DIVISOR_FLOOR else 1.0
    kernels["mix"][(blocks,)](base_flat, pointers, flats[0], out.view(-1), numel, params_table, seeds, rho, count,
                              float(params.global_params["lambda"]), float(output_scale), divisor, DIVISOR_FLOOR,
                              COLUMNS=_COLUMNS, RELATIVE=relative, RANDOM=random, RANKED=ranked,
                              DIVIDE_BY_P=ranked and rescale_mode == "inverse_p",
                              CONSENSUS=variant.consensus == "sum", NORMALIZE=normalize, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return out


def _keep_rules(sparsifier: str, params: ResolvedParams, numel: int):
    """Per model, the kernels' parameter row (:data:`_COLUMNS` values), the order statistics the trims still need
    (``(model, 1-based ascending rank, column it sets)``), and whether the model drops anything (and is rescaled)."""
    densities = [float(d) for d in params.per_model("density")]
    columns = [[0.0, math.inf, 2.0, 1.0, 1.0, float(weight), 0.0, 0.0, 0.0] for weight in params.per_model("weight")]
    queries: list[tuple[int, int, int]] = []  # (model, 1-based ascending rank, column it sets)
    scaled = [density < 1 for density in densities]  # models whose kept entries get rescaled
    if sparsifier == "magnitude":
        for index, density in enumerate(densities):
            if density >= 1:
                continue
            kept = sparsify.count_from_fraction(density, numel)
            if kept == 0:
                columns[index][_LOW], columns[index][_HIGH] = math.inf, -math.inf
                scaled[index] = False
            else:
                queries.append((index, numel - kept + 1, _LOW))
    elif sparsifier == "magnitude_outliers":
        gammas = params.per_model("gamma")
        compat = params.global_params["compat_breadcrumbs_empty_slice"]
        for index, (density, gamma) in enumerate(zip(densities, gammas)):
            n_bottom, n_top = sparsify.breadcrumbs_cut_counts(numel, density, gamma)
            if (compat and n_top == 0) or n_bottom + n_top >= numel:
                columns[index][_LOW], columns[index][_HIGH] = math.inf, -math.inf
                scaled[index] = False
                continue
            if n_bottom > 0:
                queries.append((index, n_bottom + 1, _LOW))
            if n_top > 0:
                queries.append((index, numel - n_top, _HIGH))
    elif sparsifier == "bernoulli":
        for index, density in enumerate(densities):
            if density < 1:
                columns[index][_KEEP_P] = density
    else:  # della_magprune: p = (density - eps) + 2 eps rho, both terms rounded to fp32 as on the CPU
        floors = (torch.tensor(densities) - torch.tensor(params.per_model("epsilon"))).tolist()
        spans = (2 * torch.tensor(params.per_model("epsilon"))).tolist()
        for index, density in enumerate(densities):
            if density < 1:
                columns[index][_RANKED:_FLOOR + 1] = [1.0, spans[index], floors[index]]
    if params.global_params["rescale_mode"] == "inverse_p":  # DELLA's dropping models: their own p, per entry
        for index, density in enumerate(densities):
            columns[index][_DIVIDE] = min(density, 1.0)
    return columns, queries, scaled


def bracket_tiles(numel: int) -> int:
    """Blocks per program of the bracket kernel: 16 where that still leaves about a thousand programs to fill the GPU
    (fewer atomics), else 4 or 1 (a few compiled variants only)."""
    for tiles in (16, 4):
        if numel >= tiles * BLOCK * 1024:
            return tiles
    return 1


def to_device(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list as a tensor on ``device``, without synchronising the stream: ``torch.tensor(values,
    device=cuda)`` copies with ``non_blocking=False``, which waits for every kernel queued before it (one wait per
    tensor merged showed in the H200 profile). A non-blocking copy from pageable memory is staged by the driver,
    so the list may go at once."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _della_relative_ranks(base: Tensor, flats: list[Tensor], relative: bool, ranked: list[bool]) -> Tensor:
    """DELLA's rho = rank / (length - 1) of each |delta| in its row ([models, numel], fp32; rows of unranked models
    are left unset). Rows run along dim 1 (a 1-D tensor is one row; a single entry gets 0.5), as
    :func:`auto_merge.merge.sparsify.della_keep_probabilities`; equal magnitudes rank in index order (a stable
    sort: deterministic on the GPU too)."""
    shape, numel = base.shape, base.numel()
    rho = torch.empty(len(flats), numel, dtype=torch.float32, device=base.device)
    for model, flat in enumerate(flats):
        if not ranked[model]:
            continue
        magnitudes = _magnitudes(base.reshape(-1), flat, relative)
        grouped = magnitudes.view(1, -1) if len(shape) <= 1 else magnitudes.view(shape).movedim(1, -1)
        target = rho[model].view(1, -1) if len(shape) <= 1 else rho[model].view(shape).movedim(1, -1)
        length = grouped.shape[-1]
        if length > 1:
            order = grouped.argsort(dim=-1, stable=True)
            del magnitudes, grouped
            # Each rank's rho (fp32 rank / (length - 1), exact integers first) scattered straight into its row: no
            # int64 rank tensor, no conversion pass.
            positions = torch.arange(length, dtype=torch.float32, device=base.device).div_(length - 1)
            target.scatter_(-1, order, positions.expand_as(order))
        else:
            target.fill_(0.5)
    return rho


def _magnitudes(base_flat: Tensor, flat: Tensor, relative: bool) -> Tensor:
    """|task vector| of one model as a new fp32 tensor (for small tensors and the exact fallback)."""
    if relative:
        return flat.to(torch.float32).abs()
    return torch.sub(flat.to(torch.float32), base_flat.to(torch.float32)).abs_()


def _order_statistics(kernels, base_flat: Tensor, flats: list[Tensor], pointers: Tensor, relative: bool,
                      queries: list[tuple[int, int, int]]) -> Tensor:
    """The queried order statistics of the models' |task vectors| ((model, 1-based ascending rank) pairs) as an fp32
    device tensor, exact."""
    device, numel = base_flat.device, base_flat.numel()
    models = sorted({model for model, _, _ in queries})
    row_of = {model: row for row, model in enumerate(models)}
    stride = sparsify.sample_stride(numel)
    if numel <= SMALL_NUMEL or stride is None:
        ordered = torch.stack([_magnitudes(base_flat, flats[model], relative) for model in models]).sort(dim=1).values
        rows, ranks = to_device([[row_of[model] for model, _, _ in queries], [rank - 1 for _, rank, _ in queries]],
                                torch.int64, device)
        return ordered[rows, ranks]

    sample_base = None if relative else base_flat[::stride].to(torch.float32)
    samples = torch.stack([flats[model][::stride] for model in models]).to(torch.float32)
    if sample_base is not None:
        samples.sub_(sample_base)
    ordered = samples.abs_().sort(dim=1).values
    size = ordered.shape[1]
    # The bracket of each query: ranks in the sample around the wanted quantile (as bracketed_order_statistics).
    lower_index, upper_index, expected = [], [], 0
    for model, rank, _ in queries:
        lower_rank, upper_rank = sparsify.bracket_ranks(rank, numel, size)
        lower_index.append(min(lower_rank, size) - 1 if lower_rank >= 1 else -1)  # -1: unbounded
        upper_index.append(max(upper_rank, 1) - 1 if upper_rank <= size else -1)
        span = (min(upper_rank, size) - max(lower_rank, 1) + 1) / size
        expected = max(expected, span * numel)
    indices = to_device([[row_of[model] for model, _, _ in queries], lower_index, upper_index,
                         [model for model, _, _ in queries]], torch.int64, device)  # one transfer
    rows, lower_index_t, upper_index_t, query_models = indices
    lows = torch.where(lower_index_t >= 0, ordered[rows, lower_index_t.clamp_min(0)], -math.inf)
    highs = torch.where(upper_index_t >= 0, ordered[rows, upper_index_t.clamp_min(0)], math.inf)
    capacity = min(numel, int(expected * 1.5) + 4096)
    query_count = len(queries)
    candidates = torch.full((query_count, capacity), math.inf, dtype=torch.float32, device=device)
    counters = torch.zeros(4, query_count, dtype=torch.int32, device=device)  # below, at low, inside, at high
    tiles = bracket_tiles(numel)
    programs = triton_cdiv(numel, BLOCK * tiles)
    kernels["bracket"][(programs,)](base_flat, pointers, flats[0], numel, query_models, lows, highs, counters,
                                    candidates, capacity, query_count, RELATIVE=relative, BLOCK=BLOCK, TILES=tiles,
                                    **LAUNCH_OPTIONS)
    # One synchronisation per tensor: the counts decide which gathered value is the answer (one transfer; float64
    # holds the int32 counts exactly).
    summary = torch.cat([counters.view(-1).to(torch.float64), lows.to(torch.float64), highs.to(torch.float64)])
    summary = summary.tolist()
    counts = [[int(value) for value in summary[row * query_count:(row + 1) * query_count]] for row in range(4)]
    low_values, high_values = summary[4 * query_count:5 * query_count], summary[5 * query_count:]
    # Per query: ("exact", None) where the bracket missed it or its inside overflowed, ("value", v) where the rank
    # falls on a run equal to an end of the bracket (counting was enough), ("pick", i) for the i-th smallest of its
    # gathered candidates.
    outcomes: list[tuple[str, float | int | None]] = []
    for query, (_, rank, _) in enumerate(queries):
        below, at_low, inside, at_high = (row[query] for row in counts)
        if rank <= below or rank > below + at_low + inside + at_high:
            outcomes.append(("exact", None))
        elif rank <= below + at_low:
            outcomes.append(("value", low_values[query]))
        elif rank > below + at_low + inside:
            outcomes.append(("value", high_values[query]))
        elif inside > capacity:
            outcomes.append(("exact", None))
        else:
            outcomes.append(("pick", rank - below - at_low - 1))
    result = to_device([value if kind == "value" else math.nan for kind, value in outcomes], torch.float32, device)
    picked = [query for query, (kind, _) in enumerate(outcomes) if kind == "pick"]
    if picked:
        widest = max(counts[2][query] for query in picked)
        ordered_candidates = candidates[picked, :widest].sort(dim=1).values
        positions = to_device([outcomes[query][1] for query in picked], torch.int64, device)
        result[picked] = ordered_candidates[torch.arange(len(picked), device=device), positions]
    for query, (model, rank, _) in enumerate(queries):
        if outcomes[query][0] == "exact":
            result[query] = sparsify.kth_smallest(_magnitudes(base_flat, flats[model], relative), rank)
    return result


@lru_cache(maxsize=1)
def _kernels() -> dict | None:
    """The compiled-on-demand Triton kernels, or None without Triton (the generic path then runs)."""
    try:
        from auto_merge.merge._gta_kernels import KERNELS
    except ImportError:
        return None
    return KERNELS
