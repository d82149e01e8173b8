"""Every error nemo_rlhf raises on purpose: bad input that a user can fix. The message names the
key, file, row or path at fault and, where there is one, the way out.

This module sits at the bottom of the package (it imports nothing of nemo_rlhf), so every layer
raises these without importing the layer that defined them. The CLI (``nemo_rlhf.train``) turns
any :class:`UserError` into one log line and exit status 2 instead of a traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Base class: input or state a user can fix; the CLI prints the message, not a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid. The message names the offending key."""


class TokenizerError(ConfigError):
    """A tokenizer file is missing or unusable. The message names the file."""


class DataError(UserError, ValueError):
    """Malformed training data. The message names the file and line (or the index)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or incompatible. The message names the path."""


class RewardFunctionError(UserError, RuntimeError):
    """The reward function raised, or returned the wrong number of scores, or NaN/inf."""


class RunDirectoryError(UserError, RuntimeError):
    """The run directory is in use by another run, or cannot be written (disk full, I/O error).
    The message names the path and, for a lock, the process holding it."""
