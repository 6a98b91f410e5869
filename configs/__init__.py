"""Experiment configs: typed dataclasses (schema.py, checked as validation.py says), YAML files that inherit
(loading.py), and one YAML per experiment in this folder."""

from configs.loading import CONFIG_DIR, apply_overrides, changes, load_config, load_file, resolve_config_path
from configs.schema import (
    DAC_FRAME_RATE,
    DAC_N_CODEBOOKS,
    DEFAULT_TRACKING_URI,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    GenerationConfig,
    MLflowConfig,
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
    TuneConfig,
)
from configs.validation import ConfigError

__all__ = [
    "CONFIG_DIR",
    "changes",
    "DAC_FRAME_RATE",
    "DAC_N_CODEBOOKS",
    "DEFAULT_TRACKING_URI",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "GenerationConfig",
    "MLflowConfig",
    "ModelConfig",
    "PreprocessConfig",
    "TrainConfig",
    "TuneConfig",
    "apply_overrides",
    "load_config",
    "load_file",
    "resolve_config_path",
]
