"""Task-vector methods: the generalized task arithmetic (GTA) family and sce, with the semantics of mergekit's
generalized_task_arithmetic.py and sparsify.py.

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

from dataclasses import replace
from typing import TYPE_CHECKING

from auto_merge.merge.methods.gta_variants import DIVISOR_FLOOR, GTA_VARIANTS, GtaVariant
from auto_merge.merge.methods.spec import (
    MEMORY_ONLY_PARAMS,
    RESCALE_MODES,
    Alias,
    ParamSpec,
    ResolvedParams,
    Searched,
    register_method,
)

if TYPE_CHECKING:  # torch is imported inside the functions, so that reading the specs needs no torch
    import torch
    from torch import Tensor

    from auto_merge.merge.methods.apply import MergeInputs

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
        "rescale_mode", "global", str, default=default, choices=RESCALE_MODES,
        doc="rescale of kept entries: l1 (mergekit), inverse_p (papers) or none",
    )


def task_vectors(inputs: MergeInputs) -> Tensor:
    """Stacked task vectors [N, *shape]: x_i - base."""
    import torch
    return torch.stack(inputs.tensors) - inputs.base


def elect_sign_mask(stacked: Tensor) -> Tensor:
    """TIES sign consensus: True where an entry's sign equals the elected sign of the sum (zeros elect +1)."""
    import torch
    elected_sign = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
    return torch.sign(stacked) == elected_sign


# --- the fused, chunked GTA pipeline
# On the CPU every step runs over chunks of this many elements, in buffers allocated once per tensor: the temporaries
# stay in cache and no step allocates (a fresh 100 MB tensor costs more in page faults than the arithmetic on it).
# On CUDA a chunk is the whole tensor: the device has the bandwidth, and its random streams depend on the call
# shape, so drawing per chunk would change DARE/DELLA masks.
CPU_CHUNK_ELEMENTS = 1 << 17


def chunk_elements(numel: int, device: torch.device) -> int:
    return max(1, numel if device.type != "cpu" else min(numel, CPU_CHUNK_ELEMENTS))


def mix_chunk(weighted: Tensor, weights: list[float], weight_column: Tensor, consensus: str, normalize: bool,
              out: Tensor) -> Tensor:
    """Step 4-5 of the GTA pipeline (without lambda) on one chunk of stacked W_i = w_i * delta_i ([N, L]).

    ``weighted`` is used as scratch; ``weight_column`` is ``weights`` as an fp32 [N, 1] column. Writes the mix into
    ``out`` ([L]). The sums run over the same [N, L] layout as the stacked form, so they round alike, and masks are
    fp32 0/1 values rather than booleans (comparisons into bool tensors and torch.where are several times slower).
    """
    import torch
    if consensus == "none":
        torch.sum(weighted, dim=0, out=out)
        if normalize:
            divisor = sum(weights)
            out.div_(divisor if abs(divisor) >= DIVISOR_FLOOR else 1.0)
        return out
    if consensus != "sum":
        raise ValueError(f"consensus must be one of {CONSENSUS_CHOICES}, got {consensus!r}")
    # Elected sign s = +1 where sum_i W_i >= 0, else -1. copysign gives -1 for a sum of -0.0, which needs every W_i
    # to be zero, and then no entry agrees either way.
    total = torch.sum(weighted, dim=0, out=out)
    elected = torch.copysign(torch.ones_like(total), total)
    # t_i = s * W_i > 0 exactly where sign(W_i) == s, and sum_i W_i [agree] = s * sum_i relu(t_i) (negation is exact).
    aligned = weighted.mul_(elected)
    agree = torch.gt(aligned, 0, out=torch.empty_like(aligned)) if normalize else None
    torch.sum(aligned.clamp_min_(0), dim=0, out=out).mul_(elected)
    if normalize:
        divisor = torch.sum(agree.mul_(weight_column), dim=0, out=elected)
        # divisor = 1 where |divisor| < floor: divisor * usable + (1 - usable), with usable a 0/1 float.
        usable = torch.ge(divisor.abs(), DIVISOR_FLOOR, out=agree[0])
        divisor.mul_(usable).add_(usable.neg_().add_(1))
        out.div_(divisor)
    return out


