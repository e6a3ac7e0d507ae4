"""Sparsifiers over N task vectors applied chunk by chunk, in place: the form the GTA methods run (the reference
semantics, on stacked task vectors, are :mod:`auto_merge.merge.sparsify`, whose selection helpers this module calls
through the module, so that tests can switch them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from auto_merge.merge import sparsify


# The functions of :mod:`auto_merge.merge.sparsify` work on stacked [N, *shape] task vectors and are the reference
# semantics. The GTA methods run the same maths through :class:`ChunkedSparsifier`: whole-tensor statistics first (thresholds, L1 norms, random
# keep masks), then each model's task vector is trimmed chunk by chunk, in place, inside the fused mixing loop of
# :mod:`auto_merge.merge.methods.task_arithmetic`. Results are the reference's bit for bit, except the L1 factor,
# whose norms are summed in fixed blocks (fp32 rounding; identical for any thread count), and the sign of zeros.

# Norms are summed over blocks of this many elements (at most torch's grain size, so a block is never split across
# threads) and the block sums added in float64: the same result whatever the thread count.
_NORM_BLOCK = 1 << 15


def abs_sum(values: Tensor) -> float:
    """sum(|values|) as a Python float, summed in fixed blocks so the result does not depend on the thread count."""
    flat = values.reshape(-1)
    whole = flat.numel() // _NORM_BLOCK * _NORM_BLOCK
    total = 0.0
    if whole:
        total += float(flat[:whole].view(-1, _NORM_BLOCK).abs().sum(dim=1).double().sum())
    if whole < flat.numel():
        total += float(flat[whole:].abs().double().sum())
    return total


def below(threshold: Tensor) -> float:
    """The largest fp32 value strictly below ``threshold``: |x| > below(t) is |x| >= t, which hardshrink can test."""
    return float(torch.nextafter(threshold.float(), torch.tensor(-math.inf, device=threshold.device)))


def l1_factor(original_norm: float, kept_norm: float) -> float:
    """mergekit's L1 rescale factor from two norms, divided in fp32 like :func:`sparsify.rescale`; 1 when either is
    tiny."""
    original, kept = torch.tensor(original_norm, dtype=torch.float32), torch.tensor(kept_norm, dtype=torch.float32)
    if original < sparsify.L1_NORM_FLOOR or kept < sparsify.L1_NORM_FLOOR:
        return 1.0
    return float(original / kept)


class ChunkedSparsifier:
    """One sparsifier over N task vectors, applied chunk by chunk (flat element ranges of the tensor) in place.

    ``task_vector(i, start, end, out)`` writes model i's task vector for elements [start, end) into ``out`` and
    ``task_vector_sample(i, stride)`` returns a new tensor of every stride-th element of it. The
    constructor makes the whole-tensor pass a sparsifier needs; :meth:`apply` then trims one model's chunk.
    :meth:`rescale_column` / :attr:`per_element_inverse_p` tell the caller how to rescale the kept entries.
    """

    def __init__(self, kind: str, shape: torch.Size, device: torch.device, task_vector, task_vector_sample, *,
                 densities, rescale_mode, gammas=None, epsilons=None, generators=None, compat_empty_slice=False,
                 chunk_elements: int):
        self.kind, self.shape, self.device = kind, shape, device
        self.numel = math.prod(shape)
        self.densities = list(densities)
        self.models = len(self.densities)
        self.rescale_mode = rescale_mode
        self.task_vector = task_vector
        self.task_vector_sample = task_vector_sample
        self.chunk_elements = chunk_elements
        self.generators = generators
        self.factors = [1.0] * self.models  # l1
        self.masks: list[Tensor | None] = [None] * self.models  # random kinds with l1: the keep masks, drawn once
        if rescale_mode not in sparsify.RESCALE_MODES:
            raise ValueError(f"rescale_mode must be one of {sparsify.RESCALE_MODES}, got {rescale_mode!r}")
        if kind in ("magnitude", "magnitude_outliers"):
            self._prepare_trims(gammas, compat_empty_slice)
        elif kind == "bernoulli":
            self._keep_lower = [1.0] * self.models
        elif kind == "della_magprune":
            self._prepare_della(epsilons)
        else:
            raise ValueError(f"unknown sparsifier {kind!r}")
        if kind in ("bernoulli", "della_magprune") and rescale_mode == "l1":
            self._draw_masks()

    # --- deterministic trims: thresholds from the whole tensor's magnitudes, then hardshrink per chunk
    def _prepare_trims(self, gammas, compat_empty_slice: bool) -> None:
        # Per model: None (keep all), "zero" (keep nothing) or (lower, upper): keep lower < |x| (hardshrink) and
        # |x| <= upper (None: no upper cut). The order statistics are 1-based ranks of |x| ascending.
        self.trims: list = [None] * self.models
        for index, density in enumerate(self.densities):
            if self.kind == "magnitude":
                if density >= 1:
                    continue
                k = sparsify.count_from_fraction(density, self.numel)
                if k == 0:
                    self.trims[index] = "zero"
                    continue
                (threshold,) = self._order_statistics(index, [self.numel - k + 1])
                self.trims[index] = (below(threshold), None)
            else:
                n_bottom, n_top = sparsify.breadcrumbs_cut_counts(self.numel, density, gammas[index])
                if (compat_empty_slice and n_top == 0) or n_bottom + n_top >= self.numel:
                    self.trims[index] = "zero"
                    continue
                if n_bottom == 0 and n_top == 0:
                    continue
                ranks = ([n_bottom + 1] if n_bottom > 0 else []) + ([self.numel - n_top] if n_top > 0 else [])
                values = self._order_statistics(index, ranks)
                lower = below(values.pop(0)) if n_bottom > 0 else None
                upper = float(values.pop(0)) if n_top > 0 else None
                self.trims[index] = (lower, upper)
            if self.rescale_mode == "l1":
                self.factors[index] = self._trim_l1_factor(index)

    def _magnitude_chunks(self, index: int):
        """|task vector| of model ``index``, chunk by chunk, in one reused buffer."""
        buffer = torch.empty(min(self.chunk_elements, self.numel), dtype=torch.float32, device=self.device)
        for start in range(0, self.numel, self.chunk_elements):
            end = min(start + self.chunk_elements, self.numel)
            yield self.task_vector(index, start, end, buffer[: end - start]).abs_()

    def _order_statistics(self, index: int, ranks: list[int]) -> list[Tensor]:
        """The given order statistics (1-based, ascending) of model ``index``'s |task vector|, as 0-d tensors.

        One pass over the chunks brackets them from a strided sample; the whole |task vector| is materialised only
        when a bracket misses. (A GPU's kthvalue sorts: on a whole 7B-shaped tensor it takes seconds.)"""
        if self.device.type == "cpu" and sparsify.CPU_NUMPY_SELECTION:  # one pass into a scratch array, numpy selects
            magnitudes = torch.empty(self.numel, dtype=torch.float32)
            for start in range(0, self.numel, self.chunk_elements):
                end = min(start + self.chunk_elements, self.numel)
                self.task_vector(index, start, end, magnitudes[start:end]).abs_()
            found = sparsify.cpu_order_statistics(magnitudes.numpy(), ranks)
            return [torch.as_tensor(value, dtype=torch.float32) for value in found]
        stride = sparsify.sample_stride(self.numel)
        found: list = [None] * len(ranks)
        if stride is not None:
            sample = self.task_vector_sample(index, stride).abs_()
            found = sparsify.bracketed_order_statistics(lambda: self._magnitude_chunks(index), self.numel, ranks,
                                                        sample)
        if any(value is None for value in found):
            magnitudes = torch.empty(self.numel, dtype=torch.float32, device=self.device)
            for start in range(0, self.numel, self.chunk_elements):
                end = min(start + self.chunk_elements, self.numel)
                self.task_vector(index, start, end, magnitudes[start:end]).abs_()
            found = [sparsify.kth_smallest(magnitudes, rank) if value is None else value
                     for rank, value in zip(ranks, found)]
        return [torch.as_tensor(value, dtype=torch.float32) for value in found]

    def _trim_l1_factor(self, index: int) -> float:
        trim = self.trims[index]
        original_norm = kept_norm = 0.0
        for magnitudes in self._magnitude_chunks(index):
            original_norm += abs_sum(magnitudes)
            self._trim(magnitudes, trim)
            kept_norm += abs_sum(magnitudes)
        return l1_factor(original_norm, kept_norm)

    @staticmethod
    def _trim(values: Tensor, trim) -> None:
        if trim is None:
            return
        if trim == "zero":
            values.zero_()
            return
        lower, upper = trim
        if lower is not None:
            torch.hardshrink(values, lower, out=values)  # keeps |x| > lower, i.e. |x| >= the k-th value
        if upper is not None:
            values.sub_(torch.hardshrink(values, upper))  # x - x = 0 where |x| > upper

    # --- random drops
    def _prepare_della(self, epsilons) -> None:
        for index, (density, epsilon) in enumerate(zip(self.densities, epsilons)):
            if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                raise ValueError(
                    f"della: model {index} needs 0 < density - epsilon and density + epsilon < 1, "
                    f"got density={density}, epsilon={epsilon}"
                )
        density32 = torch.tensor(self.densities, dtype=torch.float32)
        epsilon32 = torch.tensor(list(epsilons), dtype=torch.float32)
        # p = (density - eps) + 2*eps*rho, each step in fp32 as in sparsify.della_keep_probabilities.
        self._della_floor = (density32 - epsilon32).tolist()
        self._della_span = (2 * epsilon32).tolist()
        dims = len(self.shape)
        self.rank_length = 1 if dims == 0 else (self.shape[0] if dims == 1 else self.shape[1])

    def della_probability(self, index: int, task_vector: Tensor) -> Tensor:
        """Keep probabilities of one chunk (whole slabs along dim 0, so ranks along dim 1 are complete)."""
        dims = len(self.shape)
        if dims <= 1:  # one row: the whole (or 0-d) tensor
            grouped, axis = task_vector.reshape(1, -1), 1
        else:
            grouped, axis = task_vector.reshape(-1, *self.shape[1:]), 1
        length = grouped.shape[axis]
        if length > 1:
            probability = sparsify.magnitude_ranks(grouped, axis).to(torch.float32).div_(length - 1)
        else:
            probability = torch.full(grouped.shape, 0.5, device=grouped.device)
        probability.mul_(self._della_span[index]).add_(self._della_floor[index])
        return probability.reshape(-1)

    def _draw_keep(self, index: int, task_vector: Tensor) -> tuple[Tensor, Tensor | None]:
        """A float keep mask (1 kept, 0 dropped) for one model's chunk, and della's keep probabilities."""
        probability = None
        density = self.densities[index]
        if self.kind == "bernoulli":
            threshold = density
        else:
            probability = self.della_probability(index, task_vector)
            threshold = probability
        uniform = torch.rand(task_vector.shape, generator=self.generators[index], device=self.device,
                             dtype=torch.float32)
        return torch.lt(uniform, threshold, out=uniform), probability

    def _draw_masks(self) -> None:
        """L1 needs the kept norms before mixing: draw every keep mask once (kept as uint8) and sum the norms."""
        buffer = torch.empty(min(self.chunk_elements_for_kind(), self.numel), dtype=torch.float32,
                             device=self.device)
        for index, density in enumerate(self.densities):
            if density >= 1:
                continue
            mask = torch.empty(self.numel, dtype=torch.uint8, device=self.device)
            original_norm = kept_norm = 0.0
            for start, end in self.chunks():
                chunk = self.task_vector(index, start, end, buffer[: end - start])
                keep, _ = self._draw_keep(index, chunk)
                mask[start:end].copy_(keep)
                original_norm += abs_sum(chunk)
                kept_norm += abs_sum(chunk.mul_(keep))
            self.masks[index] = mask
            self.factors[index] = l1_factor(original_norm, kept_norm)

    def chunk_elements_for_kind(self) -> int:
        """Chunk length in elements: della's chunks hold whole slabs along dim 0 (its ranks run inside them)."""
        if self.kind != "della_magprune":
            return self.chunk_elements
        if len(self.shape) <= 1:
            return max(self.numel, 1)
        slab = self.numel // self.shape[0] if self.shape[0] else 1
        return max(1, self.chunk_elements // max(slab, 1)) * max(slab, 1)

    def chunks(self):
        step = self.chunk_elements_for_kind()
        for start in range(0, self.numel, step):
            yield start, min(start + step, self.numel)

    # --- per chunk
    def apply(self, index: int, start: int, end: int, values: Tensor) -> None:
        """Trim model ``index``'s task vector chunk ``values`` (elements [start, end)) in place."""
        density = self.densities[index]
        if self.kind in ("magnitude", "magnitude_outliers"):
            self._trim(values, self.trims[index])
            return
        if density >= 1:
            return
        if self.masks[index] is not None:
            values.mul_(self.masks[index][start:end])
            return
        keep, probability = self._draw_keep(index, values)
        values.mul_(keep)
        if self.rescale_mode == "inverse_p" and probability is not None:
            values.div_(probability.clamp_min_(torch.finfo(torch.float32).tiny))

    def rescale_column(self) -> tuple[str, list[float]] | None:
        """How the caller rescales all kept rows at once: ("mul", factors), ("div", p) or None."""
        if self.rescale_mode == "l1":
            return "mul", self.factors
        if self.rescale_mode == "inverse_p" and self.kind != "della_magprune":
            return "div", [min(density, 1.0) for density in self.densities]
        return None
