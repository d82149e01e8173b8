"""End-to-end PPO: python -m nemo_rlhf.train --config-name ppo_tiny (shortened)."""
import json

import pytest

from tests.conftest import train

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_ppo_tiny_raises_optimality_and_keeps_walks_valid(tmp_path):
    run = tmp_path / "ppo"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "trainer.max_steps=25",
               "trainer.eval_every_n_steps=0", "trainer.checkpoint_every_n_steps=0"], config="ppo_tiny"))
    s = json.loads((run / "summary.json").read_text())
    assert s["algorithm"] == "ppo" and s["steps"] == 25
    init, final = s["initial"], s["final"]
    assert 0.2 < init["optimality"] < 0.5 and init["valid_rate"] >= 0.9     # the SFT policy
    assert final["optimality"] >= 0.9 and final["valid_rate"] >= 0.95       # the bar
    assert s["sft"]["steps"] == 1000 and (run / "sft" / "summary.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 25
    for key in ("reward_mean", "reward_std", "kl", "entropy", "actor/approx_kl", "actor/policy_clipfrac",
                "critic/value_clipfrac", "critic/value_loss", "response_length", "time/generation_s",
                "time/scoring_s", "time/training_s", "kl_coef"):
        assert key in train_rows[-1], key
    assert train_rows[-1]["reward_mean"] > train_rows[0]["reward_mean"] + 0.3
    assert (run / "checkpoints" / "step_0000025" / "nemo_rlhf_meta.json").is_file()


def test_ppo_value_head_critic_and_resume(tmp_path):
    """critic=value_head on the policy trunk; a resumed run equals the uninterrupted one."""
    common = ["trainer.progress_bar=false", "trainer.max_steps=6", "trainer.eval_every_n_steps=0",
              "trainer.checkpoint_every_n_steps=3", "trainer.keep_last_n_checkpoints=5", "ppo.critic=value_head",
              "ppo.sft_warmup.steps=0", "ppo.num_rollouts=32", "task.eval_samples_per_start=2", "ppo.target_kl=1.0"]
    full = tmp_path / "full"
    _ok(train([f"hydra.run.dir={full}", *common], config="ppo_tiny"))
    import shutil
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_0000006")
    _ok(train([f"hydra.run.dir={cut}", *common, "resume=auto"], config="ppo_tiny"))
    rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    a, b = rows(full), rows(cut)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k in ("reward_mean", "kl", "actor/loss", "actor/value_loss", "kl_coef"):
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])


@pytest.mark.parametrize("fn, message", [
    ("raises_on_goal", "reward function raises_on_goal raised ValueError: cannot score walks that reach the goal on sample"),
    ("wrong_length", "reward function wrong_length returned"),
    ("returns_nan", "reward function returns_nan returned nan for sample 3"),
])
def test_bad_reward_function_stops_with_a_named_error(tmp_path, fn, message):
    proc = train([f"hydra.run.dir={tmp_path / 'r'}", "trainer.progress_bar=false", "ppo.sft_warmup.steps=0",
                  f"ppo.reward_fn=tests.helpers.rewards:{fn}", "trainer.max_steps=3"], config="ppo_tiny")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_reward_failure_leaves_the_last_checkpoint_intact(tmp_path):
    run = tmp_path / "r"
    proc = train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "ppo.sft_warmup.steps=0",
                  "ppo.reward_fn=tests.helpers.rewards:fails_on_third_call", "trainer.max_steps=5",
                  "trainer.checkpoint_every_n_steps=1", "ppo.num_rollouts=16", "task.eval_samples_per_start=1"],
                 config="ppo_tiny")
    assert proc.returncode != 0 and "reward server went away" in proc.stderr
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_0000001", "step_0000002"]
    # and it resumes from there with a working reward
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "ppo.sft_warmup.steps=0", "resume=auto",
               "ppo.reward_fn=tests.helpers.rewards:length_reward", "trainer.max_steps=3",
               "ppo.num_rollouts=16", "task.eval_samples_per_start=1"], config="ppo_tiny"))
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


@pytest.mark.distributed
def test_ppo_tp2_through_lightning_matches_single_process(tmp_path):
    from tests.conftest import torchrun

    common = ["trainer.progress_bar=false", "trainer.max_steps=4", "trainer.eval_every_n_steps=0",
              "trainer.checkpoint_every_n_steps=0", "ppo.sft_warmup.steps=100", "ppo.num_rollouts=32",
              "task.eval_samples_per_start=2"]
    single, multi = tmp_path / "single", tmp_path / "tp2"
    _ok(train([f"hydra.run.dir={single}", *common], config="ppo_tiny"))
    _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "ppo_tiny", f"hydra.run.dir={multi}",
                  "parallel=tp2", *common]))
    rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    a, b = rows(single), rows(multi)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert abs(ra["reward_mean"] - rb["reward_mean"]) < 1e-6      # same samples
        assert abs(ra["kl"] - rb["kl"]) < 1e-4
        assert abs(ra["actor/loss"] - rb["actor/loss"]) < 1e-4
        assert abs(ra["critic/value_loss"] - rb["critic/value_loss"]) < 1e-4


