"""The command line: ``python -m nemo_rlhf.train --config-name sft_tiny [key=value ...]``.

Hydra composes ``conf/<config-name>.yaml`` with the overrides; :func:`nemo_rlhf.runner.run` does the
rest (validate -> parallel state -> recipe -> fit -> summary.json in ``hydra.run.dir``). Launch
multi-process runs with torchrun or Slurm (``launchers/``). A user error (bad key, file, checkpoint,
reward function) ends with one line naming it and exit status 2. With ``sweep.objective=<metric>``
the run returns that metric of its final evaluation to Hydra: what a sweeper that proposes values
(``hydra/sweeper=optuna``, ``conf/ppo_tiny_sweep.yaml``) maximises or minimises.
"""
from __future__ import annotations

import logging
import sys
import types
from typing import Optional

import hydra
from omegaconf import DictConfig

from nemo_rlhf import api, sweep
from nemo_rlhf.config import CONF_DIR
from nemo_rlhf.errors import UserError
from nemo_rlhf.logging import get_logger
from nemo_rlhf.recipes.registry import check_renamed, register_configs
from nemo_rlhf.runner import run  # noqa: F401  (nemo_rlhf.train.run: the runner, as before)

log = get_logger(__name__)

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="sft_tiny", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    """One run into Hydra's output dir; returns the final ``sweep.objective`` metric (None if unset)."""
    from hydra.core.hydra_config import HydraConfig

    from nemo_rlhf.parallel import destroy

    try:
        objective = sweep.objective_key(cfg, HydraConfig.get())
        return sweep.objective_value(run(cfg, HydraConfig.get().runtime.output_dir), objective)
    except UserError as e:
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    finally:
        destroy()


def main() -> None:
    # A log file on a full disk must not bury the error that names the problem under tracebacks.
    logging.raiseExceptions = False
    try:
        check_renamed(a for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
    except UserError as e:
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    _hydra_main()


class _CallableModule(types.ModuleType):
    """``nemo_rlhf.train`` is both this module (``python -m nemo_rlhf.train``) and the trlX-style
    function ``nemo_rlhf.train(...)``: importing the submodule rebinds the package attribute to
    it, so the module forwards calls to :func:`nemo_rlhf.api.train`."""

    def __call__(self, *args, **kwargs):
        return api.train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    main()
