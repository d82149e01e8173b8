import os
import signal
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


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID")


def _clean_env(extra):
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    return dict(env, PYTHONPATH=str(ROOT), **(extra or {}))


def torchrun(args, nproc=2, timeout=600, env=None):
    """Launch ``args`` (a script path or ['-m', module, ...]) under torchrun on CPU/gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", *args]
    # 2 ranks on 2 cores: one thread each, or they oversubscribe the cores. Its own session, so a
    # launch past its timeout is killed with its workers (killing torchrun alone leaves them
    # running, and waiting on each other, through the rest of the suite).
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(dict(env or {}, OMP_NUM_THREADS="1")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(map(str, args))} still running after {timeout} s; killed. "
                    f"The end of its stderr:\n{err[-6000:]}", pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train(overrides, config="sft_tiny", timeout=600, env=None):
    """``python -m nemo_rlhf.train --config-name CONFIG overrides...`` in a subprocess."""
    cmd = [sys.executable, "-m", "nemo_rlhf.train", "--config-name", config, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=_clean_env(env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_train():
    return train


@pytest.fixture
def run_torchrun():
    return torchrun


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With NEMO_RLHF_NO_SKIPS=1 (CI sets it) a skipped test fails the run: every test must run."""
    skipped = terminalreporter.stats.get("skipped", [])
    if os.environ.get("NEMO_RLHF_NO_SKIPS") == "1" and skipped:
        terminalreporter.write_line(f"NEMO_RLHF_NO_SKIPS=1: {len(skipped)} test(s) skipped, failing the run", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("NEMO_RLHF_NO_SKIPS") == "1" and reporter is not None and reporter.stats.get("skipped") \
            and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_sessionstart(session):
    """The stack under test, first in the output, also with -q (CI runs two stacks: README, Tests)."""
    from importlib.metadata import version

    import torch

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"nemo_rlhf stack: Python {sys.version.split()[0]}, torch {torch.__version__}, "
                            f"megatron-core {version('megatron-core')}")
