"""Sparsifiers for stacked task vectors: the trim/drop stage of TIES, DARE, Breadcrumbs and DELLA.

Every sparsifier takes ``deltas`` of shape ``[N, *tensor_shape]`` (one task vector per model, fp32) plus per-model
parameters as sequences of length N, and returns a new tensor of the same shape. Inputs are never modified.

Rescale modes (``rescale_mode``), applied to each model's surviving entries:

- ``"none"``: kept entries are left as they are.
- ``"l1"``: mergekit's L1 matching (mergekit >= 2025-02, PR #505). The factor is ``||delta||_1 / ||kept||_1`` per model
  and per tensor. It is applied only when both norms are >= 1e-7. It equals 1/p only in expectation.
- ``"inverse_p"``: divide each kept entry by its keep probability (DARE/DELLA papers, FREE and DELLA code). It is
  unbiased per element. For the deterministic trims (magnitude, magnitude_outliers) p is the kept fraction ``density``.

Counts such as ``k = floor(density * numel)`` are computed as ``floor(density * numel + 1e-6)``, so that 0.29 * 100
keeps 29 entries rather than the 28 that the float product 28.999999999999996 would give. mergekit truncates the raw
product.

Magnitude thresholds come from k-th order statistics (radix pre-selection plus ``torch.kthvalue``), never from a full
sort. Every entry whose magnitude equals the threshold is kept, as in the official TIES code. When magnitudes repeat
(deltas of bf16 weights), slightly more than k entries can therefore survive. mergekit's ``topk`` keeps exactly k and
breaks ties arbitrarily.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

RESCALE_MODES = ("none", "l1", "inverse_p")
L1_NORM_FLOOR = 1e-7
# Below this many elements torch.kthvalue is already cheap; above it, a radix histogram on the fp32 bit pattern
# narrows the search to one bucket first (about 2.5x faster on CPU for 16M elements).
_RADIX_MIN_ELEMENTS = 1 << 16
_RADIX_SHIFT = 16


def derive_generator(
    seed: int, tensor_name: str, model_index: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """Return a generator seeded from (seed, tensor_name, model_index) by a stable hash (blake2b, not ``hash()``).

    Each (tensor, model) pair gets its own stream. Masks therefore do not depend on the order tensors are processed
    in, on the shard layout or on the thread count. They do depend on the device type, because CPU and CUDA generators
    produce different streams.
    """
    key = f"auto-merge/v1\x00{int(seed)}\x00{tensor_name}\x00{int(model_index)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def count_from_fraction(fraction: float, total: int) -> int:
    """floor(fraction * total), robust to the float product landing just below an integer."""
    return max(0, math.floor(fraction * total + 1e-6))


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The k-th smallest (1-based) of a 1-D tensor of non-negative fp32 values, as a 0-d tensor, without a full sort."""
    count = values.numel()
    if not 1 <= k <= count:
        raise ValueError(f"k={k} is out of range for {count} values")
    if values.device.type != "cpu" or values.dtype != torch.float32 or count < _RADIX_MIN_ELEMENTS:
        return torch.kthvalue(values, k).values
    # Non-negative IEEE floats order like their bit patterns read as integers, so the top bits give ordered buckets.
    buckets = values.contiguous().view(torch.int32) >> _RADIX_SHIFT
    cumulative = torch.bincount(buckets, minlength=1 << (31 - _RADIX_SHIFT)).cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor(k, dtype=cumulative.dtype)))
    preceding = int(cumulative[bucket - 1]) if bucket > 0 else 0
    return torch.kthvalue(values[buckets == bucket], k - preceding).values


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest (1-based) of a 1-D tensor of non-negative fp32 values."""
    return kth_smallest(values, values.numel() - k + 1)


def _per_model(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """Per-model scalars shaped [N, 1, ..., 1] to broadcast against a stacked tensor."""
    vector = torch.as_tensor(values, dtype=torch.float32, device=like.device)
    return vector.reshape(-1, *([1] * (like.dim() - 1)))


def _check_lengths(deltas: Tensor, **per_model: Sequence) -> None:
    for name, values in per_model.items():
        if len(values) != deltas.shape[0]:
            raise ValueError(f"{name} has {len(values)} entries for {deltas.shape[0]} models")


def rescale(deltas: Tensor, kept: Tensor, mode: str, keep_probability: Tensor | None = None) -> Tensor:
    """Rescale sparsified task vectors ``kept`` (zeros where dropped) relative to the originals ``deltas``.

    ``keep_probability`` must broadcast against ``deltas`` and is needed only for ``inverse_p``.
    """
    if mode == "none":
        return kept
    if mode == "inverse_p":
        if keep_probability is None:
            raise ValueError("rescale_mode 'inverse_p' needs the keep probability")
        # Entries dropped with p = 0 are zero already. The clamp only avoids 0/0.
        return kept / keep_probability.clamp_min(torch.finfo(torch.float32).tiny)
    if mode == "l1":
        models = deltas.shape[0]
        original_norm = deltas.reshape(models, -1).abs().sum(dim=1)
        kept_norm = kept.reshape(models, -1).abs().sum(dim=1)
        usable = (original_norm >= L1_NORM_FLOOR) & (kept_norm >= L1_NORM_FLOOR)
        factor = torch.where(usable, original_norm / torch.where(usable, kept_norm, 1.0), 1.0)
        return kept * factor.reshape(-1, *([1] * (deltas.dim() - 1)))
    raise ValueError(f"rescale_mode must be one of {RESCALE_MODES}, got {mode!r}")


def magnitude(deltas: Tensor, densities: Sequence[float], rescale_mode: str = "none") -> Tensor:
    """TIES trim: keep the k = floor(density * numel) largest |delta| of each model's flattened tensor.

    density >= 1 leaves that model unchanged. k = 0 (e.g. density 0.1 on a 9-element bias) zeroes the model's task
    vector, so it contributes nothing to this tensor. mergekit raises an assertion error there.
    """
    _check_lengths(deltas, densities=densities)
    models = deltas.shape[0]
    flat = deltas.reshape(models, -1)
    numel = flat.shape[1]
    magnitudes = flat.abs()
    keep = torch.ones_like(flat, dtype=torch.bool)
    for index, density in enumerate(densities):
        if density >= 1:
            continue
        k = count_from_fraction(density, numel)
        if k == 0:
            keep[index] = False
        else:
            keep[index] = magnitudes[index] >= kth_largest(magnitudes[index], k)
    kept = torch.where(keep, flat, 0.0).reshape(deltas.shape)
    probability = _per_model([min(d, 1.0) for d in densities], deltas)
    return rescale(deltas, kept, rescale_mode, probability)


def bernoulli(
    deltas: Tensor,
    densities: Sequence[float],
    generators: Sequence[torch.Generator],
    rescale_mode: str = "l1",
) -> Tensor:
    """DARE drop: keep each entry independently with probability ``density`` (drop probability 1 - density).

    density >= 1 leaves that model unchanged and draws nothing from its generator.
    """
    _check_lengths(deltas, densities=densities, generators=generators)
    keep = torch.ones_like(deltas, dtype=torch.bool)
    for index, (density, generator) in enumerate(zip(densities, generators)):
        if density >= 1:
            continue
        uniform = torch.rand(deltas.shape[1:], generator=generator, device=deltas.device, dtype=torch.float32)
        keep[index] = uniform < density
    kept = torch.where(keep, deltas, 0.0)
    probability = _per_model([min(d, 1.0) for d in densities], deltas)
    return rescale(deltas, kept, rescale_mode, probability)


def breadcrumbs_cut_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bottom, n_top): how many of the smallest and of the largest magnitudes Breadcrumbs removes.

    target = floor(density*n) entries are kept. n_top = floor(gamma*n) largest are removed, and the remaining
    n - target - n_top smallest are removed too. When that would be negative, the top cut shrinks instead.
    """
    target = count_from_fraction(density, numel)
    n_top = count_from_fraction(gamma, numel)
    n_bottom = numel - target - n_top
    if n_bottom < 0:
        n_top += n_bottom
        n_bottom = 0
    return n_bottom, n_top


