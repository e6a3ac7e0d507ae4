"""Experiment configs: YAML with `!include`, a typed pydantic schema, and model cross-checks that read only
`config.json` and safetensors headers. Every problem is a ConfigError naming file, line, key path and allowed values.

No torch/transformers imports here: the CLI must start fast.
"""

from auto_merge.config.checks import check_experiment_models
from auto_merge.config.errors import ConfigError, ConfigProblem, Location, SourceMap
from auto_merge.config.loader import load_experiment, load_yaml_with_includes
from auto_merge.config.blocks import SearchRange, SearchSettings, StrictModel
from auto_merge.config.schema import (
    TASK_OVERRIDE_KEYS,
    EvaluationSettings,
    EvaluationTask,
    ExperimentConfig,
    GlobalParams,
    strategy_names,
    validate_experiment_data,
)

__all__ = [
    "ConfigError", "ConfigProblem", "Location", "SourceMap",
    "load_experiment", "load_yaml_with_includes", "validate_experiment_data", "check_experiment_models",
    "ExperimentConfig", "GlobalParams", "EvaluationSettings", "EvaluationTask",
    "SearchRange", "SearchSettings", "StrictModel", "strategy_names", "TASK_OVERRIDE_KEYS",
]
