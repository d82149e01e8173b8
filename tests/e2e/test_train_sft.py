"""End-to-end: the real entry point (python -m nemo_rlhf.train) with overrides, asserting on the
run directory it writes."""
import json
import shutil

import pytest

from tests.conftest import torchrun, train

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_sft_tiny_learns_valid_walks(tmp_path):
    run = tmp_path / "sft"
    proc = _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false"]))
    summary = json.loads((run / "summary.json").read_text())
    init, final = summary["initial"], summary["final"]
    assert init["valid_rate"] < 0.2                     # random init: junk
    assert final["valid_rate"] >= 0.95                  # the bar
    assert final["valid_rate_greedy"] >= 0.95
    assert 0.2 < final["optimality"] < 0.6              # imitates random walks (~0.34), no better
    assert summary["steps"] == 1000
    # the run-directory contract
    assert (run / "config.yaml").read_text().count("tensor_model_parallel_size") == 1
    assert (run / "checkpoints" / "step_0001000" / "nemo_rlhf_meta.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0001000"
    assert len([p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]) == 2  # keep_last
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "csv" / "metrics.csv").is_file()
    losses = _losses(run)
    assert losses[0][1] > 1.5 and losses[-1][1] < 0.8
    # what the user is told to look at
    assert "valid_rate" in proc.stdout and "before" in proc.stdout and "after" in proc.stdout


def test_resume_continues_the_same_loss_sequence(tmp_path):
    common = ["trainer.max_steps=60", "trainer.checkpoint_every_n_steps=20", "trainer.log_every_n_steps=1",
              "trainer.eval_every_n_steps=30", "trainer.keep_last_n_checkpoints=5", "trainer.progress_bar=false",
              "task.eval_samples_per_start=4"]
    full = tmp_path / "full"
    _ok(train([f"hydra.run.dir={full}", *common]))
    # an interrupted run: the same run directory as it stood after the step-20 checkpoint
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for step in (40, 60):
        shutil.rmtree(cut / "checkpoints" / f"step_{step:07d}")
    proc = _ok(train([f"hydra.run.dir={cut}", *common, "resume=auto"]))
    assert "resumed from" in proc.stderr and "at step 20" in proc.stderr
    a, b = _losses(full), _losses(cut)
    assert [s for s, _ in b] == list(range(1, 61))      # no duplicated or missing steps
    assert b == a                                       # bit-identical loss sequence
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, cut))
    assert sa["initial"] == sb["initial"]
    assert {k: v for k, v in sa["final"].items() if k != "eval_time_s"} == \
           {k: v for k, v in sb["final"].items() if k != "eval_time_s"}


def test_missing_resume_checkpoint_is_named(tmp_path):
    proc = train([f"hydra.run.dir={tmp_path / 'r'}", f"resume={tmp_path / 'nope'}"])
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "no such checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["parallel=tp2"], ["parallel=single"], ["parallel=tp2_sp"]],
                         ids=["tp2", "dp2", "tp2_sp"])
def test_two_rank_training_matches_single_process(tmp_path, layout):
    """Through Lightning + the Megatron strategy: TP=2 / DP=2 / TP=2+SP give the single-process
    loss sequence (every TP rank sees the same batch; DP ranks split it)."""
    common = ["trainer.max_steps=30", "trainer.log_every_n_steps=1", "trainer.eval_every_n_steps=0",
              "trainer.checkpoint_every_n_steps=0", "trainer.progress_bar=false", "task.eval_samples_per_start=4"]
    single = tmp_path / "single"
    _ok(train([f"hydra.run.dir={single}", *common]))
    multi = tmp_path / "multi"
    _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "sft_tiny", f"hydra.run.dir={multi}",
                  *common, *layout]))
    a, b = _losses(single), _losses(multi)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["world_size"] == 2
    expected = {"parallel=tp2": (2, 1), "parallel=single": (1, 2), "parallel=tp2_sp": (2, 1)}[layout[0]]
    assert (summary["layout"]["tp"], summary["layout"]["dp"]) == expected
