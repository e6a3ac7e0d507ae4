"""Merge methods as pure per-tensor functions, each declared once with its spec (:mod:`.spec`).

Importing this package registers every built-in method and the methods of installed plugins (the ``auto_merge.methods``
entry-point group: a module that calls :func:`register_method`; see docs/extending.md). The built-in modules:
- ``interpolation``: linear, slerp, nuslerp, multislerp, karcher, model_stock, passthrough
- ``task_arithmetic``: task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della,
  della_linear, sce
- ``fourier``: fourier (FR-Merging)
- ``selective``: nearswap, ram, ramplus_tl, arcee_fusion (mergekit 0.1.5)

Reading specs needs no torch: the method modules import it inside their functions. :func:`merge_tensor` (which
applies a method to tensors) and :class:`MergeInputs` come from :mod:`.apply`, imported on first use.
"""

from auto_merge.merge.methods import fourier, interpolation, selective, task_arithmetic  # noqa: F401  (registration)
from auto_merge.merge.methods.spec import (
    METHODS,
    Alias,
    MethodSpec,
    ParamError,
    ParamSpec,
    ResolvedParams,
    Searched,
    get_method,
    list_methods,
    register_method,
    validate_params,
)
from auto_merge.plugins import load_plugins

load_plugins("auto_merge.methods")

TORCH_NAMES = ("MergeInputs", "common_submatrix", "merge_tensor")  # from .apply, on first use


def __getattr__(name: str):
    """The torch side (:mod:`.apply`) on first use, so that reading specs does not import torch."""
    if name in TORCH_NAMES:
        from auto_merge.merge.methods import apply

        return getattr(apply, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "Alias",
    "MergeInputs",
    "MethodSpec",
    "ParamError",
    "ParamSpec",
    "ResolvedParams",
    "Searched",
    "common_submatrix",
    "get_method",
    "list_methods",
    "merge_tensor",
    "register_method",
    "validate_params",
]
