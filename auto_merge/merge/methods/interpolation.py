"""Methods that interpolate whole weights or directions: linear, slerp, nuslerp, multislerp, karcher,
model_stock and passthrough."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from auto_merge.merge.methods.spec import Alias, ParamSpec, ResolvedParams, Searched, register_method

if TYPE_CHECKING:  # torch is imported inside the functions, so that reading the specs needs no torch
    from torch import Tensor

    from auto_merge.merge.methods.apply import MergeInputs

WEIGHT_SUM_FLOOR = 1e-8

REQUIRED_WEIGHT = ParamSpec(
    "weight", "per_model", float, required=True, doc="mixing weight of the model; may be negative"
)


def _require_nonzero_weight_sum(flag: str):
    """Cross-check: normalizing by sum(weight) needs a sum away from zero, because otherwise the result is inf/NaN."""

    def check(params: ResolvedParams) -> None:
        if not params.global_params[flag]:
            return
        weights = params.per_model("weight")
        if abs(sum(weights)) < WEIGHT_SUM_FLOOR:
            raise ValueError(
                f"{params.method}: the weights {weights} sum to ~0, which cannot be normalized; "
                f"allowed: weights whose sum has magnitude >= {WEIGHT_SUM_FLOOR}, or {flag}=false"
            )

    return check


# --- linear
@register_method(
    "linear",
    params=(
        # `weights` is the reference's spelling; LFS searches one weight per expert (normalised by the method).
        replace(REQUIRED_WEIGHT, aliases=(Alias("weights"),), searched=Searched(default=(0.0, 1.0), per_expert=True)),
        ParamSpec("normalize", "global", bool, default=True),
    ),
    base_model="none",
    min_models=1,
    max_models=None,
    cross_check=_require_nonzero_weight_sum("normalize"),
)
def linear(inputs: MergeInputs) -> Tensor:
    """Weighted average sum(w_i x_i) / sum(w_i) (or the plain weighted sum when normalize=false)."""
    weights = inputs.per_model("weight")
    merged = inputs.tensors[0] * weights[0]
    for tensor, weight in zip(inputs.tensors[1:], weights[1:]):
        merged.add_(tensor, alpha=weight)
    if inputs.param("normalize"):
        merged.div_(sum(weights))
    return merged


# --- slerp
SLERP_LERP_THRESHOLD = 0.9995
SLERP_NORM_FLOOR = 1e-8


@register_method(
    "slerp",
    params=(ParamSpec("t", "global", float, required=True, doc="0 returns the base, 1 the other model; not clamped",
                      aliases=(Alias("slerp_t"),), searched=Searched(default=(0.0, 1.0))),),
    base_model="required",
    min_models=1,
    max_models=1,
    first_source_is_base=True,  # a config's first model is the base (t = 0); LFS searches the pair of experts
)
def slerp(inputs: MergeInputs) -> Tensor:
    """mergekit slerp over the flattened tensor from the base (t=0) to the other model (t=1).

    The angle comes from the normalized vectors, but the coefficients multiply the unnormalized ones, so the norm is
    not preserved. Lerp is used when |cos| > 0.9995, which also covers antiparallel pairs.
    """
    import torch
    t = inputs.param("t")
    start, end = inputs.base, inputs.tensors[0]
    start_norm = float(torch.linalg.vector_norm(start))
    end_norm = float(torch.linalg.vector_norm(end))
    # mergekit skips normalizing near-zero vectors; the dot of the kept raw vector then stays ~0.
    start_scale = start_norm if start_norm > SLERP_NORM_FLOOR else 1.0
    end_scale = end_norm if end_norm > SLERP_NORM_FLOOR else 1.0
    cosine = float(torch.dot(start.reshape(-1), end.reshape(-1))) / (start_scale * end_scale)
    if abs(cosine) > SLERP_LERP_THRESHOLD:
        return torch.lerp(start, end, t)
    omega = math.acos(cosine)
    sin_omega = math.sin(omega)
    start_coefficient = math.sin((1 - t) * omega) / sin_omega
    end_coefficient = math.sin(t * omega) / sin_omega
    return torch.add(start * start_coefficient, end, alpha=end_coefficient)


# --- nuslerp
NUSLERP_NORM_CLAMP = 1e-7
NUSLERP_COLINEAR_SIN = 1e-8
NUSLERP_WEIGHT_SUM_FLOOR = 1e-6


def slerp_along_last_dim(t: float, start: Tensor, end: Tensor) -> Tensor:
    """nuslerp's slerp: each slice along the last dim is its own vector with its own angle.

    Norms are clamped to >= 1e-7 and cos to [-1, 1]. Lerp is used only where |sin(angle)| < 1e-8.
    """
    import torch
    start_norm = torch.linalg.vector_norm(start, dim=-1, keepdim=True).clamp_min(NUSLERP_NORM_CLAMP)
    end_norm = torch.linalg.vector_norm(end, dim=-1, keepdim=True).clamp_min(NUSLERP_NORM_CLAMP)
    cosine = ((start * end).sum(dim=-1, keepdim=True) / (start_norm * end_norm)).clamp(-1.0, 1.0)
    angle = torch.acos(cosine)
    sin_angle = torch.sin(angle)
    colinear = sin_angle.abs() < NUSLERP_COLINEAR_SIN
    safe_sin = torch.where(colinear, torch.ones_like(sin_angle), sin_angle)
    start_coefficient = torch.where(colinear, 1 - t, torch.sin((1 - t) * angle) / safe_sin)
    end_coefficient = torch.where(colinear, t, torch.sin(t * angle) / safe_sin)
    return start_coefficient * start + end_coefficient * end


@register_method(
    "nuslerp",
    params=(
        REQUIRED_WEIGHT,
        ParamSpec("nuslerp_flatten", "global", bool, default=True, doc="slerp the whole tensor as one vector"),
        ParamSpec(
            "nuslerp_row_wise", "global", bool, default=False,
            doc="with flatten=false: vectors along dim 0 (columns of [out,in]) instead of the last dim (rows)",
        ),
    ),
    base_model="optional",
    min_models=2,
    max_models=2,
    searchable=False,  # exactly two weighted models: LFS merges every expert of a group
)
def nuslerp(inputs: MergeInputs) -> Tensor:
    """Slerp between two models with t = w_2/(w_1+w_2); with a base, between their task vectors.

    With flatten=false the vector axis is the last dim, or dim 0 when row_wise=true (mergekit's docs name the two
    the other way round). 1-D tensors are always one vector. For >= 3-D tensors, row_wise really uses dim 0,
    whereas mergekit's transpose(0, 1) leaves the last dim as the vector axis.
    """
    first_weight, second_weight = inputs.per_model("weight")
    weight_sum = first_weight + second_weight
    t = second_weight / weight_sum if abs(weight_sum) >= NUSLERP_WEIGHT_SUM_FLOOR else 0.5
    first, second = inputs.tensors
    if inputs.base is not None:
        first, second = first - inputs.base, second - inputs.base
    shape = first.shape
    if inputs.param("nuslerp_flatten") or first.dim() <= 1:
        merged = slerp_along_last_dim(t, first.reshape(1, -1), second.reshape(1, -1)).reshape(shape)
    elif inputs.param("nuslerp_row_wise"):
        merged = slerp_along_last_dim(t, first.movedim(0, -1), second.movedim(0, -1)).movedim(-1, 0)
    else:
        merged = slerp_along_last_dim(t, first, second)
    return merged + inputs.base if inputs.base is not None else merged


# --- multislerp
@register_method(
    "multislerp",
    params=(
        replace(REQUIRED_WEIGHT, searched=Searched(default=(0.0, 1.0), per_expert=True)),
        ParamSpec("normalize_weights", "global", bool, default=True),
        ParamSpec("eps", "global", float, default=1e-8, low=0.0, low_inclusive=False),
    ),
    base_model="optional",
    min_models=1,
    max_models=None,
    cross_check=_require_nonzero_weight_sum("normalize_weights"),
)
def multislerp(inputs: MergeInputs) -> Tensor:
    """mergekit multislerp, computed through its closed form (mergekit's multislerp.py).

    out = normalize(sum_i w_i x_i / (||x_i|| + eps)) * sum_i w_i ||x_i||: a normalized lerp of the directions,
    rescaled by the weighted mean norm. mergekit's tangent-space step is identically zero (sum_i w_i t_i = 0), so the
    closed form gives the same result without that round trip. With a base, x_i are task vectors and the base is
    added back.

    Edge cases:
    - When the weighted directions cancel (||m|| < eps), 1 or 2 models fall back to lerp, as mergekit does, and
      3 or more raise ValueError.
    - All-zero inputs give zeros (the base), where mergekit would raise for 3 or more models.
    """
    import torch
    eps = inputs.param("eps")
    vectors = torch.stack(inputs.tensors).reshape(len(inputs.tensors), -1)
    if inputs.base is not None:
        vectors = vectors - inputs.base.reshape(1, -1)
    weights = torch.tensor(inputs.per_model("weight"), dtype=torch.float32, device=vectors.device)
    if inputs.param("normalize_weights"):
        weights = weights / weights.sum()
    norms = torch.linalg.vector_norm(vectors, dim=1)
    mean_direction = (weights / (norms + eps)) @ vectors
    mean_direction_norm = float(torch.linalg.vector_norm(mean_direction))
    if bool((norms < eps).all()):
        merged = torch.zeros_like(vectors[0])
    elif mean_direction_norm < eps:
        if len(inputs.tensors) > 2:
            raise ValueError(
                f"multislerp: the weighted directions of {inputs.tensor_name or 'this tensor'} cancel out "
                "(antipodal inputs); the spherical mean is undefined for 3 or more models"
            )
        merged = weights @ vectors
    else:
        merged = mean_direction * (float(weights @ norms) / mean_direction_norm)
    merged = merged.reshape(inputs.tensors[0].shape)
    return merged + inputs.base if inputs.base is not None else merged


# --- karcher
@register_method(
    "karcher",
    params=(
        ParamSpec("max_iter", "global", int, default=10, low=1),
        ParamSpec("tol", "global", float, default=1e-5, low=0.0, low_inclusive=False),
    ),
    base_model="none",
    min_models=2,
    max_models=None,
)
def karcher(inputs: MergeInputs) -> Tensor:
    """Karcher (Riemannian) mean of the flattened directions, scaled by the mean norm. Weights are 1/N, as in mergekit.

    Inputs with norm <= tol are left out of the direction but still count in the mean norm.
    """
    import torch
    max_iter, tol = inputs.param("max_iter"), inputs.param("tol")
    count = len(inputs.tensors)
    vectors = torch.stack(inputs.tensors).reshape(count, -1)
    norms = torch.linalg.vector_norm(vectors, dim=1)
    mean_norm = float(norms.sum()) / count
    usable = norms > tol
    if not bool(usable.any()):
        return torch.zeros_like(inputs.tensors[0])
    directions = vectors[usable] / norms[usable].unsqueeze(1)
    alphas = torch.full((directions.shape[0],), 1.0 / directions.shape[0], device=vectors.device)

    mean = alphas @ directions
    mean_norm_initial = float(torch.linalg.vector_norm(mean))
    mean = mean / mean_norm_initial if mean_norm_initial >= tol else directions[0].clone()
    for _ in range(max_iter):
        cosines = (directions @ mean).clamp(-1.0, 1.0)
        angles = torch.acos(cosines)
        # theta/sin(theta) -> 1 as theta -> 0; entries with theta < tol are excluded as in mergekit.
        coefficients = torch.where(
            angles >= tol, alphas * angles / torch.sin(angles).clamp_min(1e-12), torch.zeros_like(angles)
        )
        tangent = coefficients @ directions - float(coefficients @ cosines) * mean
        tangent_norm = float(torch.linalg.vector_norm(tangent))
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + (math.sin(tangent_norm) / tangent_norm) * tangent
        mean = mean / torch.linalg.vector_norm(mean)
    return (mean * mean_norm).reshape(inputs.tensors[0].shape)


# --- model_stock
MODEL_STOCK_NORM_PRODUCT_FLOOR = 1e-6
MODEL_STOCK_DENOMINATOR_FLOOR = 1e-6


@register_method(
    "model_stock",
    params=(ParamSpec("filter_wise", "global", bool, default=False, doc="compute the ratio per row (last dim)"),),
    base_model="required",
    min_models=2,
    max_models=None,
)
def model_stock(inputs: MergeInputs) -> Tensor:
    """Model Stock: t = N c / (1 + (N-1) c), where c is the mean pairwise cosine of the offsets x_i - base.

    out = t * mean(x_i) + (1 - t) * base. When c = -1/(N-1), the ratio's denominator vanishes; ValueError is
    raised instead of returning inf/NaN (mergekit has no guard).
    """
    import torch
    base = inputs.base
    count = len(inputs.tensors)
    offsets = torch.stack(inputs.tensors) - base
    if inputs.param("filter_wise"):
        rows = offsets if base.dim() >= 1 else offsets.reshape(count, 1)  # a 0-d tensor is one 1-element row
    else:
        rows = offsets.reshape(count, -1)
    # rows: [N, ..., D]; each slice along the last dim gets its own ratio.
    norms = torch.linalg.vector_norm(rows, dim=-1)
    cosine_sum = torch.zeros_like(norms[0])
    for first in range(count):
        for second in range(first + 1, count):
            dots = (rows[first] * rows[second]).sum(dim=-1)
            norm_product = (norms[first] * norms[second]).clamp_min(MODEL_STOCK_NORM_PRODUCT_FLOOR)
            cosine_sum += (dots / norm_product).clamp(-1.0, 1.0)
    mean_cosine = cosine_sum / (count * (count - 1) / 2)
    denominator = 1 + (count - 1) * mean_cosine
    if bool((denominator.abs() < MODEL_STOCK_DENOMINATOR_FLOOR).any()):
        raise ValueError(
            f"model_stock: the mean pairwise cosine of the offsets of {inputs.tensor_name or 'this tensor'} is "
            f"-1/(N-1) = {-1 / (count - 1):.4f}, so the interpolation ratio divides by zero"
        )
    ratio = count * mean_cosine / denominator
    mean_model = torch.stack(inputs.tensors).mean(dim=0)
    if inputs.param("filter_wise") and base.dim() >= 1:
        ratio = ratio.unsqueeze(-1)  # one ratio per row, broadcast along the row
    return ratio * mean_model + (1 - ratio) * base


# --- passthrough
@register_method(
    "passthrough",
    params=(ParamSpec("scale", "per_model", float, default=None, allow_none=True, doc="multiply the tensor by this"),),
    base_model="none",
    min_models=1,
    max_models=1,
    searchable=False,  # takes one model as it is: nothing to search
)
def passthrough(inputs: MergeInputs) -> Tensor:
    """Copy the single input (for slices and frankenmerges), optionally multiplied by ``scale``."""
    (scale,) = inputs.per_model("scale")
    tensor = inputs.tensors[0]
    return tensor.clone() if scale is None else tensor * scale
