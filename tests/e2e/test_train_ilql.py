"""End-to-end ILQL: python -m nemo_rlhf.train --config-name ilql_tiny (shortened)."""
import json

import pytest

from tests.conftest import torchrun, train

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
    assert final["beta"] >= 1
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
