"""Task-vector methods (design note §7-§9): the generalized task arithmetic (GTA) family and sce.

GTA pipeline, per tensor:
1. delta_i = x_i - base.
2. Sparsify each delta_i with its own density (and gamma/epsilon): magnitude (TIES), bernoulli (DARE),
   magnitude_outliers (Breadcrumbs) or della_magprune (DELLA).
3. W_i = weight_i * delta_i.
4. Mix, with or without consensus:
   - "sum" consensus (TIES family): the elected sign is +1 where sum_i W_i >= 0 (ties and zeros go to +1), else -1.
     Only entries whose sign matches count, and zeros never match. The divisor sum_i [match] * weight_i is taken
     per element.
   - No consensus: sum_i W_i, with the divisor sum_i weight_i.
   A divisor of magnitude < 1e-8 is replaced by 1.
5. With normalize, mixed /= divisor. Then out = base + lambda * mixed.

Rescale default: ``rescale_mode="l1"`` for dare_* and della*, for parity with current mergekit (its ``rescale: true``).
``"inverse_p"`` reproduces the DARE/DELLA papers and the FREE/DELLA code. ``"none"`` turns rescaling off. The other
methods default to "none".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from auto_merge.merge import sparsify
from auto_merge.merge.methods.registry import MergeInputs, ParamSpec, ResolvedParams, register_method

DIVISOR_FLOOR = 1e-8
CONSENSUS_CHOICES = ("sum", "none")

REQUIRED_WEIGHT = ParamSpec(
    "weight", "per_model", float, required=True, doc="scale of the model's task vector; may be negative"
)
LAMBDA = ParamSpec("lambda", "global", float, default=1.0, doc="scale of the mixed task vector")
DENSITY = ParamSpec(
    "density", "per_model", float, default=1.0, low=0.0, high=1.0, low_inclusive=False,
    doc="fraction of the task vector kept; 1 keeps everything",
)
GAMMA = ParamSpec(
    "gamma", "per_model", float, default=0.01, low=0.0, high=1.0,
    doc="fraction of largest magnitudes removed (Breadcrumbs beta); values above 1-density are clipped",
)
EPSILON = ParamSpec(
    "epsilon", "per_model", float, default=0.15, low=0.0, high=0.5, high_inclusive=False,
    doc="half-width of DELLA's keep-probability window; needs 0 < density-epsilon and density+epsilon < 1",
)
COMPAT_EMPTY_SLICE = ParamSpec(
    "compat_breadcrumbs_empty_slice", "global", bool, default=False,
    doc="reproduce mergekit/FREE: when floor(gamma*n) = 0 the whole task vector is zeroed",
)


def rescale_mode_param(default: str) -> ParamSpec:
    return ParamSpec(
        "rescale_mode", "global", str, default=default, choices=sparsify.RESCALE_MODES,
        doc="rescale of kept entries: l1 (mergekit), inverse_p (papers) or none",
    )


def task_vectors(inputs: MergeInputs) -> Tensor:
    """Stacked task vectors [N, *shape]: x_i - base."""
    return torch.stack(inputs.tensors) - inputs.base


def per_model_column(values: list[float], like: Tensor) -> Tensor:
    """Per-model scalars shaped [N, 1, ..., 1] for broadcasting against a stacked tensor."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def elect_sign_mask(stacked: Tensor) -> Tensor:
    """TIES sign consensus: True where an entry's sign equals the elected sign of the sum (zeros elect +1)."""
    elected_sign = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
    return torch.sign(stacked) == elected_sign


def mix_task_vectors(weighted: Tensor, weights: list[float], consensus: str, normalize: bool) -> Tensor:
    """Step 4-5 of the GTA pipeline (without lambda): combine the weighted task vectors W_i = w_i * delta_i."""
    if consensus == "sum":
        agree = elect_sign_mask(weighted)
        mixed = torch.where(agree, weighted, 0.0).sum(dim=0)
        if normalize:
            divisor = (agree * per_model_column(weights, weighted)).sum(dim=0)
            divisor = torch.where(divisor.abs() < DIVISOR_FLOOR, 1.0, divisor)
            mixed = mixed / divisor
        return mixed
    if consensus == "none":
        mixed = weighted.sum(dim=0)
        if normalize:
            divisor = sum(weights)
            mixed = mixed / (divisor if abs(divisor) >= DIVISOR_FLOOR else 1.0)
        return mixed
    raise ValueError(f"consensus must be one of {CONSENSUS_CHOICES}, got {consensus!r}")


def finish_task_arithmetic(inputs: MergeInputs, deltas: Tensor, consensus: str) -> Tensor:
    """Weight, mix and add lambda * mixed to the base."""
    weights = inputs.per_model("weight")
    weighted = deltas * per_model_column(weights, deltas)
    mixed = mix_task_vectors(weighted, weights, consensus, inputs.param("normalize"))
    return inputs.base + inputs.param("lambda") * mixed


@dataclass(frozen=True)
class GtaVariant:
    name: str
    sparsifier: str | None
    consensus: str
    normalize_default: bool
    rescale_default: str
    summary: str