def magnitude_outliers(
    deltas: Tensor,
    densities: Sequence[float],
    gammas: Sequence[float],
    rescale_mode: str = "none",
    compat_empty_slice: bool = False,
) -> Tensor:
    """Breadcrumbs: drop the gamma fraction of largest |delta| and enough of the smallest to keep ``density``.

    ``compat_empty_slice`` reproduces the mergekit/FREE slicing bug: when the top cut is empty (gamma*n < 1), the
    whole task vector is zeroed. By default the intended rule applies and nothing is cut from the top.
    """
    _check_lengths(deltas, densities=densities, gammas=gammas)
    models = deltas.shape[0]
    flat = deltas.reshape(models, -1)
    numel = flat.shape[1]
    magnitudes = flat.abs()
    keep = torch.ones_like(flat, dtype=torch.bool)
    for index, (density, gamma) in enumerate(zip(densities, gammas)):
        n_bottom, n_top = breadcrumbs_cut_counts(numel, density, gamma)
        if (compat_empty_slice and n_top == 0) or n_bottom + n_top >= numel:
            keep[index] = False
            continue
        row_keep = torch.ones(numel, dtype=torch.bool, device=flat.device)
        if n_bottom > 0:
            row_keep &= magnitudes[index] >= kth_smallest(magnitudes[index], n_bottom + 1)
        if n_top > 0:
            row_keep &= magnitudes[index] <= kth_smallest(magnitudes[index], numel - n_top)
        keep[index] = row_keep
    kept = torch.where(keep, flat, 0.0).reshape(deltas.shape)
    probability = _per_model([min(d, 1.0) for d in densities], deltas)
    return rescale(deltas, kept, rescale_mode, probability)


