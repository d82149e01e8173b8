"""The ``slurm_cluster`` fixture: a real single-node Slurm cluster on loopback."""
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

START = ROOT / "scripts" / "slurm" / "start_local_cluster.sh"
STOP = ROOT / "scripts" / "slurm" / "stop_local_cluster.sh"


def _cluster_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    return ping.returncode == 0 and "UP" in ping.stdout


def _unavailable(reason: str):
    if os.environ.get("NEMO_RLHF_REQUIRE_SLURM") == "1":
        pytest.fail(f"NEMO_RLHF_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local cluster: the one already up, or one started (and stopped) here."""
    if _cluster_up():
        yield
        return
    if os.geteuid() != 0:
        _unavailable("Slurm cannot be installed: not root (run scripts/slurm/start_local_cluster.sh as root)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        _unavailable("Slurm cannot be installed: no slurmctld and no apt-get")
    proc = subprocess.run([str(START)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        _unavailable(f"Slurm cannot be installed here: {proc.stderr.strip()[-500:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield
    subprocess.run([str(STOP)], capture_output=True, text=True, timeout=120)