GTA_VARIANTS = (
    GtaVariant("task_arithmetic", None, "none", False, "none", "base + lambda * sum_i w_i (x_i - base)"),
    GtaVariant("ties", "magnitude", "sum", True, "none", "TIES: magnitude trim, sign election, disjoint mean"),
    GtaVariant("dare_linear", "bernoulli", "none", False, "l1", "DARE random drop, then weighted sum"),
    GtaVariant("dare_ties", "bernoulli", "sum", False, "l1", "DARE random drop, then TIES sign election (sum)"),
    GtaVariant("breadcrumbs", "magnitude_outliers", "none", False, "none", "Breadcrumbs outlier trim, weighted sum"),
    GtaVariant(
        "breadcrumbs_ties", "magnitude_outliers", "sum", False, "none", "Breadcrumbs trim with TIES sign election"
    ),
    GtaVariant("della", "della_magprune", "sum", True, "l1", "DELLA MagPrune with TIES sign election (mean)"),
    GtaVariant("della_linear", "della_magprune", "none", False, "l1", "DELLA MagPrune, then weighted sum"),
)


def sparsify_task_vectors(inputs: MergeInputs, deltas: Tensor, sparsifier: str | None) -> Tensor:
    if sparsifier is None:
        return deltas
    densities = inputs.per_model("density")
    mode = inputs.param("rescale_mode")
    if sparsifier == "magnitude":
        return sparsify.magnitude(deltas, densities, mode)
    if sparsifier == "bernoulli":
        return sparsify.bernoulli(deltas, densities, inputs.generators(), mode)
    if sparsifier == "magnitude_outliers":
        return sparsify.magnitude_outliers(
            deltas, densities, inputs.per_model("gamma"), mode, inputs.param("compat_breadcrumbs_empty_slice")
        )
    if sparsifier == "della_magprune":
        return sparsify.della_magprune(deltas, densities, inputs.per_model("epsilon"), inputs.generators(), mode)
    raise ValueError(f"unknown sparsifier {sparsifier!r}")


def check_della_window(params: ResolvedParams) -> None:
    for index, model in enumerate(params.per_model_params):
        density, epsilon = model["density"], model["epsilon"]
        if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            raise ValueError(
                f"{params.method} (model {index}): parameters 'density'={density} and 'epsilon'={epsilon} give keep "
                "probabilities outside (0, 1); allowed: 0 < density - epsilon and density + epsilon < 1 "
                "(or density = 1)"
            )


def _register_gta(variant: GtaVariant) -> None:
    params = [REQUIRED_WEIGHT, LAMBDA, ParamSpec("normalize", "global", bool, default=variant.normalize_default)]
    if variant.sparsifier is not None:
        params += [DENSITY, rescale_mode_param(variant.rescale_default)]
    if variant.sparsifier == "magnitude_outliers":
        params += [GAMMA, COMPAT_EMPTY_SLICE]
    if variant.sparsifier == "della_magprune":
        params.append(EPSILON)

    def merge(inputs: MergeInputs) -> Tensor:
        deltas = sparsify_task_vectors(inputs, task_vectors(inputs), variant.sparsifier)
        return finish_task_arithmetic(inputs, deltas, variant.consensus)

    merge.__name__ = variant.name
    merge.__doc__ = variant.summary
    register_method(
        variant.name,
        params=params,
        base_model="required",
        min_models=1,
        max_models=None,
        is_random=variant.sparsifier in ("bernoulli", "della_magprune"),
        summary=variant.summary,
        cross_check=check_della_window if variant.sparsifier == "della_magprune" else None,
    )(merge)


for _variant in GTA_VARIANTS:
    _register_gta(_variant)


# --- sce
SCE_WEIGHT_SUM_FLOOR = 1e-6
SCE_DIVISOR_FLOOR = 1e-6


@register_method(
    "sce",
    params=(
        ParamSpec(
            "select_topk", "global", float, default=1.0, low=0.0, high=1.0,
            doc="fraction of the positions with non-zero variance across models that are kept",
        ),
    ),
    base_model="required",
    min_models=1,
    max_models=None,
)
def sce(inputs: MergeInputs) -> Tensor:
    """SCE (FuseChat): select high-variance positions, weight by task-vector energy, elect signs, erase and average.

    Weights are omega_i = mean(tau_i^2) / sum_j mean(tau_j^2), taken after selection. As in mergekit, they become
    uniform when that sum is < 1e-6. Small fine-tuning deltas (RMS below ~1e-3) reach that often.
    """
    deltas = task_vectors(inputs)
    count = deltas.shape[0]
    select_topk = inputs.param("select_topk")
    if select_topk < 1:
        variance = deltas.var(dim=0, correction=0).reshape(-1)
        keep_count = sparsify.count_from_fraction(select_topk, int(torch.count_nonzero(variance)))
        if keep_count == 0:
            deltas = torch.zeros_like(deltas)
        else:
            selected = variance >= sparsify.kth_largest(variance, keep_count)
            deltas = deltas * selected.reshape(deltas.shape[1:])
    energy = deltas.pow(2).reshape(count, -1).mean(dim=1)
    total_energy = float(energy.sum())
    if abs(total_energy) < SCE_WEIGHT_SUM_FLOOR:
        model_weights = torch.full_like(energy, 1.0 / count)
    else:
        model_weights = energy / total_energy
    erased_weights = elect_sign_mask(deltas) * model_weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    merged = (deltas * erased_weights).sum(dim=0) / erased_weights.sum(dim=0).clamp_min(SCE_DIVISOR_FLOOR)
    return inputs.base + merged
