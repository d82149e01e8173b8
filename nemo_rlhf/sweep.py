"""What a run gives back to a Hydra sweeper that proposes values from results (the Optuna sweeper,
``conf/ppo_tiny_sweep.yaml``): the final evaluation's ``sweep.objective`` metric. Hydra's grid
sweeps (``-m optim.lr=1e-3,3e-3``) and single runs need no objective; the CLI returns None then.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from nemo_rlhf.errors import ConfigError


def objective_key(cfg: DictConfig, hydra_cfg: DictConfig) -> Optional[str]:
    """``sweep.objective`` of ``cfg``, checked before training: a sweeper other than Hydra's basic
    (grid) one optimises what each run returns, so under it the key must be set."""
    from hydra.types import RunMode

    key = OmegaConf.select(cfg, "sweep.objective")
    sweeper = str(OmegaConf.select(hydra_cfg, "sweeper._target_", default=""))
    if key is None and hydra_cfg.mode == RunMode.MULTIRUN and not sweeper.endswith(".BasicSweeper"):
        raise ConfigError(f"the sweeper {sweeper} optimises what each run returns: set sweep.objective to a metric "
                          "of the final evaluation, e.g. sweep.objective=optimality")
    return key


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def objective_value(summary: Dict[str, Any], key: Optional[str]) -> Optional[float]:
    """``summary["final"][key]`` as a float (what summary.json holds); None when ``key`` is None."""
    if key is None:
        return None
    final = summary["final"]
    if not _is_number(final.get(key)):
        metrics = ", ".join(k for k, v in final.items() if _is_number(v) and k != "step")
        raise ConfigError(f"sweep.objective={key}: the final evaluation has no such metric (it has: {metrics})")
    return float(final[key])
