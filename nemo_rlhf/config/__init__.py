"""Configuration: dataclass schemas registered with Hydra, plus helpers to turn a DictConfig
into validated objects."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from nemo_rlhf.config.schema import (  # noqa: F401
    AlgorithmConfig, ConfigError, GenerationConfig, LoggerConfig, ModelConfig, OptimConfig,
    ParallelConfig, RunConfig, TaskConfig, TrainerConfig,
)

_REGISTERED = False


def register_configs() -> None:
    """Register the schemas so YAML files can name them in their defaults lists."""
    global _REGISTERED
    if _REGISTERED:
        return
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    _REGISTERED = True


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Merge ``cfg`` into the schema (unknown keys and type errors name the key) and validate."""
    if isinstance(cfg, RunConfig):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    return OmegaConf.to_object(merged)
