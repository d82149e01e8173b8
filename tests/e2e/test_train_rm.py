"""End-to-end reward model: rm_tiny, then PPO scoring with it."""
import json

import pytest

from tests.conftest import torchrun, train
from tests.helpers.runs import summary, train_rows

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
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"] + 3.0            # the RM's score goes up: measured -3.0 -> 6.8
    assert p["final"]["optimality"] > p["initial"]["optimality"] + 0.1       # and so does optimality


@pytest.mark.distributed
def test_reward_model_at_pp2_vpp2_equals_the_single_process_run(tmp_path):
    """A reward model trained and evaluated at PP=2 x VPP=2 (4 layers, the value head on the last
    chunk, held-out pairs scored round the ring) from one SFT trunk: the single-process losses and
    held-out accuracies (the head starts at zero, so every layout starts equal)."""
    sft = tmp_path / "sft"
    _ok(train([f"hydra.run.dir={sft}", "trainer.max_steps=100", "trainer.eval_every_n_steps=0",
               "trainer.progress_bar=false", "model.num_layers=4"]))
    common = ["trainer.max_steps=4", "trainer.eval_every_n_steps=0", "trainer.progress_bar=false",
              "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=0", "model.num_layers=4",
              f"model.path={sft / 'checkpoints' / 'step_0000100'}"]
    single, multi = tmp_path / "single", tmp_path / "vpp"
    _ok(train([f"hydra.run.dir={single}", *common], config="rm_tiny"))
    _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "rm_tiny", f"hydra.run.dir={multi}", *common,
                  "parallel=pp2_vpp2"]))
    a, b = train_rows(single), train_rows(multi)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert max(abs(ra["loss"] - rb["loss"]) for ra, rb in zip(a, b)) < 1e-5
    sa, sb = summary(single)["final"], summary(multi)["final"]
    assert summary(multi)["layout"]["vpp"] == 2
    assert sa["accuracy"] == sb["accuracy"] and sa["accuracy_equal_length"] == sb["accuracy_equal_length"]
    assert abs(sa["reward_margin"] - sb["reward_margin"]) < 1e-5
    assert sb["reward_margin"] > 0.01          # the 4 steps moved the head off zero