def test_ppo_with_a_reward_model_checkpoint(tmp_path):
    fast = ["trainer.progress_bar=false", "ppo.sft_warmup.steps=0", "ppo.num_rollouts=16", "trainer.eval_every_n_steps=0",
            "task.eval_samples_per_start=1", "trainer.max_steps=2"]
    # any checkpoint of a GPT with a value_head is a reward model: here a PPO run with critic=value_head
    src = tmp_path / "src"
    _ok(train([f"hydra.run.dir={src}", *fast, "ppo.critic=value_head"], config="ppo_tiny"))
    rm = src / "checkpoints" / "step_0000002"
    run = tmp_path / "rm"
    _ok(train([f"hydra.run.dir={run}", *fast, f"ppo.reward_model={rm}"], config="ppo_tiny"))
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert len(rows) == 2 and all(r["reward_std"] > 0 for r in rows)
    # a checkpoint without the scalar head is refused with a message naming it
    sft = tmp_path / "sft"
    _ok(train([f"hydra.run.dir={sft}", "trainer.max_steps=2", "trainer.progress_bar=false",
               "trainer.eval_every_n_steps=0", "task.eval_samples_per_start=1"], config="sft_tiny"))
    proc = train([f"hydra.run.dir={tmp_path / 'bad'}", *fast,
                  f"ppo.reward_model={sft / 'checkpoints' / 'step_0000002'}"], config="ppo_tiny")
    assert proc.returncode != 0 and "does not match the model: missing ['value_head" in proc.stderr


def test_ppo_on_ragged_prompts_from_a_jsonl_file(tmp_path):
    """data.train_file with prompts of 1-3 nodes of training walks (one over-long row, dropped):
    the completions continue the walk, the task's reward scores the whole walk, and it rises."""
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    task = RandomWalks(21, 0.1, 10, 5000, 1000)                     # ppo_tiny's task
    prompts = [task.walk_text(w[:1 + i % 3]) for i, w in enumerate(task.walks[:300]) if len(w) > 1 + i % 3]
    prompts.insert(5, "bcdefghij")                                   # 9 tokens > seq_length 16 - 10 new tokens
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    run = tmp_path / "ppo"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", f"data.train_file={data}",
               "data.overlong=drop", "ppo.sft_warmup.steps=150", "trainer.max_steps=8", "ppo.num_rollouts=64",
               "trainer.eval_every_n_steps=0", "trainer.checkpoint_every_n_steps=0",
               "task.eval_samples_per_start=1"], config="ppo_tiny"))
    s = json.loads((run / "summary.json").read_text())
    assert s["data"] == {"train_file": str(data), "examples": len(prompts) - 1, "truncated": 0, "dropped": 1}
    assert s["num_prompts"] == len(prompts) - 1
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert len(rows) == 8
    first, last = rows[0]["reward_mean"], sum(r["reward_mean"] for r in rows[-2:]) / 2
    assert last > first + 0.15, [r["reward_mean"] for r in rows]
    # an over-long prompt with data.overlong=error names the row
    proc = train([f"hydra.run.dir={tmp_path / 'bad'}", "trainer.progress_bar=false", f"data.train_file={data}",
                  "ppo.sft_warmup.steps=0", "trainer.max_steps=1"], config="ppo_tiny")
    assert proc.returncode != 0 and "row 6: prompt of 9 tokens, more than model.seq_length" in proc.stderr, \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.distributed
def test_ragged_prompt_rollouts_at_tp2_equal_one_process_and_learn_at_dp2(tmp_path):
    """Left-padded prompts of 1-3 nodes through multi-rank rollouts: at TP=2 the same samples, rewards
    and losses as one process; at DP=2 (each rank its own prompts and sampling stream) the reward rises."""
    from tests.conftest import torchrun
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    task = RandomWalks(21, 0.1, 10, 5000, 1000)
    prompts = [task.walk_text(w[:1 + i % 3]) for i, w in enumerate(task.walks[:300]) if len(w) > 1 + i % 3]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    sft = tmp_path / "sft"
    _ok(train([f"hydra.run.dir={sft}", "trainer.max_steps=150", "trainer.eval_every_n_steps=0",
               "trainer.progress_bar=false"]))
    common = ["trainer.progress_bar=false", f"data.train_file={data}", "ppo.num_rollouts=64",
              "trainer.eval_every_n_steps=0", "trainer.checkpoint_every_n_steps=0", "task.eval_samples_per_start=1",
              f"model.path={sft / 'checkpoints' / 'step_0000150'}"]
    rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    single, tp2, dp2 = tmp_path / "single", tmp_path / "tp2", tmp_path / "dp2"
    _ok(train([f"hydra.run.dir={single}", *common, "trainer.max_steps=2"], config="ppo_tiny"))
    _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "ppo_tiny", f"hydra.run.dir={tp2}", *common,
                  "trainer.max_steps=2", "parallel=tp2"]))
    for ra, rb in zip(rows(single), rows(tp2)):
        assert ra["reward_mean"] == rb["reward_mean"] and ra["response_length"] == rb["response_length"]
        assert abs(ra["actor/loss"] - rb["actor/loss"]) < 1e-4 and abs(ra["kl"] - rb["kl"]) < 1e-4
    _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "ppo_tiny", f"hydra.run.dir={dp2}", *common,
                  "trainer.max_steps=8"]))
    r = rows(dp2)
    assert json.loads((dp2 / "summary.json").read_text())["layout"]["dp"] == 2
    assert sum(x["reward_mean"] for x in r[-2:]) / 2 > r[0]["reward_mean"] + 0.1, [x["reward_mean"] for x in r]
