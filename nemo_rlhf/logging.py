"""Library logging. Verbosity comes from ``NEMO_RLHF_VERBOSITY`` (e.g. WARNING) or
:func:`set_verbosity`; only rank 0 logs at INFO and below in multi-process runs."""
from __future__ import annotations

import logging
import os
import sys
import warnings

_ROOT = "nemo_rlhf"
_configured = False


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _rank() == 0


def _quiet_dependencies(level: int) -> None:
    """megatron-core and Lightning log every bucket, optimizer field and hook at INFO; keep them
    at WARNING unless nemo_rlhf itself is at DEBUG."""
    dep_level = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    for name in ("megatron", "megatron.core", "pytorch_lightning", "lightning", "lightning.pytorch",
                 "lightning_fabric", "pytorch_lightning.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(dep_level)
    if level > logging.DEBUG:
        warnings.filterwarnings("ignore", message=".*(Transformer Engine and )?Apex (is|are) not installed.*")
        warnings.filterwarnings("ignore", message=".*configure_optimizers.* returned `None`.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.checkpoint")
        warnings.filterwarnings("ignore", category=FutureWarning, module="megatron.core.dist_checkpointing")
        warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        # Lightning's hint on machines with Slurm installed: we detect srun/torchrun ourselves
        warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system.*")


def _configure() -> logging.Logger:
    global _configured
    logger = logging.getLogger(_ROOT)
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"))
        handler.addFilter(_RankFilter())
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(os.environ.get("NEMO_RLHF_VERBOSITY", "INFO").upper())
        _quiet_dependencies(logger.level)
        _configured = True
    return logger


def get_logger(name: str) -> logging.Logger:
    _configure()
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def set_verbosity(level) -> None:
    """Set nemo_rlhf's log level: a logging constant or a name ('WARNING', 'info', ...)."""
    logger = _configure()
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    _quiet_dependencies(logger.level)


def get_verbosity() -> int:
    return _configure().level
