"""Applying a registered merge method to tensors: :func:`merge_tensor`, the uniform per-tensor entry point, and
:class:`MergeInputs`, what a method function receives. The specs and the registry are torch-free (:mod:`.spec`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from auto_merge.merge.methods.spec import ResolvedParams, get_method, validate_params
from auto_merge.merge.sparsify import derive_generator


@dataclass(frozen=True)
class MergeInputs:
    """What a method function receives: fp32 tensors on one device, resolved parameters and the random context."""

    tensors: tuple[Tensor, ...]
    base: Tensor | None
    params: ResolvedParams
    seed: int = 0
    tensor_name: str = ""
    # Where the method may write its fp32 result (same shape and device as the inputs, contiguous, sharing no memory
    # with them); None: allocate. A method that ignores it is fine: merge_tensor copies its result in.
    out: Tensor | None = None

    def param(self, name: str) -> Any:
        return self.params.global_params[name]

    def per_model(self, name: str) -> list[Any]:
        return self.params.per_model(name)

    def generator(self, model_index: int) -> torch.Generator:
        """The stable per-(seed, tensor name, model index) generator for random methods."""
        device = (self.base if self.base is not None else self.tensors[0]).device
        return derive_generator(self.seed, self.tensor_name, model_index, device)

    def generators(self) -> list[torch.Generator]:
        return [self.generator(index) for index in range(len(self.tensors))]



def common_submatrix(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Truncate tensors of equal rank to their common leading block ``[min rows, min cols, ...]``.

    This is mergekit's rule for inputs of different vocabulary sizes, meant for embeddings (``embed_tokens``, ``lm_head``) when no
    tokenizer alignment is configured. The method layer does not know which tensors are embeddings, so the engine
    calls this explicitly and logs it. Views are returned and nothing is copied.
    """
    if not tensors:
        return []
    ranks = {tensor.dim() for tensor in tensors}
    if len(ranks) != 1:
        raise ValueError(f"cannot truncate tensors of different rank: shapes {[tuple(t.shape) for t in tensors]}")
    common = [min(sizes) for sizes in zip(*(tensor.shape for tensor in tensors))]
    return [tensor[tuple(slice(0, size) for size in common)] for tensor in tensors]


def _as_fp32(tensor: Tensor, label: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{label} must be a floating-point tensor, got {tensor.dtype}")
    return tensor.to(torch.float32)


def merge_tensor(
    method_name: str,
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    global_params: Mapping[str, Any] | None = None,
    per_model_params: Sequence[Mapping[str, Any] | None] | None = None,
    *,
    seed: int = 0,
    tensor_name: str = "",
    out: Tensor | None = None,
) -> Tensor:
    """Merge one tensor name across models and return the fp32 result on the inputs' device.

    ``tensors`` are the non-base models' tensors in config order. ``per_model_params`` gives one dict per entry of
    ``tensors``; None or an empty sequence means defaults for all of them. ``seed`` and ``tensor_name`` seed random
    methods. All tensors must have the same shape and device; for embeddings of different vocab sizes, apply
    :func:`common_submatrix` first. ``out`` (optional, of the inputs' shape, any floating dtype): the result is written
    there (cast to its dtype) and ``out`` is returned; an fp32 ``out`` that shares no memory with the inputs is
    handed to the method, which may compute straight into it (no result-sized allocation).
    """
    spec = get_method(method_name)
    tensors = list(tensors)
    if not per_model_params:  # None or empty: every model takes the defaults (and global_params' per-model values)
        per_model_params = [{} for _ in tensors]
    if len(per_model_params) != len(tensors):
        raise ValueError(
            f"{method_name}: got {len(tensors)} tensors but {len(per_model_params)} per-model parameter dicts"
        )
    if base is None and spec.base_model == "required":
        raise ValueError(f"{method_name}: requires a base model tensor")
    if base is not None and spec.base_model == "none":
        raise ValueError(
            f"{method_name}: does not take a base model; pass base=None "
            "(list the base among `tensors`, with its own parameters, if it should contribute)"
        )
    params = validate_params(method_name, global_params, per_model_params)

    inputs = [_as_fp32(tensor, f"{method_name}: tensor {index}") for index, tensor in enumerate(tensors)]
    base_fp32 = _as_fp32(base, f"{method_name}: base") if base is not None else None
    reference = base_fp32 if base_fp32 is not None else inputs[0]
    for index, tensor in enumerate(inputs):
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{method_name}: tensor {index} of {tensor_name or 'this tensor'} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(reference.shape)}; truncate embeddings with common_submatrix() or skip the model"
            )
        if tensor.device != reference.device:
            raise ValueError(f"{method_name}: tensor {index} is on {tensor.device}, expected {reference.device}")

    if out is not None and tuple(out.shape) != tuple(reference.shape):
        raise ValueError(f"{method_name}: out has shape {tuple(out.shape)}, expected {tuple(reference.shape)}")
    scratch = None
    if out is not None and out.dtype == torch.float32 and out.is_contiguous() and out.device == reference.device \
            and not any(_shares_memory(out, tensor) for tensor in (*inputs, base_fp32) if tensor is not None):
        scratch = out
    result = spec.function(
        MergeInputs(tensors=tuple(inputs), base=base_fp32, params=params, seed=seed, tensor_name=tensor_name,
                    out=scratch)
    )
    if out is None:
        return result.to(torch.float32)
    if result is not out:
        out.copy_(result)
    return out


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors' storages overlap (conservative: whole storages are compared)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.data_ptr() < sb.data_ptr() + sb.nbytes() and sb.data_ptr() < sa.data_ptr() + sa.nbytes()
