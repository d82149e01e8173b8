"""Fault tolerance end to end (python -m nemo_rlhf.train in subprocesses, real signals):

- SIGKILL mid-run after a checkpoint (plus the .tmp a kill during the next checkpoint write leaves
  behind), then ``resume=auto``: the same loss sequence and final metrics as an uninterrupted run.
- SIGTERM: a checkpoint at the next step boundary, exit code 75, no traceback; resuming from it
  gives the uninterrupted run's results.
- 2 ranks (TP=2), SIGTERM to rank 1 only: both ranks stop at the same step and write one checkpoint.
"""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from nemo_rlhf.fault import EXIT_PREEMPTED
from tests.conftest import ROOT, _clean_env, free_port, train

pytestmark = pytest.mark.slow

STEPS, CKPT_EVERY = 60, 20
COMMON = [f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every_n_steps={CKPT_EVERY}", "trainer.log_every_n_steps=1",
          "trainer.eval_every_n_steps=30", "trainer.keep_last_n_checkpoints=10", "trainer.progress_bar=false",
          "task.eval_samples_per_start=2"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _records(run_dir, kind="train"):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in _records(run_dir)]


def _final(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["steps"], {k: v for k, v in summary["final"].items() if k != "eval_time_s"}


def _popen(args, log, env=None):
    """Start a training process writing to ``log`` (the environment of tests.conftest.train, whose
    thread count the uninterrupted run shares: it changes float sums)."""
    return subprocess.Popen(args, cwd=ROOT, env=_clean_env(env), stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_all(proc):
    """SIGKILL the run's whole process group, as Slurm kills a job (dist_checkpointing's worker
    processes included, which would otherwise outlive a killed trainer)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_for(cond, proc, timeout=300.0, poll=0.02):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the point to interrupt it"
        assert time.monotonic() < deadline, "timed out waiting for the run to reach the point to interrupt it"
        time.sleep(poll)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("ft") / "full"
    _ok(train([f"hydra.run.dir={run}", *COMMON]))
    return run


def test_sigkill_then_resume_auto_gives_the_uninterrupted_results(tmp_path, uninterrupted):
    run = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = _popen([sys.executable, "-m", "nemo_rlhf.train", "--config-name", "sft_tiny", f"hydra.run.dir={run}",
                       *COMMON], log)
        try:
            _wait_for(lambda: (run / "checkpoints" / "latest").exists(), proc)
        finally:
            _kill_all(proc)
    assert proc.returncode == -signal.SIGKILL
    saved = (run / "checkpoints" / "latest").read_text().strip()
    assert saved == f"step_{CKPT_EVERY:07d}" and not (run / "summary.json").exists()
    # a kill during the next checkpoint write leaves its .tmp directory behind
    stale = run / "checkpoints" / f"step_{2 * CKPT_EVERY:07d}.tmp"
    if not stale.exists():
        stale.mkdir()
        (stale / "__0_0.distcp").write_bytes(b"partial write")
    proc = _ok(train([f"hydra.run.dir={run}", *COMMON, "resume=auto"]))
    assert f"at step {CKPT_EVERY}" in proc.stderr and "resumed from" in proc.stderr
    assert not stale.exists()                       # replaced by the complete step-40 checkpoint
    assert [s for s, _ in _losses(run)] == list(range(1, STEPS + 1))
    assert _losses(run) == _losses(uninterrupted)   # bit-identical on CPU
    assert _final(run) == _final(uninterrupted)
    assert [r["step"] for r in _records(run, "eval")] == [0, 30, 60]


def test_sigterm_checkpoints_at_the_next_step_and_exits_75_then_resumes(tmp_path, uninterrupted):
    run = tmp_path / "terminated"
    with open(tmp_path / "terminated.log", "w") as log:
        proc = _popen([sys.executable, "-m", "nemo_rlhf.train", "--config-name", "sft_tiny", f"hydra.run.dir={run}",
                       *COMMON], log)
        try:
            _wait_for(lambda: len(_records(run)) >= 3, proc)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            _kill_all(proc)
    out = (tmp_path / "terminated.log").read_text()
    assert proc.returncode == EXIT_PREEMPTED, out[-5000:]
    assert "received SIGTERM" in out and "Traceback" not in out
    stopped = int(out.split("SIGTERM: writing a checkpoint at step ")[1].split(",")[0])
    assert 3 <= stopped < STEPS
    assert (run / "checkpoints" / f"step_{stopped:07d}" / "nemo_rlhf_meta.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert _records(run)[-1]["step"] == stopped and not (run / "summary.json").exists()
    proc = _ok(train([f"hydra.run.dir={run}", *COMMON, "resume=auto"]))
    assert f"at step {stopped}" in proc.stderr
    assert _losses(run) == _losses(uninterrupted)
    assert _final(run) == _final(uninterrupted)


@pytest.mark.distributed
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path):
    run = tmp_path / "tp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "nemo_rlhf.train", "--config-name", "sft_tiny", f"hydra.run.dir={run}", "parallel=tp2",
           *COMMON, "trainer.checkpoint_every_n_steps=0", "trainer.eval_every_n_steps=0"]
    with open(tmp_path / "tp2.log", "w") as log:
        proc = _popen(cmd, log, env=dict(OMP_NUM_THREADS="1"))  # 2 ranks on 2 cores
        try:
            _wait_for(lambda: len(_records(run)) >= 2, proc)
            rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if p.environ().get("RANK") == "1"]
            assert len(rank1) == 1
            os.kill(rank1[0].pid, signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            _kill_all(proc)
    out = (tmp_path / "tp2.log").read_text()
    # torchrun reports the workers' exit code 75; rank 0, never signalled, stopped too (else it
    # would wait forever in the next step's collectives) and wrote its half of the TP=2 checkpoint
    assert f"exitcode  : {EXIT_PREEMPTED}" in out or f"exitcode: {EXIT_PREEMPTED}" in out, out[-5000:]
    stopped = int(out.split("SIGTERM: writing a checkpoint at step ")[1].split(",")[0])
    assert 2 <= stopped < STEPS
    meta = json.loads((run / "checkpoints" / f"step_{stopped:07d}" / "nemo_rlhf_meta.json").read_text())
    assert meta["step"] == stopped and meta["layout"]["tensor_model_parallel_size"] == 2
    assert _records(run)[-1]["step"] == stopped and not (run / "summary.json").exists()


def test_ppo_sigterm_checkpoints_its_loop_state_and_resumes(tmp_path):
    """PPO (actor + separate critic + reference, KL controller): SIGTERM mid-PPO, exit 75, and the
    resumed run completes the remaining iterations exactly once."""
    run = tmp_path / "ppo"
    common = ["trainer.progress_bar=false", "trainer.max_steps=6", "trainer.eval_every_n_steps=0",
              "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=0", "ppo.sft_warmup.steps=0",
              "ppo.num_rollouts=32", "task.eval_samples_per_start=2"]
    with open(tmp_path / "ppo.log", "w") as log:
        proc = _popen([sys.executable, "-m", "nemo_rlhf.train", "--config-name", "ppo_tiny", f"hydra.run.dir={run}",
                       *common], log)
        try:
            _wait_for(lambda: len(_records(run)) >= 2, proc)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            _kill_all(proc)
    out = (tmp_path / "ppo.log").read_text()
    assert proc.returncode == EXIT_PREEMPTED, out[-5000:]
    stopped = int(out.split("SIGTERM: writing a checkpoint at step ")[1].split(",")[0])
    assert 2 <= stopped < 6 and (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    proc = _ok(train([f"hydra.run.dir={run}", *common, "resume=auto"], config="ppo_tiny"))
    assert f"at step {stopped}" in proc.stderr
    assert [r["step"] for r in _records(run)] == list(range(1, 7))
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
