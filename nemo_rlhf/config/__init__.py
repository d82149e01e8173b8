"""Configuration shared by every run: the typed, documented dataclasses of ``schema.py``. Each
algorithm's own block lives in its recipe (``nemo_rlhf/recipes/<name>.py``); the run config that
Hydra validates against, with the chosen recipe's block, comes from ``nemo_rlhf.recipes.registry``
(``register_configs``, ``to_run_config``)."""
from __future__ import annotations

from nemo_rlhf.config.schema import (  # noqa: F401
    AlgorithmConfig, ConfigError, DataConfig, GenerationConfig, LoggerConfig, ModelConfig, OptimConfig,
    ParallelConfig, RunConfig, SFTWarmupConfig, TaskConfig, TrainerConfig,
)

from pathlib import Path as _Path

CONF_DIR = str(_Path(__file__).resolve().parent.parent.parent / "conf")
"""The YAML configs (Hydra's config dir): conf/<algorithm>_<size>.yaml and the groups under it."""
