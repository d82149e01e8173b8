"""End-to-end reward model: rm_tiny, then PPO scoring with it."""
import json

import pytest

from tests.conftest import train

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_rm_tiny_accuracy_and_ppo_with_the_trained_reward_model(tmp_path):
    rm = tmp_path / "rm"
    _ok(train([f"hydra.run.dir={rm}", "trainer.progress_bar=false", "trainer.eval_every_n_steps=0"],
              config="rm_tiny"))
    s = json.loads((rm / "summary.json").read_text())
    # held-out pairs are built from walks that no training pair contains (tests/unit/test_randomwalks.py)
    assert s["initial"]["accuracy"] < 0.6 and s["final"]["accuracy"] >= 0.9
    # valid vs invalid-edge walks of equal length: length cannot decide (measured 0.978 from scratch)
    assert s["initial"]["accuracy_equal_length"] < 0.6 and s["final"]["accuracy_equal_length"] >= 0.85
    assert s["heldout_pairs"] == 400 and s["heldout_equal_length_pairs"] == 400
    ckpt = rm / "checkpoints" / "step_0000400"
    ppo = tmp_path / "ppo"
    _ok(train([f"hydra.run.dir={ppo}", "trainer.progress_bar=false", f"ppo.reward_model={ckpt}",
               "trainer.max_steps=12", "ppo.sft_warmup.steps=600", "trainer.eval_every_n_steps=0"], config="ppo_tiny"))
    p = json.loads((ppo / "summary.json").read_text())
    rows = [json.loads(l) for l in (ppo / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"]                  # the RM's score goes up
    assert p["final"]["optimality"] > p["initial"]["optimality"] + 0.1       # and so does optimality
