"""Fixtures shared by the test modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Noise added to every tensor of every expert by `diverse_zoo`, relative to the tensor's RMS.
DIVERSE_NOISE = 0.2


@pytest.fixture(scope="session")
def diverse_zoo_root(tmp_path_factory) -> Path:
    """A copy of the shipped zoo (laid out like `auto_merge/zoo/shipped/`: `seed0/<model>`) whose experts differ from
    the base and from each other in every tensor.

    The shipped experts differ from the base only where the zoo's design puts their change (the same drift in
    layers 4-5, their own embedding rows; docs/zoo.md), so on most tensors their task vectors are zero or equal. Merge
    tests that compare outputs with closed forms need tensors where every source differs, or a wrong weight, source or
    layer would go unnoticed: here each expert gets seeded Gaussian noise (20 % of each tensor's RMS) on every tensor.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from auto_merge.zoo.paths import SHIPPED_ROOT, ZOO_MODEL_NAMES

    root = tmp_path_factory.mktemp("diverse_zoo")
    shipped, copy = SHIPPED_ROOT / "seed0", root / "seed0"
    shutil.copytree(shipped, copy)
    for index, name in enumerate(ZOO_MODEL_NAMES):
        if name == "base":
            continue
        weights = copy / name / "model.safetensors"
        state = load_file(weights)
        generator = torch.Generator().manual_seed(1000 + index)
        for key in sorted(state):
            tensor = state[key]
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            state[key] = tensor + DIVERSE_NOISE * tensor.float().pow(2).mean().sqrt() * noise
        save_file(state, weights, metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def diverse_zoo(diverse_zoo_root):
    """Within the module, `zoo:NAME` and `zoo_root(0)` resolve to `diverse_zoo_root`'s zoo; yields its folder."""
    from auto_merge.zoo import paths

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(paths, "SHIPPED_ROOT", diverse_zoo_root)
        yield diverse_zoo_root / "seed0"
