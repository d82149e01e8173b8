"""End-to-end T5 (model.arch=t5) policies through ``python -m nemo_rlhf.train``: SFT learns valid walks,
DPO starts at ln 2 and raises optimality, PPO and ILQL run a few steps. One SFT run feeds the others
(model.path) so the whole file stays within a couple of minutes on 2 cores."""
import json
import math

import pytest

from tests.conftest import train

pytestmark = pytest.mark.slow

SFT_STEPS = 300


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _train_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("t5") / "sft"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", f"trainer.max_steps={SFT_STEPS}",
               "trainer.eval_every_n_steps=0", f"trainer.checkpoint_every_n_steps={SFT_STEPS}"],
              config="t5_sft_tiny"))
    return run


def test_t5_sft_learns_valid_walks(sft_run):
    s = json.loads((sft_run / "summary.json").read_text())
    assert s["steps"] == SFT_STEPS and s["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert "arch: t5" in (sft_run / "config.yaml").read_text()
    init, final = s["initial"], s["final"]
    assert init["valid_rate"] < 0.2                             # random init: junk walks
    assert final["valid_rate"] >= 0.8 and final["valid_rate_greedy"] >= 0.8   # measured 0.90 / 1.0
    assert final["valid_rate"] >= init["valid_rate"] + 0.6
    rows = _train_rows(sft_run)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]


def _sft_checkpoint(sft_run):
    return sft_run / "checkpoints" / f"step_{SFT_STEPS:07d}"


def test_t5_dpo_first_step_ln2_and_optimality_rises(sft_run, tmp_path):
    run = tmp_path / "dpo"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", f"model.path={_sft_checkpoint(sft_run)}",
               "trainer.eval_every_n_steps=0"],
              config="t5_dpo_tiny"))
    s = json.loads((run / "summary.json").read_text())
    rows = _train_rows(run)
    assert rows[0]["step"] == 1 and abs(rows[0]["loss"] - math.log(2)) < 1e-6   # policy == reference
    assert rows[-1]["rewards/accuracy"] > 0.7
    init, final = s["initial"], s["final"]                      # initial = the T5 SFT policy
    assert final["optimality"] >= init["optimality"] + 0.1     # measured 0.315 -> 0.567
    assert final["valid_rate"] >= 0.75                            # measured 0.919 -> 0.875


def test_t5_ppo_runs_a_few_steps(sft_run, tmp_path):
    run = tmp_path / "ppo"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "model=t5_tiny",
               f"model.path={_sft_checkpoint(sft_run)}", "trainer.max_steps=3", "trainer.eval_every_n_steps=0",
               "ppo.num_rollouts=64", "ppo.ppo_epochs=1", "ppo.num_minibatches=2", "task.eval_samples_per_start=2"],
              config="ppo_tiny"))
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["actor/loss"]) and math.isfinite(r["critic/value_loss"])
        assert 0.0 <= r["reward_mean"] <= 1.0
    assert abs(rows[0]["kl"]) < 1e-5                            # policy == reference at the first rollout
    s = json.loads((run / "summary.json").read_text())
    assert s["initial"]["valid_rate"] >= 0.7                    # started from the T5 SFT policy


def test_t5_ilql_runs_a_few_steps(sft_run, tmp_path):
    run = tmp_path / "ilql"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "model=t5_tiny",
               f"model.path={_sft_checkpoint(sft_run)}", "trainer.max_steps=3", "trainer.eval_every_n_steps=0",
               "task.eval_samples_per_start=2"], config="ilql_tiny"))
    rows = _train_rows(run)
    assert [r["step"] for r in rows][-1] == 3
    assert all(math.isfinite(r["loss"]) for r in rows)
    s = json.loads((run / "summary.json").read_text())
    assert "optimality_beta0" in s["final"]
