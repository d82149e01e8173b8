"""End-to-end critic-free online RL: grpo_tiny and rloo_tiny (shortened), from one SFT warm-up."""
import json
import shutil

import pytest

from tests.conftest import torchrun, train
from tests.helpers.runs import ok as _ok, summary as _summary, train_rows as _train_rows, without_timings

pytestmark = pytest.mark.slow


def _trained_positions(run):
    """The work of a run's updates: model positions its engines trained on (actor + critic)."""
    return sum(v for r in _train_rows(run) for k, v in r.items() if k.endswith("model_tokens"))


def test_grpo_and_rloo_raise_optimality_without_a_critic(tmp_path):
    """From one SFT policy: GRPO and RLOO (40 iterations) reach PPO's optimality after 20 iterations
    with less work (positions trained; GRPO / RLOO train no critic and run 2 epochs, PPO 4 epochs of
    actor and critic; `python scripts/benchmark_online_rl.py` prints the wall times: GRPO / RLOO take
    about half of PPO's per iteration); RFT improves it too."""
    common = ["trainer.progress_bar=false", "trainer.max_steps=40", "trainer.eval_every_n_steps=0",
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
    meta = json.loads((grpo / "checkpoints" / "step_0000040" / "nemo_rlhf_meta.json").read_text())
    assert meta["models"] == ["model", "reference"]                          # nor saved

    # RLOO from the same SFT policy
    rloo = tmp_path / "rloo"
    _ok(train([f"hydra.run.dir={rloo}", *common, f"model.path={grpo / 'sft' / 'checkpoints' / 'step_0001000'}"],
              config="rloo_tiny"))
    s = _summary(rloo)
    assert s["initial"]["optimality"] == init["optimality"]                # the same start
    assert s["final"]["optimality"] >= 0.9 and s["final"]["valid_rate"] >= 0.95

    # PPO (separate critic) for 20 iterations from the same SFT policy
    sft_ckpt = f"model.path={grpo / 'sft' / 'checkpoints' / 'step_0001000'}"
    ppo = tmp_path / "ppo"
    _ok(train([f"hydra.run.dir={ppo}", *common, "trainer.max_steps=20", sft_ckpt], config="ppo_tiny"))
    ppo_final = _summary(ppo)["final"]["optimality"]
    for run in (grpo, rloo):
        assert _summary(run)["final"]["optimality"] >= ppo_final - 0.02, (run.name, ppo_final)
        assert _trained_positions(run) < 0.7 * _trained_positions(ppo), run.name

    # rejection fine-tuning (rft_tiny) from the same SFT policy
    rft = tmp_path / "rft"
    _ok(train([f"hydra.run.dir={rft}", *common, "trainer.max_steps=10", sft_ckpt], config="rft_tiny"))
    s = _summary(rft)
    assert s["initial"]["optimality"] == init["optimality"]
    assert s["final"]["optimality"] >= init["optimality"] + 0.3, s["final"]
    rows = _train_rows(rft)
    assert [r["percentile"] for r in rows[:3]] == pytest.approx([0.5, 0.5 + 0.4 / 9, 0.5 + 0.8 / 9])
    assert all(0 < r["accepted"] < 1 and r["updates"] >= 1 for r in rows)

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


def test_without_kl_terms_the_reference_forward_is_skipped(tmp_path):
    """ppo.init_kl_coef = ppo.kl_loss_coef = 0 (TRL's beta=0): nothing reads the reference log-probs,
    so their forward is skipped and kl is logged as 0 although the policy moved after step 1 (with a
    KL coefficient the same run measures kl > 0 at step 2)."""
    runs = {}
    for coef in (0.0, 0.02):
        run = tmp_path / f"kl{coef}"
        proc = _ok(train([f"hydra.run.dir={run}", "trainer.max_steps=2", "trainer.eval_every_n_steps=0",
                          "trainer.progress_bar=false", "trainer.log_every_n_steps=1", "ppo.init_kl_coef=0.0",
                          f"ppo.kl_loss_coef={coef}", "ppo.sft_warmup.steps=50", "task.eval_samples_per_start=1"],
                         config="grpo_tiny"))
        runs[coef] = (_train_rows(run), "the reference forward is skipped" in proc.stderr + proc.stdout)
    (skipped_rows, skipped_said), (kl_rows, kl_said) = runs[0.0], runs[0.02]
    assert skipped_said and not kl_said
    assert [r["kl"] for r in skipped_rows] == [0.0, 0.0]
    assert kl_rows[1]["kl"] > 1e-4


@pytest.mark.distributed
def test_grpo_at_pp2_equals_the_single_process_run(tmp_path):
    """Rollouts sampled across two pipeline stages, the experience pass (policy and reference NLL)
    across them, the update through megatron's pipeline schedule: the same rewards, losses, KL and
    final evaluation as one process."""
    sft = tmp_path / "sft"
    _ok(train([f"hydra.run.dir={sft}", "trainer.max_steps=100", "trainer.eval_every_n_steps=0",
               "trainer.progress_bar=false"]))
    common = ["trainer.max_steps=3", "trainer.eval_every_n_steps=0", "trainer.progress_bar=false",
              "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=0", "task.eval_samples_per_start=4",
              f"model.path={sft / 'checkpoints' / 'step_0000100'}"]
    single, multi = tmp_path / "single", tmp_path / "pp2"
    _ok(train([f"hydra.run.dir={single}", *common], config="grpo_tiny"))
    _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "grpo_tiny", f"hydra.run.dir={multi}", *common,
                  "parallel=pp2"]))
    a, b = _train_rows(single), _train_rows(multi)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["reward_mean"] == rb["reward_mean"]                # the same rollouts
        for key in ("actor/loss", "kl", "actor/kl_loss", "entropy"):
            assert abs(ra[key] - rb[key]) < 1e-5, (ra["step"], key, ra[key], rb[key])
    sa, sb = _summary(single), _summary(multi)
    assert sb["layout"]["pp"] == 2 and sa["final"]["optimality_greedy"] == sb["final"]["optimality_greedy"]
    assert abs(sa["final"]["optimality"] - sb["final"]["optimality"]) < 0.02


