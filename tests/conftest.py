import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, timeout=600, env=None):
    """Launch ``args`` (a script path or ['-m', module, ...]) under torchrun on CPU/gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def train(overrides, config="sft_tiny", timeout=600, env=None):
    """``python -m nemo_rlhf.train --config-name CONFIG overrides...`` in a subprocess."""
    cmd = [sys.executable, "-m", "nemo_rlhf.train", "--config-name", config, *overrides]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_train():
    return train


@pytest.fixture
def run_torchrun():
    return torchrun
