"""Initial weights from whatever checkpoint ``model.path`` names: the one entry point for it.

    format (interop.formats.checkpoint_format)   loader
    nemo_rlhf   a nemo_rlhf dist checkpoint       checkpoint.load_own_weights
    hf          a Hugging Face directory          interop.formats.load_hf (GPT types and T5)
    nemo1       a NeMo 1.x .nemo file / its dir   interop.nemo.load_nemo1
    mcore       a NeMo 2 / Megatron dist ckpt     interop.nemo.load_mcore_dist

This module sits above both ``checkpoint/`` (our own format) and ``interop/`` (the foreign ones),
so neither imports the other to dispatch: ``checkpoint/`` imports nothing of ``interop/``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List

import torch

from nemo_rlhf.checkpoint import load_own_weights
from nemo_rlhf.interop.formats import checkpoint_format, load_hf
from nemo_rlhf.interop.nemo import load_mcore_dist, load_nemo1

# checkpoint_format(path) -> loader(path, chunks, skip_prefixes)
LOADERS: Dict[str, Callable] = {
    "nemo_rlhf": load_own_weights,
    "hf": load_hf,
    "nemo1": load_nemo1,
    "mcore": load_mcore_dist,
}


def load_weights(path: str | os.PathLike, chunks: List[torch.nn.Module], skip_prefixes=("value_head.",)) -> None:
    """Initialise ``chunks`` (this rank's, any TP/PP layout) from the checkpoint at ``path``, in any
    format of :data:`LOADERS`. Parameters under ``skip_prefixes`` (heads the checkpoint does not
    have, e.g. a fresh value head) keep their initialisation; anything else missing is an error.
    A path of no known format goes to :func:`load_own_weights`, whose CheckpointError names what is
    wrong (missing, or an interrupted nemo_rlhf write)."""
    path = Path(path)
    loader = LOADERS.get(checkpoint_format(path), load_own_weights)
    loader(path, chunks, skip_prefixes)
