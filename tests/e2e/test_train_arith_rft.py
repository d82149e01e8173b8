"""End-to-end: GRPO on the arithmetic task (held-out accuracy from a weak SFT start), DAPO's dynamic
sampling, and the offline recipes' refusal of a task without walks (RFT is in test_train_grpo.py,
from the randomwalks SFT policy the GRPO / RLOO / PPO comparison shares)."""
import pytest

from tests.conftest import train
from tests.helpers.runs import ok as _ok, summary as _summary, train_rows as _train_rows

pytestmark = pytest.mark.slow


def test_grpo_raises_held_out_arithmetic_accuracy(tmp_path):
    """grpo_arith_tiny as shipped: SFT on 300 problems, GRPO with the exact-match reward on 2000
    others, accuracy on 200 held-out problems (disjoint from both, tests/unit/test_rft_and_arithmetic.py)."""
    run = tmp_path / "arith"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "trainer.eval_every_n_steps=0",
               "trainer.checkpoint_every_n_steps=0"], config="grpo_arith_tiny"))
    s = _summary(run)
    init, final = s["initial"], s["final"]
    assert 0.05 < init["accuracy"] < 0.35                                  # a weak start
    assert final["accuracy"] >= init["accuracy"] + 0.1, (init, final)      # measured: 0.205 -> 0.417
    assert final["accuracy_greedy"] >= init["accuracy_greedy"] + 0.1, (init, final)
    rows = _train_rows(run)
    assert sum(r["reward_mean"] for r in rows[-10:]) > sum(r["reward_mean"] for r in rows[:10]) + 1.0
    assert (s["advantage_estimator"], s["critic"]) == ("grpo", "none")
    assert (run / "curves.png").stat().st_size > 10_000                     # the run's plot
    for key in ("reward_mean", "reward_std", "kl", "entropy", "response_length", "zero_std_groups",
                "actor/clipfrac_low", "actor/clipfrac_high", "tokens_per_s"):
        assert key in s["last_train"], key                              # the last iteration's metrics

    # DAPO's dynamic sampling: no zero-variance group reaches the update, the resampling is logged
    dyn = tmp_path / "dynamic"
    _ok(train([f"hydra.run.dir={dyn}", "trainer.progress_bar=false", "trainer.max_steps=3",
               "trainer.eval_every_n_steps=0", "trainer.checkpoint_every_n_steps=0", "ppo.dynamic_sampling=true",
               f"model.path={run / 'sft' / 'checkpoints' / 'step_0000400'}"], config="grpo_arith_tiny"))
    for r in _train_rows(dyn):
        assert r["zero_std_groups"] == 0.0 and r["dynamic_sampling/filled"] == 0.0, r
        assert r["dynamic_sampling/rounds"] >= 2 and r["dynamic_sampling/flat_groups"] > 0, r


def test_offline_recipes_refuse_the_arithmetic_task_by_name(tmp_path):
    proc = train([f"hydra.run.dir={tmp_path / 'a'}", "task=arithmetic", "model.path=null"], config="dpo_tiny")
    assert proc.returncode == 2
    assert "task.name=arithmetic builds no data for algorithm.name=dpo" in proc.stderr
