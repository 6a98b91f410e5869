"""Experiment configs: typed dataclasses (schema.py) and one YAML per experiment in this folder."""

from configs.schema import (
    CONFIG_DIR,
    DAC_FRAME_RATE,
    DAC_N_CODEBOOKS,
    DEFAULT_TRACKING_URI,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    GenerationConfig,
    MLflowConfig,
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    resolve_config_path,
)

__all__ = [
    "CONFIG_DIR",
    "DAC_FRAME_RATE",
    "DAC_N_CODEBOOKS",
    "DEFAULT_TRACKING_URI",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "GenerationConfig",
    "MLflowConfig",
    "ModelConfig",
    "PreprocessConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "resolve_config_path",
]
