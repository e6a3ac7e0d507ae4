"""Merge methods as pure per-tensor functions, registered by name (see :mod:`.registry`).

Importing this package registers every method. The modules are grouped by kind:
- ``interpolation``: linear, slerp, nuslerp, multislerp, karcher, model_stock, passthrough
- ``task_arithmetic``: task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della,
  della_linear, sce
- ``fourier``: fourier (FR-Merging)
- ``selective``: nearswap, ram, ramplus_tl, arcee_fusion (mergekit 0.1.5)
"""

from auto_merge.merge.methods import fourier, interpolation, selective, task_arithmetic  # noqa: F401  (registration)
from auto_merge.merge.methods.registry import (
    METHODS,
    MergeInputs,
    MethodSpec,
    ParamSpec,
    ResolvedParams,
    common_submatrix,
    get_method,
    list_methods,
    merge_tensor,
    register_method,
    validate_params,
)

__all__ = [
    "METHODS",
    "MergeInputs",
    "MethodSpec",
    "ParamSpec",
    "ResolvedParams",
    "common_submatrix",
    "get_method",
    "list_methods",
    "merge_tensor",
    "register_method",
    "validate_params",
]