def gta_merge(
    inputs: MergeInputs,
    consensus: str,
    *,
    sparsifier: str | None = None,
    deltas: Tensor | None = None,
) -> Tensor:
    """The GTA pipeline for one tensor: out = base + lambda * mix_i(w_i * sparsify(x_i - base)).

    ``deltas`` ([N, *shape]) replaces x_i - base when the task vectors were transformed first (fourier).
    Nothing of size [N, *shape] is allocated on the CPU: task vectors are rebuilt chunk by chunk. On CUDA with Triton,
    the TIES, DARE, Breadcrumbs and DELLA variants run as fused kernels (:mod:`auto_merge.merge.fused_gta`), whose
    random masks come from Philox counters rather than the CUDA generator.
    """
    import torch

    from auto_merge.merge.chunked_sparsify import ChunkedSparsifier
    base = inputs.base.contiguous()
    shape, device, numel = base.shape, base.device, base.numel()
    models = len(inputs.tensors)
    if deltas is None and base.is_cuda:
        from auto_merge.merge import fused_gta  # imports this module

        if inputs.params.method in fused_gta.KERNEL_METHODS and fused_gta.available(device):
            return fused_gta.gta_merge_fused(inputs.params.method, inputs.params, base,
                                             [tensor.contiguous() for tensor in inputs.tensors], out=inputs.out,
                                             seed=inputs.seed, tensor_name=inputs.tensor_name)
    out = inputs.out if inputs.out is not None else torch.empty_like(base)
    if numel == 0:
        return out
    base_flat, out_flat = base.view(-1), out.view(-1)
    if deltas is not None:
        delta_flats = deltas.reshape(models, -1)

        def task_vector(index: int, start: int, end: int, target: Tensor) -> Tensor:
            return target.copy_(delta_flats[index, start:end])

        def task_vector_sample(index: int, stride: int) -> Tensor:
            return delta_flats[index, ::stride].clone()
    else:
        model_flats = [tensor.contiguous().view(-1) for tensor in inputs.tensors]

        def task_vector(index: int, start: int, end: int, target: Tensor) -> Tensor:
            return torch.sub(model_flats[index][start:end], base_flat[start:end], out=target)

        def task_vector_sample(index: int, stride: int) -> Tensor:
            return model_flats[index][::stride] - base_flat[::stride]

    step = chunk_elements(numel, device)
    trimmer = None
    if sparsifier is not None:
        trimmer = ChunkedSparsifier(
            sparsifier, shape, device, task_vector, task_vector_sample,
            densities=inputs.per_model("density"),
            rescale_mode=inputs.param("rescale_mode"),
            gammas=inputs.per_model("gamma") if sparsifier == "magnitude_outliers" else None,
            epsilons=inputs.per_model("epsilon") if sparsifier == "della_magprune" else None,
            generators=inputs.generators() if sparsifier in ("bernoulli", "della_magprune") else None,
            compat_empty_slice=sparsifier == "magnitude_outliers" and inputs.param("compat_breadcrumbs_empty_slice"),
            chunk_elements=step,
        )
        step = trimmer.chunk_elements_for_kind()
    weights = inputs.per_model("weight")
    weight_column = torch.tensor(weights, dtype=torch.float32, device=device).reshape(-1, 1)
    rescale = trimmer.rescale_column() if trimmer is not None else None
    rescale_column = None
    if rescale is not None and any(value != 1.0 for value in rescale[1]):
        rescale_column = torch.tensor(rescale[1], dtype=torch.float32, device=device).reshape(-1, 1)
    normalize, scale = inputs.param("normalize"), inputs.param("lambda")

    buffer = torch.empty(models, min(step, numel), dtype=torch.float32, device=device)
    mixed_buffer = torch.empty(min(step, numel), dtype=torch.float32, device=device)
    for start in range(0, numel, step):
        end = min(start + step, numel)
        weighted, mixed = buffer[:, : end - start], mixed_buffer[: end - start]
        for index in range(models):
            task_vector(index, start, end, weighted[index])
            if trimmer is not None:
                trimmer.apply(index, start, end, weighted[index])
        if rescale_column is not None:
            if rescale[0] == "mul":
                weighted.mul_(rescale_column)
            else:
                weighted.div_(rescale_column)
        weighted.mul_(weight_column)
        mix_chunk(weighted, weights, weight_column, consensus, normalize, mixed)
        torch.add(base_flat[start:end], mixed.mul_(scale), out=out_flat[start:end])
    return out


