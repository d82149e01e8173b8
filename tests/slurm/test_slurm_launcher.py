"""launchers/multinode.sh on a real single-node Slurm cluster on loopback (slurmctld + slurmd +
munge, Debian packages; scripts/slurm/start_local_cluster.sh installs and starts it).

One job: 2 srun tasks at TP=2 on CPU/gloo. Once it trains, it gets the time-limit signal the way
`#SBATCH --signal=B:USR1@120` delivers it (USR1 to the batch shell); the tasks checkpoint and exit
75, the script requeues the job, the requeued job resumes and finishes. Skipped, with the reason,
where Slurm cannot be installed (not root, no apt-get); NEMO_RLHF_REQUIRE_SLURM=1 (CI) turns that
into a failure.
"""
import json
import subprocess
import sys
import time

import pytest

from nemo_rlhf.parallel.distributed import detect_launch_env
from tests.conftest import ROOT, _clean_env

LAUNCHER = ROOT / "launchers" / "multinode.sh"
STEPS = 24


def _job_fields(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}


def _in_queue(job: str) -> bool:
    """The job is not finished yet, by squeue. A failed query (a busy slurmctld times out) counts
    as not finished; a job already purged from slurmctld is "Invalid job id"."""
    q = subprocess.run(["squeue", "-h", "-j", job, "--states=all", "-o", "%T"], capture_output=True, text=True,
                       timeout=60)
    if q.returncode != 0:
        return "Invalid job id" not in q.stderr
    return q.stdout.strip() not in FINAL_STATES


def _wait(cond, timeout: float, what: str, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


def _train_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def test_batch_shell_is_not_a_rank_but_srun_tasks_are():
    """The batch script's shell has SLURM_PROCID=0 and the job's SLURM_NTASKS but no job step: a
    process started there is a single process (it would otherwise wait forever for rank 1)."""
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm",
             "SLURM_TASKS_PER_NODE": "2"}
    assert detect_launch_env(batch).launcher == "single"
    task = dict(batch, SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2",
                SLURM_STEP_TASKS_PER_NODE="2", MASTER_PORT="29999")
    env = detect_launch_env(task)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.num_nodes) == ("slurm", 1, 2, 1, 1)
    assert (env.master_addr, env.master_port) == ("vm", 29999)
    # a step smaller than the job: the step's task count is the world
    env = detect_launch_env(dict(task, SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="4", SLURM_STEP_TASKS_PER_NODE="2(x2)"))
    assert (env.world_size, env.local_world_size, env.num_nodes) == (4, 2, 2)


def test_launcher_outside_slurm_names_the_problem():
    env = {k: v for k, v in _clean_env(None).items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(LAUNCHER), "sft_tiny"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "submit it with sbatch" in proc.stderr
    proc = subprocess.run(["bash", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "usage: sbatch" in proc.stderr


@pytest.mark.slow
def test_sbatch_tp2_job_is_requeued_on_the_time_limit_signal_and_resumes(slurm_cluster, tmp_path):
    (tmp_path / "logs").mkdir()
    run_dir = tmp_path / "run"
    env = _clean_env(dict(RUN_DIR=str(run_dir), NEMO_RLHF_PYTHON=sys.executable, OMP_NUM_THREADS="1"))
    overrides = ["parallel=tp2", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1",
                 "trainer.eval_every_n_steps=0", "trainer.checkpoint_every_n_steps=100",
                 "task.eval_samples_per_start=2", "trainer.progress_bar=false"]
    submit = subprocess.run(
        ["sbatch", "--parsable", "--job-name=nemo_rlhf_test", "--nodes=1", "--ntasks-per-node=2",
         "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", str(LAUNCHER), "sft_tiny", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    log = tmp_path / "logs" / f"nemo_rlhf_test-{job}.out"
    try:
        # 1. training has started: the time-limit signal, as --signal=B:USR1@120 sends it
        _wait(lambda: _train_steps(run_dir), 300, "the first training step", log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=60)
        # 2. the tasks checkpoint and exit 75, the script requeues the job, which starts again once
        #    its old credential expired (AuthInfo=cred_expire, 15 s on the local cluster), resumes
        #    and finishes (polling squeue, as a user would)
        _wait(lambda: not _in_queue(job), 300, "the job to finish", log)
    finally:
        if _in_queue(job):
            subprocess.run(["scancel", job], timeout=60)
    fields = _job_fields(job)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
    # first run: stopped by the signal with a checkpoint; second run: resumed from it
    assert "USR1 received" in text and "Exited with exit code 75" in text and "requeueing job" in text
    assert "(restart 1)" in text and "resumed from" in text
    stopped_at = int(text.split("writing a checkpoint at step ")[1].split(",")[0])
    assert 1 <= stopped_at < STEPS and f"at step {stopped_at}" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    assert (summary["layout"]["tp"], summary["layout"]["dp"]) == (2, 1)
    assert "optimality" in summary["final"] and "valid_rate" in summary["initial"]
    assert _train_steps(run_dir) == list(range(1, STEPS + 1))       # no step lost or repeated
    assert (run_dir / "checkpoints" / f"step_{stopped_at:07d}" / "nemo_rlhf_meta.json").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
