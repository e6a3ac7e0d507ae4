"""The in-memory merge path: source weights stay resident and each candidate is written into a live model in place.

A search evaluates hundreds of candidates over the same sources, so the sources are read once and every candidate
is materialised straight into the parameters of one live `transformers` model: no checkpoint is written, no model is
re-instantiated, and the evaluator wrapping that model sees the new weights on its next call.

A candidate is given as a *tensor plan*: for each tensor name, which method merges it and with which parameters.
Recipes (slices, layer groups, filters) compile into such plans.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from auto_merge.merge.methods import get_method, merge_tensor

_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """Decoder layer number in a tensor name (`model.layers.3.mlp.up_proj.weight` -> 3), None outside the layers."""
    match = _LAYER_INDEX.search(tensor_name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is merged: a registered method with its global and per-model parameters."""

    method: str
    global_params: dict = field(default_factory=dict)
    per_model_params: tuple[dict, ...] = ()


TensorPlan = Callable[[str], TensorSpec]


class ResidentSources:
    """Base and expert tensors by name, read once from safetensors and kept in fp32 on one device."""

    def __init__(self, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]):
        names = set(base)
        for i, expert in enumerate(experts):
            if set(expert) != names:
                diff = sorted(names.symmetric_difference(expert))[:5]
                raise ValueError(f"expert {i} does not have the base model's tensors (first differences: {diff})")
        self.base = base
        self.experts = experts
        self.names = sorted(names)

    @classmethod
    def from_checkpoints(cls, base_path: str | Path, expert_paths: list[str | Path], device: str = "cpu"):
        return cls(read_state(base_path, device), [read_state(p, device) for p in expert_paths])


def read_state(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint folder (single file or sharded with an index), as fp32."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=device) as handle:
            for name in handle.keys():
                state[name] = handle.get_tensor(name).to(torch.float32)
    return state


@torch.no_grad()
def materialise_into(model: torch.nn.Module, sources: ResidentSources, plan: TensorPlan, seed: int = 0) -> None:
    """Overwrite `model`'s weights in place with the merge `plan` describes."""
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    for name in sources.names:
        if name not in targets:
            raise KeyError(f"the live model has no tensor named {name!r}")
        spec = plan(name)
        takes_base = get_method(spec.method).base_model != "none"
        merged = merge_tensor(
            spec.method,
            [expert[name] for expert in sources.experts],
            sources.base[name] if takes_base else None,
            spec.global_params,
            list(spec.per_model_params),
            seed=seed,
            tensor_name=name,
        )
        target = targets[name]
        target.copy_(merged.to(device=target.device, dtype=target.dtype))
