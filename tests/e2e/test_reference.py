"""scripts/reference.py (after trlX's ``trlx.reference``) on a temporary clone of this repository:
a commit that breaks sft_tiny (learning rate ~0) is reported worse than the commit before it,
while dpo_tiny, which the commit does not touch, is not; each side imports its own tree's
nemo_rlhf, and the report (table, report.md / report.json, curves.png) says so."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import _clean_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]   # the checkout this test runs in (CI: a clean clone with .git)
SCRIPT = REPO / "scripts" / "reference.py"


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _reference(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=_clean_env({"OMP_NUM_THREADS": "1"}),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def broken_clone(tmp_path):
    """(clone, base commit): a clone of this repository with one more commit that sets sft_tiny's
    learning rate to 1e-6 (and its cosine floor to 0): sft_tiny then learns nothing in 100 steps."""
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "--quiet", "--shared", str(REPO), str(clone)], check=True)
    base = _git(clone, "rev-parse", "HEAD")
    conf = clone / "conf" / "sft_tiny.yaml"
    text = conf.read_text()
    assert re.search(r"^  lr: 3.0e-3$", text, re.M) and re.search(r"^  min_lr: 1.0e-4$", text, re.M)
    conf.write_text(text.replace("  lr: 3.0e-3", "  lr: 1.0e-6").replace("  min_lr: 1.0e-4", "  min_lr: 0.0"))
    _git(clone, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-am", "break sft_tiny")
    return clone, base


def test_reference_marks_the_broken_branch_worse(broken_clone, tmp_path):
    clone, base = broken_clone
    out = tmp_path / "out"
    # wall-time verdicts of runs of a few seconds on a shared machine are noise: only the metrics count here
    proc = _reference("--repo", str(clone), "--ref", base, "--configs", "sft_tiny,dpo_tiny", "--quick",
                      "--out", str(out), "--time-slack", "600")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "verdict: WORSE on sft_tiny" in proc.stdout
    assert re.search(r"^sft_tiny\s+optimality\s+\S+\s+\S+\s+-\S+\s+worse$", proc.stdout, re.M), proc.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["ref_commit"] == base and report["worse"] == ["sft_tiny"]
    sft, dpo = report["configs"]["sft_tiny"], report["configs"]["dpo_tiny"]
    assert sft["verdict"] == "worse" and sft["headline"] == "optimality"
    head = sft["rows"][0]
    assert head["metric"] == "optimality" and head["branch"] < head["ref"] - 0.05
    assert dpo["verdict"] == "ok" and dpo["rows"][0]["metric"] == "optimality"
    assert dpo["rows"][0]["delta"] == 0.0   # same code, same seeds: the same numbers
    for side in ("ref", "branch"):   # each run of each side finished and wrote its summary
        assert (Path(sft[side]["run_dir"]) / "summary.json").is_file()
        assert Path(dpo[side]["run_dir"]).parent == out / side
    # each side imported its own tree's package: the branch the clone, the ref an exported tree
    assert Path(report["packages"]["branch"]).resolve() == (clone / "nemo_rlhf" / "__init__.py").resolve()
    assert not Path(report["packages"]["ref"]).resolve().is_relative_to(clone.resolve())
    assert Path(report["packages"]["ref"]).parts[-2:] == ("nemo_rlhf", "__init__.py")
    lr = {side: yaml.safe_load((Path(sft[side]["run_dir"]) / "config.yaml").read_text())["optim"]["lr"]
          for side in ("ref", "branch")}
    assert lr == {"ref": 3e-3, "branch": 1e-6}
    assert (out / "curves.png").stat().st_size > 0
    assert "WORSE on sft_tiny" in (out / "report.md").read_text()


def test_an_unknown_config_or_ref_is_one_line(broken_clone, tmp_path):
    clone, _ = broken_clone
    for args, message in [(["--ref", "no-such-ref"], "no git ref 'no-such-ref'"),
                          (["--configs", "sft_tiny,nope_tiny"], "unknown config 'nope_tiny': no conf/nope_tiny.yaml")]:
        proc = _reference("--repo", str(clone), "--out", str(tmp_path / "out"), *args, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
