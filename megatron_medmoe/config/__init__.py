"""Typed configuration: dataclasses, YAML recipes with key=value overrides, validation at load."""
from .load import ConfigError, Stage, config_to_dict, dump_config, load_config, load_stages
from .schema import (
    CheckpointConfig,
    DataConfig,
    FP8Config,
    LensConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TrainingConfig,
)
from .validate import padded_vocab_size, resolve_config, world_size_of

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "FP8Config", "LensConfig", "LoggingConfig", "ModelConfig", "MoEConfig",
    "ParallelConfig", "RunConfig", "Stage", "TrainingConfig", "config_to_dict", "dump_config", "load_config",
    "load_stages",
    "padded_vocab_size", "resolve_config", "world_size_of",
]
