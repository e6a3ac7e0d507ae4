"""Model references (hub id, local folder, zoo:NAME, alias) → local folders, and model metadata read without
loading weights (config.json, safetensors headers)."""

from auto_merge.models.inspect import (
    ModelInfo,
    ModelInspectionError,
    inspect_model,
    list_tensor_names,
    model_depth,
    read_model_config,
    read_safetensors_header,
)
from auto_merge.models.resolve import ModelResolutionError, resolve_model_ref

__all__ = [
    "ModelInfo", "ModelInspectionError", "ModelResolutionError", "inspect_model", "list_tensor_names",
    "model_depth", "read_model_config", "read_safetensors_header", "resolve_model_ref",
]
