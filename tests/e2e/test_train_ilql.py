"""End-to-end ILQL: python -m nemo_rlhf.train --config-name ilql_tiny (shortened)."""
import json
import shutil

import pytest

from tests.conftest import torchrun, train
from tests.helpers.runs import summary, train_rows, without_timings

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_ilql_tiny_beats_the_behaviour_data_and_beta_zero(tmp_path):
    run = tmp_path / "ilql"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "trainer.max_steps=600",
               "trainer.eval_every_n_steps=0", "trainer.checkpoint_every_n_steps=0"], config="ilql_tiny"))
    final = json.loads((run / "summary.json").read_text())["final"]
    behaviour = final["behaviour_optimality"]
    assert 0.3 < behaviour < 0.4
    assert final["optimality"] >= behaviour + 0.15            # the bar
    assert final["optimality"] > final["optimality_beta0"]
    assert final["valid_rate"] >= 0.9


@pytest.mark.distributed
def test_ilql_tiny_at_pp2_reaches_the_single_process_quality(tmp_path):
    """ILQL's Q / target-Q / V heads on the last of two pipeline stages (the step itself equals the
    single-process step in tests/distributed; the random initialisation differs with the layout)."""
    run = tmp_path / "ilql_pp2"
    _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "ilql_tiny", f"hydra.run.dir={run}", "parallel=pp2",
                  "trainer.progress_bar=false", "trainer.max_steps=600", "trainer.eval_every_n_steps=0",
                  "trainer.checkpoint_every_n_steps=0"]))
    s = json.loads((run / "summary.json").read_text())
    final = s["final"]
    assert s["layout"]["pp"] == 2
    assert final["optimality"] >= final["behaviour_optimality"] + 0.15   # the single-process bar above
    assert final["optimality"] > final["optimality_beta0"] and final["valid_rate"] >= 0.9


@pytest.mark.distributed
def test_ilql_at_pp2_and_pp2_vpp2_equals_the_single_process_run_and_resumes(tmp_path):
    """ILQL from one 4-layer SFT trunk (the heads are drawn from a generator seeded by trainer.seed,
    so every layout starts from the same heads): at PP=2 and at PP=2 x VPP=2 (heads on the last
    chunk; evaluation samples round the ring) the losses, Q / V means and the final evaluation equal
    the single-process run's; the PP=2 run, cut after its step-2 checkpoint, resumes with exactly
    the rows of the uninterrupted run."""
    sft = tmp_path / "sft"
    _ok(train([f"hydra.run.dir={sft}", "trainer.max_steps=100", "trainer.eval_every_n_steps=0",
               "trainer.progress_bar=false", "model.num_layers=4"]))
    common = ["trainer.max_steps=4", "trainer.eval_every_n_steps=0", "trainer.progress_bar=false",
              "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=2", "task.eval_samples_per_start=4",
              "model.num_layers=4", f"model.path={sft / 'checkpoints' / 'step_0000100'}"]
    single = tmp_path / "single"
    _ok(train([f"hydra.run.dir={single}", *common], config="ilql_tiny"))
    a, sa = train_rows(single), summary(single)
    keys = ("loss", "loss_q", "loss_v", "loss_cql", "loss_awac", "q_mean", "target_q_mean", "v_mean", "grad_norm")
    for layout, vpp in (("pp2", 1), ("pp2_vpp2", 2)):
        run = tmp_path / layout
        launch = lambda d, *extra: _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "ilql_tiny",
                                                 f"hydra.run.dir={d}", *common, f"parallel={layout}", *extra]))
        launch(run)
        b = train_rows(run)
        assert [r["step"] for r in b] == [1, 2, 3, 4]
        for ra, rb in zip(a, b):
            for key in keys:
                assert abs(ra[key] - rb[key]) < 1e-5 * max(1.0, abs(ra[key])), (layout, ra["step"], key, ra[key], rb[key])
        sb = summary(run)
        assert (sb["layout"]["pp"], sb["layout"]["vpp"]) == (2, vpp)
        for metric in ("optimality_greedy", "optimality_beta0_greedy", "valid_rate_greedy"):
            assert sa["final"][metric] == sb["final"][metric], (layout, metric)
        assert abs(sa["final"]["optimality"] - sb["final"]["optimality"]) < 0.02
        if layout == "pp2":
            cut = tmp_path / "cut"
            shutil.copytree(run, cut)
            shutil.rmtree(cut / "checkpoints" / "step_0000004")
            proc = launch(cut, "resume=auto")
            assert "at step 2" in proc.stderr + proc.stdout
            assert without_timings(train_rows(cut)) == without_timings(b)


def test_ilql_from_a_jsonl_file_and_malformed_file(tmp_path):
    data = tmp_path / "walks.jsonl"
    lines = [{"sample": "bca" if i % 2 else ["b", "cfa"], "reward": float(i % 3)} for i in range(64)]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    run = tmp_path / "ok"
    _ok(train([f"hydra.run.dir={run}", f"ilql.samples_path={data}", "trainer.max_steps=4",
               "trainer.progress_bar=false", "task.eval_samples_per_start=1", "trainer.eval_every_n_steps=0"],
              config="ilql_tiny"))
    assert json.loads((run / "summary.json").read_text())["num_samples"] == 64
    data.write_text(json.dumps(lines[0]) + "\n" + '{"sample": "ba", "reward": }\n')
    proc = train([f"hydra.run.dir={tmp_path / 'bad'}", f"ilql.samples_path={data}", "trainer.max_steps=4"],
                 config="ilql_tiny")
    assert proc.returncode != 0 and f"{data}:2: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