def finish_task_arithmetic(inputs: MergeInputs, deltas: Tensor, consensus: str) -> Tensor:
    """Weight, mix and add lambda * mixed to the base, for already computed task vectors ``deltas``."""
    return gta_merge(inputs, consensus, deltas=deltas)


def check_della_window(params: ResolvedParams) -> None:
    for index, model in enumerate(params.per_model_params):
        density, epsilon = model["density"], model["epsilon"]
        if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            raise ValueError(
                f"{params.method} (model {index}): parameters 'density'={density} and 'epsilon'={epsilon} give keep "
                "probabilities outside (0, 1); allowed: 0 < density - epsilon and density + epsilon < 1 "
                "(or density = 1)"
            )


# The reference implementation's spellings (its configs and recipes): λ as scaling_coefficient, and TIES's trim as the
# mask rate r = 1 - density.
REFERENCE_LAMBDA = Alias("scaling_coefficient")
REFERENCE_MASK_RATE = Alias("param_value_mask_rate", complement=True)
# How LFS searches the GTA family: one density and one λ per group and parameter family, each expert at weight 1.
SEARCHED_DENSITY = Searched(default=(0.1, 1.0))
SEARCHED_LAMBDA = Searched(default=(0.0, 2.0))
# DELLA keeps entries with probability density ± epsilon, which must stay inside (0, 1).
DELLA_DENSITY_MARGIN = EPSILON.default + 1e-3
SEARCHED_DELLA_DENSITY = Searched(default=(0.2, 0.8), clip=(DELLA_DENSITY_MARGIN, 1.0 - DELLA_DENSITY_MARGIN))


def _gta_params(variant: GtaVariant) -> list[ParamSpec]:
    lam = replace(LAMBDA, searched=SEARCHED_LAMBDA)
    density = replace(DENSITY, searched=SEARCHED_DELLA_DENSITY if variant.sparsifier == "della_magprune"
                      else SEARCHED_DENSITY)
    if variant.name == "task_arithmetic":
        # LFS searches one weight per expert within the range given for λ (the reference searched one λ), λ fixed 1.
        weight = replace(REQUIRED_WEIGHT, searched=Searched(default=(0.0, 1.5), per_expert=True,
                                                            range_keys=("scaling_coefficient", "lambda")))
        lam = replace(LAMBDA, aliases=(REFERENCE_LAMBDA,))
        return [weight, lam, ParamSpec("normalize", "global", bool, default=variant.normalize_default)]
    if variant.name == "ties":
        lam = replace(lam, aliases=(REFERENCE_LAMBDA,))
        density = replace(density, aliases=(REFERENCE_MASK_RATE,))
    params = [REQUIRED_WEIGHT, lam, ParamSpec("normalize", "global", bool, default=variant.normalize_default),
              density, rescale_mode_param(variant.rescale_default)]
    if variant.sparsifier == "magnitude_outliers":
        params += [GAMMA, COMPAT_EMPTY_SLICE]
    if variant.sparsifier == "della_magprune":
        params.append(EPSILON)
    return params


def _register_gta(variant: GtaVariant) -> None:
    def merge(inputs: MergeInputs) -> Tensor:
        return gta_merge(inputs, variant.consensus, sparsifier=variant.sparsifier)

    merge.__name__ = variant.name
    merge.__doc__ = variant.summary
    register_method(
        variant.name,
        params=_gta_params(variant),
        base_model="required",
        min_models=1,
        max_models=None,
        is_random=variant.sparsifier in ("bernoulli", "della_magprune"),
        summary=variant.summary,
        cross_check=check_della_window if variant.sparsifier == "della_magprune" else None,
        search_fixed={"lambda": 1.0} if variant.sparsifier is None else {"weight": 1.0},
        ignored_params=MEMORY_ONLY_PARAMS,
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
            searched=Searched(default=(0.1, 1.0)),
        ),
    ),
    base_model="required",
    min_models=1,
    max_models=None,
    ignored_params=MEMORY_ONLY_PARAMS,
)
def sce(inputs: MergeInputs) -> Tensor:
    """SCE (FuseChat): select high-variance positions, weight by task-vector energy, elect signs, erase and average.

    Weights are omega_i = mean(tau_i^2) / sum_j mean(tau_j^2), taken after selection. As in mergekit, they become
    uniform when that sum is < 1e-6. Small fine-tuning deltas (RMS below ~1e-3) reach that often.
    """
    import torch
    from auto_merge.merge import sparsify
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
