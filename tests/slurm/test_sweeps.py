"""Hyperparameter sweeps with Hydra multirun (trlX's Ray Tune sweeps, the Hydra way): each run of
the sweep gets its own run directory with its own config.yaml, metrics.jsonl and summary.json --
locally (one after the other) and on Slurm through hydra-submitit-launcher (a job array)."""
import importlib.util
import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, _clean_env
from tests.slurm.conftest import _unavailable

pytestmark = pytest.mark.slow


SWEEP = ["optim.lr=1e-3,3e-3", "trainer.max_steps=3", "trainer.eval_every_n_steps=0",
         "trainer.checkpoint_every_n_steps=0", "task.eval_samples_per_start=1", "trainer.progress_bar=false"]


def _sweep(sweep, *extra):
    cmd = [sys.executable, "-m", "nemo_rlhf.train", "--config-name", "sft_tiny", "-m", f"hydra.sweep.dir={sweep}",
           *extra, *SWEEP]
    proc = subprocess.run(cmd, cwd=ROOT, env=_clean_env(None), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _check_runs(sweep):
    lrs = []
    for num in (0, 1):
        run = sweep / str(num)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 3 and "valid_rate" in summary["final"]
        lrs.append(yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"])
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 3]   # log every 10, first and last
    assert lrs == [1e-3, 3e-3]


def test_local_multirun_sweep_writes_one_run_directory_per_point(tmp_path):
    _sweep(tmp_path / "sweep")
    _check_runs(tmp_path / "sweep")


def _has_submitit_launcher() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


def test_multirun_sweep_on_slurm_with_the_submitit_launcher(slurm_cluster, tmp_path):
    if not _has_submitit_launcher():
        _unavailable("hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
    sweep = tmp_path / "sweep"
    _sweep(sweep, "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=10")
    _check_runs(sweep)
    # each point ran as a task of one Slurm job array
    tasks = [p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)]
    assert sorted(t.split("_")[1] for t in tasks) == ["0", "1"] and len({t.split("_")[0] for t in tasks}) == 1
