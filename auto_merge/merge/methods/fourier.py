"""FR-Merging (the backbone of FREE-Merging, arXiv 2411.16815): high-pass each task vector with a 2-D FFT, then mix.

This follows the reference code (FREE-Merging ``merge_llm`` ``GTATaskFourier``):

- Only exactly 2-D task vectors are filtered. Norms, biases and other ranks pass unfiltered.
- F = FFT2(delta) with no fftshift. d(y, x) is the distance of bin (y, x) from the array centre (floor(H/2),
  floor(W/2)), which in an unshifted spectrum is the Nyquist corner, not DC.
- r_keep = ratio * min(H, W), r_low = floor(min(H, W) / 10).
- mask = [d <= r_low] + [r_low <= d <= r_keep]. The exact ring d = r_low therefore has weight 2 ("reference" mask);
  the "clean" mask drops that doubling.
- F_r(delta) = Re(IFFT2(F * mask)). Because of Re(), the effective mask is (M(k) + M(-k)) / 2, and with it the
  transform is computed as rfft2/irfft2.

The result is a high-pass around DC, but not a disk around DC. Square matrices with ratio >= 1/sqrt(2) lose
nothing; rectangular ones lose a large share of bins.

Mixing is the GTA rule with ``consensus`` "sum" (TIES sign election, the reference LLM path) or "none" (plain sum,
the ViT/RoBERTa paths), ``normalize`` false by default, and out = base + lambda * mixed.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import TYPE_CHECKING

from auto_merge.merge.methods.spec import MEMORY_ONLY_PARAMS, ParamSpec, Searched, register_method
from auto_merge.merge.methods.task_arithmetic import (
    CONSENSUS_CHOICES,
    LAMBDA,
    REQUIRED_WEIGHT,
    finish_task_arithmetic,
    task_vectors,
)

if TYPE_CHECKING:  # torch is imported inside the functions, so that reading the specs needs no torch
    from torch import Tensor

    from auto_merge.merge.methods.apply import MergeInputs

FOURIER_MASK_MODES = ("reference", "clean")


def fourier_mask(height: int, width: int, ratio: float, mode: str = "reference") -> Tensor:
    """The full H x W spectral mask (values 0, 1, or 2 on the reference ring) in unshifted FFT layout, on CPU."""
    return _fourier_mask_cached(int(height), int(width), float(ratio), mode).clone()


@functools.lru_cache(maxsize=64)
def _fourier_mask_cached(height: int, width: int, ratio: float, mode: str) -> Tensor:
    import torch
    if mode not in FOURIER_MASK_MODES:
        raise ValueError(f"fr_mask must be one of {FOURIER_MASK_MODES}, got {mode!r}")
    rows = torch.arange(height, dtype=torch.int64).unsqueeze(1)
    columns = torch.arange(width, dtype=torch.int64).unsqueeze(0)
    squared = (rows - height // 2) ** 2 + (columns - width // 2) ** 2
    # Like the reference: squared distances are exact int64, and the distance itself is fp32.
    distance = torch.sqrt(squared.to(torch.float32))
    keep_radius = ratio * min(height, width)
    low_radius = min(height, width) // 10
    ring_or_outer = (distance >= low_radius) & (distance <= keep_radius)
    if mode == "reference":
        return (distance <= low_radius).to(torch.float32) + ring_or_outer.to(torch.float32)
    return ((distance <= low_radius) | ring_or_outer).to(torch.float32)


@functools.lru_cache(maxsize=64)
def _half_spectrum_mask(height: int, width: int, ratio: float, mode: str, device: str) -> Tensor | None:
    """The mask symmetrized as (M(k) + M(-k)) / 2 and cut to rfft2's W//2 + 1 columns, or None when it is all ones."""
    import torch
    mask = _fourier_mask_cached(height, width, ratio, mode)
    # M(-k): index 0 stays, index j maps to size - j.
    mirrored = torch.roll(torch.flip(mask, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    symmetric = ((mask + mirrored) / 2)[:, : width // 2 + 1]
    if bool((symmetric == 1).all()):
        return None
    return symmetric.to(device)


def fourier_high_pass(matrices: Tensor, ratio: float, mode: str = "reference") -> Tensor:
    """Apply F_r to each trailing H x W matrix of ``matrices`` ([..., H, W], fp32). Returns a new fp32 tensor."""
    import torch
    if matrices.dim() < 2:
        raise ValueError(f"fourier_high_pass needs [..., H, W] matrices, got shape {tuple(matrices.shape)}")
    height, width = matrices.shape[-2:]
    mask = _half_spectrum_mask(int(height), int(width), float(ratio), mode, str(matrices.device))
    if mask is None:
        return matrices.to(torch.float32, copy=True)
    spectrum = torch.fft.rfft2(matrices.to(torch.float32))
    return torch.fft.irfft2(spectrum * mask, s=(height, width))


@register_method(
    "fourier",
    params=(
        REQUIRED_WEIGHT,
        replace(LAMBDA, searched=Searched(default=(0.0, 1.5))),
        ParamSpec("normalize", "global", bool, default=False),
        ParamSpec("consensus", "global", str, default="sum", choices=CONSENSUS_CHOICES,
                  doc="sum: TIES sign election (FREE LLM path); none: plain sum (FREE ViT/RoBERTa paths)"),
        ParamSpec("fr_ratio", "global", float, default=0.9, low=0.0, low_inclusive=False,
                  doc="keep radius as a fraction of min(H, W); 0.9 in the FREE LLM code, 0.7 for ViT/RoBERTa"),
        ParamSpec("fr_mask", "global", str, default="reference", choices=FOURIER_MASK_MODES,
                  doc="reference: the ring d = r_low counts twice, as in the FREE code; clean: it counts once"),
    ),
    base_model="required",
    min_models=1,
    max_models=None,
    summary="FR-Merging: 2-D FFT high-pass of each 2-D task vector, then TIES-sign (or plain) sum",
    search_fixed={"weight": 1.0},
    ignored_params=MEMORY_ONLY_PARAMS,
)
def fourier(inputs: MergeInputs) -> Tensor:
    """FR-Merging: out = base + lambda * mix_i(w_i * F_r(x_i - base)), where F_r filters only 2-D tensors."""
    deltas = task_vectors(inputs)
    if inputs.base.dim() == 2:
        deltas = fourier_high_pass(deltas, inputs.param("fr_ratio"), inputs.param("fr_mask"))
    return finish_task_arithmetic(inputs, deltas, inputs.param("consensus"))


__all__ = ["FOURIER_MASK_MODES", "fourier", "fourier_high_pass", "fourier_mask"]