def _della_rank_axis(deltas: Tensor) -> int:
    # The stacked model axis is 0. A 1-D tensor is one row. Otherwise ranks run along the tensor's dim 1, which is
    # the row of an [out, in] weight. For >= 3-D tensors this copies a quirk of the mergekit code.
    return 1 if deltas.dim() <= 2 else 2


def della_keep_probabilities(deltas: Tensor, densities: Sequence[float], epsilons: Sequence[float]) -> Tensor:
    """MagPrune keep probabilities: p = (density - eps) + 2*eps*rho, where rho = (rank - 1)/(n - 1) in each row.

    Ranks count |delta| ascending, one rank per entry (argsort, so ties get distinct ranks). A row of length 1 gets
    rho = 0.5 instead of mergekit's 0/0. Models with density >= 1 get p = 1.
    """
    _check_lengths(deltas, densities=densities, epsilons=epsilons)
    if deltas.dim() == 1:  # stacked 0-d tensors
        deltas = deltas.unsqueeze(1)
    axis = _della_rank_axis(deltas)
    length = deltas.shape[axis]
    order = deltas.abs().argsort(dim=axis)
    positions_shape = [1] * deltas.dim()
    positions_shape[axis] = length
    positions = torch.arange(length, device=deltas.device).reshape(positions_shape).expand_as(order)
    ranks = torch.empty_like(order).scatter_(axis, order, positions)
    if length > 1:
        relative_rank = ranks.to(torch.float32) / (length - 1)
    else:
        relative_rank = torch.full(deltas.shape, 0.5, device=deltas.device)
    density = _per_model(densities, deltas)
    epsilon = _per_model(epsilons, deltas)
    probability = (density - epsilon) + 2 * epsilon * relative_rank
    return torch.where(density >= 1, torch.ones_like(probability), probability)


def della_magprune(
    deltas: Tensor,
    densities: Sequence[float],
    epsilons: Sequence[float],
    generators: Sequence[torch.Generator],
    rescale_mode: str = "l1",
) -> Tensor:
    """DELLA MagPrune: keep entry e with probability p_e from :func:`della_keep_probabilities`.

    Requires 0 < density - eps and density + eps < 1 for every model with density < 1, as mergekit does. The
    registry validates this, and it is checked here again for direct callers.
    """
    _check_lengths(deltas, densities=densities, epsilons=epsilons, generators=generators)
    for index, (density, epsilon) in enumerate(zip(densities, epsilons)):
        if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            raise ValueError(
                f"della: model {index} needs 0 < density - epsilon and density + epsilon < 1, "
                f"got density={density}, epsilon={epsilon}"
            )
    probability = della_keep_probabilities(deltas, densities, epsilons).reshape(deltas.shape)
    keep = torch.ones_like(deltas, dtype=torch.bool)
    for index, (density, generator) in enumerate(zip(densities, generators)):
        if density >= 1:
            continue
        uniform = torch.rand(deltas.shape[1:], generator=generator, device=deltas.device, dtype=torch.float32)
        keep[index] = uniform < probability[index]
    kept = torch.where(keep, deltas, 0.0)
    return rescale(deltas, kept, rescale_mode, probability)
