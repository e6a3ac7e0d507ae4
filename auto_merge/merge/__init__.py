"""Merge methods: a registry of pure per-tensor merge functions (no files, search or evaluation here).

Entry point::

    merge_tensor(method_name, tensors, base=None, global_params=None, per_model_params=None,
                 *, seed=0, tensor_name="") -> torch.Tensor   # fp32, on the inputs' device

``tensors`` are the non-base models' tensors of one name, in config order. ``per_model_params`` holds one dict per
entry of ``tensors``. Parameters are checked against the method's :class:`MethodSpec` by :func:`validate_params`,
which raises ValueError naming the parameter and its allowed values. Random methods (dare_*, della*) seed one
generator per (seed, tensor_name, model index), so the order tensors are processed in does not matter. Math runs in
fp32 and the caller casts the result to the output dtype.
"""

from auto_merge.merge.methods import (
    METHODS,
    MethodSpec,
    ParamSpec,
    ResolvedParams,
    get_method,
    list_methods,
    register_method,
    validate_params,
)


def __getattr__(name: str):
    """merge_tensor, MergeInputs and common_submatrix import torch: loaded on first use."""
    from auto_merge.merge import methods

    if name in methods.TORCH_NAMES:
        return getattr(methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
