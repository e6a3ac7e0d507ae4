"""Where a tensor sits in a decoder's layer stack, read from its name (no weights, no torch)."""

from __future__ import annotations

import re

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """Decoder layer number in a tensor name (`model.layers.3.mlp.up_proj.weight` → 3), None outside the layers."""
    match = LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_key(tensor_name: str) -> tuple[str, str] | None:
    """The name around its layer number: `model.layers.3.mlp.w` → ('model.layers.', '.mlp.w')."""
    match = LAYER_PATTERN.search(tensor_name)
    if not match:
        return None
    return tensor_name[: match.start(1)], tensor_name[match.end(1):]
