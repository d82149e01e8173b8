"""End-to-end DPO: python -m nemo_rlhf.train --config-name dpo_tiny."""
import json
import math

import pytest

import torch

from tests.conftest import torchrun, train

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_dpo_tiny_first_step_ln2_and_final_model_improves(tmp_path):
    run = tmp_path / "dpo"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "trainer.eval_every_n_steps=0"],
              config="dpo_tiny"))
    s = json.loads((run / "summary.json").read_text())
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert rows[0]["step"] == 1 and abs(rows[0]["loss"] - math.log(2)) < 1e-6   # policy == reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen"):
        assert key in rows[-1]
    assert rows[-1]["rewards/accuracy"] > 0.8
    init, final = s["initial"], s["final"]                     # initial = the SFT policy
    assert final["optimality"] >= init["optimality"] + 0.15    # the bar
    assert final["valid_rate"] >= 0.9
    assert (run / "reference_logps.pt").is_file()


def test_dpo_in_memory_reference_and_ipo_packed_and_not(tmp_path):
    """IPO against a frozen reference model, then the same run with data.packing=true (chosen and
    rejected packed into fewer rows for the policy and reference forwards): the same losses."""
    logged = {}
    for packing in ("false", "true"):
        run = tmp_path / f"ipo_{packing}"
        # the packed run starts from the first run's SFT warm-up (data.packing would pack that too)
        start = [] if packing == "false" else [f"model.path={tmp_path / 'ipo_false' / 'sft' / 'checkpoints' / 'step_0000020'}"]
        _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "trainer.max_steps=3", "dpo.sft_warmup.steps=20",
                   "dpo.reference=model", "dpo.loss_type=ipo", "trainer.eval_every_n_steps=0",
                   "task.eval_samples_per_start=1", "dpo.num_pairs=256", f"data.packing={packing}", *start],
                  config="dpo_tiny"))
        logged[packing] = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    rows, packed = logged["false"], logged["true"]
    # IPO at h = 0: (0 - 1 / (2 beta))^2 = 1 for beta 0.5
    assert abs(rows[0]["loss"] - 1.0) < 1e-5
    assert len(rows) == len(packed) >= 2 and rows[-1]["step"] == 3 and rows[-1]["loss"] < 0.9
    for a, b in zip(rows, packed):
        for key in ("loss", "rewards/margin", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_dpo_across_two_pipeline_stages_packed_equals_one_process(tmp_path):
    """dpo_tiny at PP=2 with data.packing=true (the default precomputed reference: its pass goes
    through megatron's forward-only schedule; each micro-batch packs into its own shape, which the
    stages exchange) from the same SFT checkpoint as a one-process unpacked run: the same reference
    log-probs and the same losses."""
    common = ["trainer.progress_bar=false", "trainer.max_steps=3", "trainer.eval_every_n_steps=0",
              "trainer.log_every_n_steps=1", "task.eval_samples_per_start=1", "dpo.num_pairs=256"]
    single, pp2 = tmp_path / "single", tmp_path / "pp2"
    _ok(train([f"hydra.run.dir={single}", *common, "dpo.sft_warmup.steps=20"], config="dpo_tiny"))
    sft = single / "sft" / "checkpoints" / "step_0000020"
    _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "dpo_tiny", f"hydra.run.dir={pp2}", *common,
                  f"model.path={sft}", "parallel=pp2", "data.packing=true"]))
    ref_a, ref_b = (torch.load(run / "reference_logps.pt") for run in (single, pp2))
    assert ref_a.shape == ref_b.shape and float((ref_a - ref_b).abs().max()) < 1e-4
    rows_a, rows_b = ([json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
                      for run in (single, pp2))
    assert [r["step"] for r in rows_b] == [1, 2, 3]
    for a, b in zip(rows_a, rows_b):
        for key in ("loss", "rewards/margin", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert json.loads((pp2 / "summary.json").read_text())["layout"]["pp"] == 2


@pytest.mark.parametrize("loss_type", ["simpo", "orpo", "cpo"])
def test_reference_free_variants_improve_the_sft_policy(tmp_path, loss_type):
    run = tmp_path / loss_type
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", f"dpo.loss_type={loss_type}",
               "trainer.max_steps=40", "trainer.eval_every_n_steps=0",
               "dpo.beta=2.0", "optim.lr=3e-4"], config="dpo_tiny"))
    s = json.loads((run / "summary.json").read_text())
    assert not (run / "reference_logps.pt").exists()            # no reference pass
    assert s["final"]["optimality"] > s["initial"]["optimality"] + 0.05
    assert s["final"]["valid_rate"] >= 0.8