@pytest.mark.distributed
def test_ppo_with_value_critics_at_pp2_and_pp2_vpp2_equals_the_single_process_run_and_resumes(tmp_path):
    """PPO with a separate critic and with a value head at PP=2 and at PP=2 x VPP=2 (4 layers, one per
    chunk: rollouts, the experience pass and the updates go round the ring twice): values on the last
    stage, broadcast for GAE, critic and actor updates through the (interleaved) pipeline schedule; the
    same rewards, losses, KL and values as one process and the same final evaluation. The PP=2 run,
    cut after its step-1 checkpoint, resumes with exactly the rows of the uninterrupted run."""
    sft = tmp_path / "sft"
    _ok(train([f"hydra.run.dir={sft}", "trainer.max_steps=100", "trainer.eval_every_n_steps=0",
               "trainer.progress_bar=false", "model.num_layers=4"]))
    common = ["trainer.max_steps=2", "trainer.eval_every_n_steps=0", "trainer.progress_bar=false",
              "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=1", "task.eval_samples_per_start=4",
              "ppo.num_rollouts=32", "ppo.ppo_epochs=2", "ppo.num_minibatches=2", "trainer.micro_batch_size=8",
              "model.num_layers=4", f"model.path={sft / 'checkpoints' / 'step_0000100'}"]
    for critic in ("separate", "value_head"):
        single = tmp_path / f"single_{critic}"
        _ok(train([f"hydra.run.dir={single}", *common, f"ppo.critic={critic}"], config="ppo_tiny"))
        a, sa = _train_rows(single), _summary(single)
        for layout, vpp in (("pp2", 1), ("pp2_vpp2", 2)):
            multi = tmp_path / f"{layout}_{critic}"
            launch = lambda run, *extra: _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "ppo_tiny",
                                                       f"hydra.run.dir={run}", *common, f"ppo.critic={critic}",
                                                       f"parallel={layout}", *extra]))
            launch(multi)
            b = _train_rows(multi)
            assert [r["step"] for r in b] == [1, 2]
            for ra, rb in zip(a, b):
                assert ra["reward_mean"] == rb["reward_mean"], (critic, layout)   # the same rollouts
                keys = ["actor/loss", "kl", "values_mean", "returns_mean", "entropy"]
                keys += ["critic/loss"] if critic == "separate" else ["actor/value_loss"]
                for key in keys:
                    assert abs(ra[key] - rb[key]) < 1e-5, (critic, layout, ra["step"], key, ra[key], rb[key])
            sb = _summary(multi)
            assert (sb["layout"]["pp"], sb["layout"]["vpp"]) == (2, vpp)
            assert sa["final"]["optimality_greedy"] == sb["final"]["optimality_greedy"]
            assert abs(sa["final"]["optimality"] - sb["final"]["optimality"]) < 0.02
            if layout == "pp2":   # cut after step 1's checkpoint, resume at PP=2
                cut = tmp_path / f"cut_{critic}"
                shutil.copytree(multi, cut)
                shutil.rmtree(cut / "checkpoints" / "step_0000002")
                proc = launch(cut, "resume=auto")
                assert "at step 1" in proc.stderr + proc.stdout
                assert without_timings(_train_rows(cut)) == without_timings(b), critic   # every number, none repeated or missing
