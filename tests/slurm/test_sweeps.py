"""Hyperparameter sweeps with Hydra multirun (trlX's Ray Tune sweeps, the Hydra way): each run of
the sweep gets its own run directory with its own config.yaml, metrics.jsonl and summary.json."""
import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, _clean_env

pytestmark = pytest.mark.slow


def test_local_multirun_sweep_writes_one_run_directory_per_point(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "nemo_rlhf.train", "--config-name", "sft_tiny", "-m", "optim.lr=1e-3,3e-3",
           f"hydra.sweep.dir={sweep}", "trainer.max_steps=3", "trainer.eval_every_n_steps=0",
           "trainer.checkpoint_every_n_steps=0", "task.eval_samples_per_start=1", "trainer.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_clean_env(None), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lrs = []
    for num in (0, 1):
        run = sweep / str(num)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 3 and "valid_rate" in summary["final"]
        lrs.append(yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"])
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 3]   # log every 10, first and last
    assert lrs == [1e-3, 3e-3]
