"""End-to-end critic-free online RL: grpo_tiny and rloo_tiny (shortened), from one SFT warm-up."""
import json

import pytest

from tests.conftest import train

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def _train_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_grpo_and_rloo_raise_optimality_without_a_critic(tmp_path):
    common = ["trainer.progress_bar=false", "trainer.max_steps=20", "trainer.eval_every_n_steps=0",
              "trainer.checkpoint_every_n_steps=0"]
    grpo = tmp_path / "grpo"
    _ok(train([f"hydra.run.dir={grpo}", *common], config="grpo_tiny"))
    s = _summary(grpo)
    init, final = s["initial"], s["final"]
    assert 0.2 < init["optimality"] < 0.5 and init["valid_rate"] >= 0.9     # the SFT policy
    assert final["optimality"] >= 0.9 and final["valid_rate"] >= 0.95
    rows = _train_rows(grpo)
    for key in ("reward_mean", "reward_std", "kl", "entropy", "zero_std_groups", "actor/kl_loss",
                "actor/clipfrac_low", "actor/clipfrac_high", "actor/policy_loss", "response_length"):
        assert key in rows[-1], key
    assert not any(k.startswith("critic/") for k in rows[-1])               # no critic trained
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"] + 0.3
    meta = json.loads((grpo / "checkpoints" / "step_0000020" / "nemo_rlhf_meta.json").read_text())
    assert meta["models"] == ["model", "reference"]                          # nor saved

    # RLOO from the same SFT policy
    rloo = tmp_path / "rloo"
    _ok(train([f"hydra.run.dir={rloo}", *common, f"model.path={grpo / 'sft' / 'checkpoints' / 'step_0001000'}"],
              config="rloo_tiny"))
    s = _summary(rloo)
    assert s["initial"]["optimality"] == init["optimality"]                # the same start
    assert s["final"]["optimality"] >= 0.9 and s["final"]["valid_rate"] >= 0.95

    # two weighted reward functions: their weighted sum is the reward, each one's mean is logged
    both = tmp_path / "both"
    _ok(train([f"hydra.run.dir={both}", "trainer.progress_bar=false", "trainer.max_steps=2",
               "trainer.eval_every_n_steps=0", f"model.path={grpo / 'sft' / 'checkpoints' / 'step_0001000'}",
               'ppo.reward_fns=[randomwalks,"tests.helpers.rewards:length_reward"]', "ppo.reward_weights=[1.0,-0.05]"],
              config="grpo_tiny"))
    for r in _train_rows(both):
        assert r["reward_mean"] == pytest.approx(r["reward/randomwalks"] - 0.05 * r["reward/length_reward"], abs=1e-6)
        assert r["reward/length_reward"] > 1.0


def test_critic_free_configs_refuse_a_critic_or_a_single_sample(tmp_path):
    proc = train([f"hydra.run.dir={tmp_path / 'a'}", "ppo.num_generations=1", "ppo.num_rollouts=16"], config="grpo_tiny")
    assert proc.returncode == 2 and "ppo.num_generations must be > 1" in proc.stderr
    proc = train([f"hydra.run.dir={tmp_path / 'b'}", "ppo.critic=separate"], config="rloo_tiny")
    assert proc.returncode == 2 and "advantage_estimator=rloo is critic-free: set ppo.critic=none" in proc.stderr
