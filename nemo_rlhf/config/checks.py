"""The two checks every config dataclass's ``__post_init__`` uses; the message names the key."""
from __future__ import annotations

from nemo_rlhf.errors import ConfigError


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(value, key: str) -> None:
    _require(value is not None and value > 0, f"{key} must be > 0, got {value!r}")
