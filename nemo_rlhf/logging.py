"""Library logging. Verbosity comes from ``NEMO_RLHF_VERBOSITY`` (e.g. WARNING) or
:func:`set_verbosity`; only rank 0 logs at INFO and below in multi-process runs."""
from __future__ import annotations

import logging
import os
import sys

_ROOT = "nemo_rlhf"
_configured = False


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _rank() == 0


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
        _configured = True
    return logger


def get_logger(name: str) -> logging.Logger:
    _configure()
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def set_verbosity(level) -> None:
    """Set nemo_rlhf's log level: a logging constant or a name ('WARNING', 'info', ...)."""
    _configure().setLevel(level.upper() if isinstance(level, str) else level)


def get_verbosity() -> int:
    return _configure().level
