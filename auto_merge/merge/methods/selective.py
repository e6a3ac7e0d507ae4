"""Methods that decide per element how much of the other models' change to keep, with mergekit 0.1.5's semantics:
nearswap, ram, ramplus_tl and arcee_fusion (mergekit ``merge_methods/nearswap.py``, ``ram.py``, ``arcee_fusion.py``).

All four take a required base model. Like every method here they compute in fp32; mergekit computes in the config
``dtype`` (the inputs' promoted dtype when none is set), so bf16/fp16 parity is only approximate. The expressions
keep mergekit's order of operations, so fp32 results agree with it to the last bit on the deterministic paths.

Parameter ranges are stricter than mergekit's (it accepts any number): values for which the method is undefined or
degenerate (negative thresholds, ``ramplus_tl`` with ``epsilon = 0``, which divides 0 by 0 and spreads NaN) raise
ValueError here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from auto_merge.merge.methods.spec import ParamSpec, Searched, register_method

if TYPE_CHECKING:  # torch is imported inside the functions, so that reading the specs needs no torch
    from torch import Tensor

    from auto_merge.merge.methods.apply import MergeInputs

# --- nearswap
NEARSWAP_DIFF_FLOOR = 1e-6


@register_method(
    "nearswap",
    params=(
        ParamSpec(
            "t", "global", float, required=True, low=0.0,
            doc="distance below which the other model's value is taken whole; farther entries get t/|base-other|",
            searched=Searched(default=(0.0, 0.01)),
        ),
    ),
    base_model="required",
    min_models=1,
    max_models=1,
)
def nearswap(inputs: MergeInputs) -> Tensor:
    """NearSwap: per element w = clamp(t / max(|base - other|, 1e-6), 0, 1) and out = w*other + (1-w)*base.

    Entries where the two models are close (|base - other| <= t) take the other model's value; the farther apart
    they are, the closer the result stays to the base. t = 0 returns the base.
    """
    import torch
    t = inputs.param("t")
    base, other = inputs.base, inputs.tensors[0]
    distance = torch.abs(base - other).clamp_(min=NEARSWAP_DIFF_FLOOR)
    weight = (t / distance).clamp_(min=0, max=1)  # t / tensor, as in mergekit (reciprocal times t)
    return weight * other + (1 - weight) * base


# --- ram, ramplus_tl
def _kept_task_vectors(inputs: MergeInputs, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """(task vectors [N, L] with entries |delta| <= epsilon zeroed, kept mask [N, L], contributor counts [L])."""
    import torch
    base = inputs.base
    deltas = torch.stack([tensor - base for tensor in inputs.tensors]).reshape(len(inputs.tensors), -1)
    kept = deltas.abs() > epsilon
    counts = kept.sum(dim=0)
    deltas.mul_(kept)
    return deltas, kept, counts


RAM_EPSILON_DEFAULT = 1e-5


@register_method(
    "ram",
    params=(
        ParamSpec(
            "epsilon", "global", float, default=RAM_EPSILON_DEFAULT, low=0.0,
            doc="an entry of a task vector counts (contributes) when its magnitude is above this",
            searched=Searched(default=(0.0, 0.01)),
        ),
    ),
    base_model="required",
    min_models=1,
    max_models=None,
)
def ram(inputs: MergeInputs) -> Tensor:
    """Reinforced Agent Merging: per element, the mean of the task-vector entries with |delta_i| > epsilon.

    out = base + sum_i delta_i [|delta_i| > eps] / max(c, 1), with c the number of models whose entry counts.
    An entry only one model changes is taken whole (not diluted by the others' zeros); one no model changes stays
    at the base. Weights are not used (mergekit has none).
    """
    deltas, _, counts = _kept_task_vectors(inputs, inputs.param("epsilon"))
    merged = deltas.div_(counts.clamp(min=1)).sum(dim=0)
    return inputs.base + merged.reshape(inputs.base.shape)


@register_method(
    "ramplus_tl",
    params=(
        ParamSpec("r", "global", float, default=0.1, low=0.0, doc="strength of the boost of unique entries",
                  searched=Searched(default=(0.0, 1.0))),
        ParamSpec("alpha", "global", float, default=0.2, low=0.0, doc="cap on the shared/unique ratio rho",
                  searched=Searched(default=(0.0, 1.0))),
        ParamSpec(
            "epsilon", "global", float, default=RAM_EPSILON_DEFAULT, low=0.0, low_inclusive=False,
            doc="contribution threshold on |delta|; also the floor of the unique count in rho",
        ),
    ),
    base_model="required",
    min_models=1,
    max_models=None,
)
def ramplus_tl(inputs: MergeInputs) -> Tensor:
    """RAM+ (tensor-local): RAM, with each model's unique entries scaled by lambda_i = 1 + r * clamp(rho_i, 0, alpha).

    rho_i = shared_i / max(unique_i, epsilon), counted over this tensor: shared_i is the number of model i's counting
    entries that other models change too, unique_i the number only model i changes. Entries changed by several
    models are averaged as in ram.
    """
    import torch
    r, alpha, epsilon = inputs.param("r"), inputs.param("alpha"), inputs.param("epsilon")
    deltas, kept, counts = _kept_task_vectors(inputs, epsilon)
    unique = counts == 1
    shared_counts = (kept & (counts > 1)).sum(dim=1)
    unique_counts = (kept & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)  # fp32, as in mergekit
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    terms = torch.where(unique, deltas * boost.unsqueeze(-1), deltas / counts.clamp(min=1))
    return inputs.base + terms.sum(dim=0).reshape(inputs.base.shape)


# --- arcee_fusion
FUSION_SOFTMAX_EPS = 1e-8
FUSION_QUANTILE_SAMPLE = 1_000_000
FUSION_QUANTILES = (0.25, 0.5, 0.75)
FUSION_IQR_FACTOR = 1.5


def fusion_importance(other: Tensor, base: Tensor) -> Tensor:
    """|other - base| times the KL divergence KL(softmax(other) || softmax(base)) of its slice along the last dim."""
    import torch
    import torch.nn.functional as F
    p = F.softmax(other, dim=-1) + FUSION_SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + FUSION_SOFTMAX_EPS
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * divergence


@register_method(
    "arcee_fusion",
    params=(),
    base_model="required",
    min_models=1,
    max_models=1,
    is_random=True,
)
def arcee_fusion(inputs: MergeInputs) -> Tensor:
    """Arcee Fusion: keep the other model's change only where its importance is an upper outlier.

    importance = |delta| * KL(softmax(other) || softmax(base)) per slice along the last dim; the threshold is
    median + 1.5 * (q3 - q1) of the importance over the tensor, quantiles taken as sorted[floor(q * (n - 1))]
    (no interpolation); out = base + delta * [importance >= threshold]. Random only for tensors of more than 10^6
    elements: there the quantiles come from 10^6 entries drawn with replacement (the per-tensor generator here,
    torch's global generator in mergekit, so such tensors are not bit-comparable).
    """
    import torch
    base, other = inputs.base, inputs.tensors[0]
    if base.numel() == 0:
        return base.clone()
    importance = fusion_importance(other, base)
    flat = importance.reshape(-1)
    if flat.numel() > FUSION_QUANTILE_SAMPLE:
        picks = torch.randint(flat.numel(), (FUSION_QUANTILE_SAMPLE,), generator=inputs.generator(0),
                              device=flat.device)
        flat = flat[picks]
    ordered = torch.sort(flat).values
    # mergekit's indices: (fp32 q * (n - 1)).long(), i.e. floor; exact in fp32 for n <= 10^6.
    positions = (torch.tensor(FUSION_QUANTILES, device=ordered.device) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[positions]
    threshold = median + FUSION_IQR_FACTOR * (q3 - q1)
    mask = (importance >= threshold).float()
    return base + (other - base) * mask
