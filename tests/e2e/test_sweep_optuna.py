"""Hyperparameter search that proposes values: Hydra's Optuna sweeper on conf/ppo_tiny_sweep.yaml.
Each trial is a real ppo_tiny run in its own directory that returns its final optimality
(``sweep.objective``); Optuna's TPE sampler proposes the next optim.lr / ppo.init_kl_coef from
the results, and the sweep writes the best trial to optimization_results.yaml."""
import json
import subprocess
import sys

import pytest
import yaml
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper  # noqa: F401  (the plugin is installed)

from nemo_rlhf.errors import ConfigError
from nemo_rlhf.sweep import objective_value
from tests.conftest import ROOT, _clean_env

pytestmark = pytest.mark.slow

TRIALS = 3
SHORT = ["trainer.max_steps=2", "ppo.sft_warmup.steps=60", "ppo.num_rollouts=32", "task.eval_samples_per_start=2"]


def _sweep(sweep_dir, *overrides):
    cmd = [sys.executable, "-m", "nemo_rlhf.train", "--config-name", "ppo_tiny_sweep", "-m",
           f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=_clean_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True,
                          timeout=900)


def _proposed(trial_dir):
    """{key: value} of the sweeper's overrides of one trial (the shortening ones left out)."""
    overrides = yaml.safe_load((trial_dir / ".hydra" / "overrides.yaml").read_text())
    pairs = dict(o.split("=", 1) for o in overrides)
    return {k: float(pairs[k]) for k in ("optim.lr", "ppo.init_kl_coef")}


def test_optuna_sweep_proposes_values_and_reports_the_best_trial(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, f"hydra.sweeper.n_trials={TRIALS}", *SHORT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    proposed, finals = [], []
    for num in range(TRIALS):
        trial = sweep / str(num)
        summary = json.loads((trial / "summary.json").read_text())
        assert summary["algorithm"] == "ppo" and summary["steps"] == 2
        params = _proposed(trial)
        config = yaml.safe_load((trial / "config.yaml").read_text())   # the run used what was proposed
        assert config["optim"]["lr"] == pytest.approx(params["optim.lr"])
        assert config["ppo"]["init_kl_coef"] == pytest.approx(params["ppo.init_kl_coef"])
        proposed.append(params)
        finals.append(summary["final"]["optimality"])
    assert not (sweep / str(TRIALS)).exists()

    # proposals, not a grid: a different float from each interval for every trial (the log-scaled lr too)
    for key, (low, high) in {"optim.lr": (3e-5, 3e-3), "ppo.init_kl_coef": (0.0, 0.2)}.items():
        values = [p[key] for p in proposed]
        assert len(set(values)) == TRIALS, (key, values)
        assert all(low < v < high for v in values), (key, values)

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    assert results["best_value"] == pytest.approx(max(finals))
    best = proposed[finals.index(max(finals))]
    assert results["best_params"]["optim.lr"] == pytest.approx(best["optim.lr"])
    assert results["best_params"]["ppo.init_kl_coef"] == pytest.approx(best["ppo.init_kl_coef"])


def test_a_proposing_sweeper_without_an_objective_stops_before_training(tmp_path):
    proc = _sweep(tmp_path / "sweep", "hydra.sweeper.n_trials=1", "sweep.objective=null")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "set sweep.objective to a metric of the final evaluation" in out
    assert not (tmp_path / "sweep" / "0" / "summary.json").exists()


def test_the_objective_is_the_final_metric_or_an_error_naming_the_metrics():
    summary = {"final": {"optimality": 0.75, "valid_rate": 1.0, "step": 3}}
    assert objective_value(summary, "optimality") == 0.75
    assert objective_value(summary, None) is None
    with pytest.raises(ConfigError, match=r"sweep.objective=optimalty: .*it has: optimality, valid_rate\)"):
        objective_value(summary, "optimalty")
