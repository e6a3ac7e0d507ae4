"""Experiment configs: YAML with `!include`, a typed pydantic schema, and model cross-checks that read only
`config.json` and safetensors headers. Every problem is a ConfigError naming file, line, key path and allowed values.

No torch/transformers imports here: the CLI must start fast.
"""

from auto_merge.config.checks import check_experiment_models
from auto_merge.config.errors import ConfigError, ConfigProblem, Location, SourceMap
from auto_merge.config.loader import load_experiment, load_yaml_with_includes
from auto_merge.config.schema import (
    MERGE_METHODS,
    METHOD_PARAMETER_NAMES,
    STRATEGY_NAMES,
    TASK_OVERRIDE_KEYS,
    DisBlock,
    EvaluationSettings,
    EvaluationTask,
    ExperimentConfig,
    GlobalParams,
    LfsBlock,
    NormalModelsBlock,
    NormalSlicesBlock,
    PruneBlock,
    SearchRange,
    Slice,
    validate_experiment_data,
)

__all__ = [
    "ConfigError", "ConfigProblem", "Location", "SourceMap",
    "load_experiment", "load_yaml_with_includes", "validate_experiment_data", "check_experiment_models",
    "ExperimentConfig", "GlobalParams", "EvaluationSettings", "EvaluationTask",
    "LfsBlock", "DisBlock", "PruneBlock", "NormalModelsBlock", "NormalSlicesBlock", "Slice", "SearchRange",
    "STRATEGY_NAMES", "MERGE_METHODS", "METHOD_PARAMETER_NAMES", "TASK_OVERRIDE_KEYS",
]
