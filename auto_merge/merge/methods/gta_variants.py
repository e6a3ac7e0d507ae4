"""The generalized task arithmetic (GTA) family as data: each variant's name, sparsifier, sign consensus and defaults.
The method implementations (:mod:`.task_arithmetic`) and the fused CUDA kernels (:mod:`auto_merge.merge.fused_gta`)
both read it, so neither imports the other's module for it.
"""

from __future__ import annotations

from dataclasses import dataclass

# A divisor (sum of weights) of smaller magnitude is replaced by 1.
DIVISOR_FLOOR = 1e-8


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
