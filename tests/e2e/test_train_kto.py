"""End-to-end KTO (python -m nemo_rlhf.train --config-name kto_tiny) and training from data files."""
import json
import math

import pytest

from tests.conftest import train

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _train_rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]


def test_kto_tiny_shortened(tmp_path):
    run = tmp_path / "kto"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "trainer.max_steps=40",
               "trainer.log_every_n_steps=1", "trainer.eval_every_n_steps=0", "kto.num_pairs=1000"],
              config="kto_tiny"))
    s = json.loads((run / "summary.json").read_text())
    rows = _train_rows(run)
    # step 1: policy == reference, so r = 0 and z0 = 0: every loss is 1 - sigmoid(0) = 0.5
    assert rows[0]["step"] == 1 and abs(rows[0]["loss"] - 0.5) < 1e-6 and rows[0]["kl"] == 0.0
    assert rows[-1]["rewards/chosen"] > 0 > rows[-1]["rewards/rejected"]
    assert s["desirable"] == s["undesirable"] == 1000 and s["num_examples"] == 2000
    assert s["final"]["optimality"] >= s["initial"]["optimality"] + 0.15
    assert s["final"]["valid_rate"] >= 0.9
    assert (run / "reference_logps.pt").is_file()


def test_dpo_and_sft_from_files(tmp_path):
    """Pairs written to parquet train DPO; an over-long row is dropped and counted; SFT reads JSONL."""
    from nemo_rlhf.data.preference import randomwalk_pairs
    from nemo_rlhf.data.tokenizers import CharTokenizer
    from nemo_rlhf.tasks.randomwalks import RandomWalks
    import datasets

    task = RandomWalks(21, 0.1, 10, 5000, 1000)     # the task of dpo_tiny (task.* defaults, num_walks 5000)
    tok = CharTokenizer(task.vocab)
    pairs = randomwalk_pairs(task, tok, 256, seed=0)
    rows = [{"prompt": tok.decode(p), "chosen": tok.decode(c), "rejected": tok.decode(r)} for p, c, r in pairs]
    rows.append({"prompt": "a", "chosen": "b" * 40, "rejected": "c"})     # 42 tokens > seq_length 16
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    run = tmp_path / "dpo"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "trainer.max_steps=3", "dpo.sft_warmup.steps=20",
               "trainer.eval_every_n_steps=0", "task.eval_samples_per_start=1",
               f"data.train_file={tmp_path / 'pairs.parquet'}", "data.overlong=drop"], config="dpo_tiny"))
    s = json.loads((run / "summary.json").read_text())
    assert s["data"]["examples"] == 256 and s["data"]["dropped"] == 1 and s["num_pairs"] == 256
    assert abs(_train_rows(run)[0]["loss"] - math.log(2)) < 1e-6

    # the same over-long row with the default data.overlong=error: a named error before any training
    proc = train([f"hydra.run.dir={tmp_path / 'err'}", "dpo.sft_warmup.steps=20",
                  f"data.train_file={tmp_path / 'pairs.parquet'}"], config="dpo_tiny")
    assert proc.returncode != 0
    assert "row 257: 42 tokens (prompt 1 + completion 40 + EOS), more than model.seq_length + 1 = 17" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "err" / "sft").exists()

    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows[:256]))
    run = tmp_path / "sft"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "trainer.max_steps=5",
               "trainer.eval_every_n_steps=0", "task.eval_samples_per_start=1", f"data.train_file={sft_file}"]))
    s = json.loads((run / "summary.json").read_text())
    assert s["data"] == {"train_file": str(sft_file), "examples": 256, "truncated": 0, "dropped": 0}
