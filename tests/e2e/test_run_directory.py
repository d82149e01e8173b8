"""End-to-end: a run directory never loses work. Re-running a command continues from its checkpoint
(also with a raised max_steps) and refuses one that does not fit; resume=never starts afresh beside
it; a second process on a busy run directory is refused, and SIGKILL releases the lock; a full disk
while saving names the problem, removes the partial checkpoint and keeps the last complete one."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, _clean_env, train

pytestmark = pytest.mark.slow

SHORT = ["trainer.progress_bar=false", "trainer.eval_every_n_steps=0", "task.eval_samples_per_start=1",
         "trainer.checkpoint_every_n_steps=10", "trainer.keep_last_n_checkpoints=5"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _train_steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def _checkpoints(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def test_rerun_continues_with_a_raised_max_steps_and_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    run = tmp_path / "run"
    _ok(train([f"hydra.run.dir={run}", *SHORT, "trainer.max_steps=20", "trainer.log_every_n_steps=1"]))
    assert _checkpoints(run) == ["step_0000010", "step_0000020"]
    # the same command, trained longer: no resume= needed
    proc = _ok(train([f"hydra.run.dir={run}", *SHORT, "trainer.max_steps=30", "trainer.log_every_n_steps=1"]))
    assert f"continuing from {run / 'checkpoints' / 'step_0000020'}" in proc.stderr
    assert "now 30" in proc.stderr                               # the schedule follows the new max_steps
    assert _train_steps(run) == list(range(1, 31))               # one history, no step twice
    assert _checkpoints(run) == ["step_0000010", "step_0000020", "step_0000030"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 30

    # another model shape: refused, naming the difference and the ways out; nothing changes
    def written():   # what the runs wrote (Hydra's own files and the lock file aside)
        return {p: p.stat().st_mtime_ns for p in run.rglob("*")
                if p.is_file() and ".hydra" not in p.parts and p.name not in ("train.log", ".nemo_rlhf.lock")}
    before = written()
    proc = train([f"hydra.run.dir={run}", *SHORT, "trainer.max_steps=40", "model.hidden_size=32"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.hidden_size: checkpoint 64, now 32" in proc.stderr
    assert "resume=never" in proc.stderr and "hydra.run.dir" in proc.stderr
    assert written() == before

    # resume=never: a fresh run in a new subdirectory; the earlier checkpoints stay
    proc = _ok(train([f"hydra.run.dir={run}", *SHORT, "trainer.max_steps=10", "model.hidden_size=32",
                      "resume=never"]))
    fresh = [p for p in run.iterdir() if p.name.startswith("restart-")]
    assert len(fresh) == 1 and _checkpoints(fresh[0]) == ["step_0000010"]
    assert _train_steps(fresh[0])[0] == 1 and str(fresh[0] / "summary.json") in proc.stdout
    assert _checkpoints(run) == ["step_0000010", "step_0000020", "step_0000030"]
    assert _train_steps(run) == list(range(1, 31))


def _wait_for_lock(run_dir, proc, timeout=120):
    lock = run_dir / ".nemo_rlhf.lock"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if lock.exists() and lock.read_text().strip():
            return json.loads(lock.read_text())
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError("the first run never took the lock")


def test_a_second_process_is_refused_and_sigkill_releases_the_lock(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "nemo_rlhf.train", "--config-name", "sft_tiny",
                              f"hydra.run.dir={run}", *SHORT, "trainer.max_steps=100000",
                              "trainer.checkpoint_every_n_steps=0"],
                             cwd=ROOT, env=_clean_env(None), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        holder = _wait_for_lock(run, first)
        assert holder["pid"] == first.pid
        second = train([f"hydra.run.dir={run}", *SHORT, "trainer.max_steps=5"])
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run: pid {first.pid} on host {holder['host']} since" in second.stderr
        assert first.poll() is None                           # the first run is untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # the kernel dropped the dead process's lock: a restart just works, with one history
    _ok(train([f"hydra.run.dir={run}", *SHORT, "trainer.max_steps=5", "trainer.log_every_n_steps=1"]))
    assert _train_steps(run) == [1, 2, 3, 4, 5]


def _in_small_filesystem(cmd, mount, out, size_kib):
    """Run ``cmd`` with a ``size_kib`` tmpfs at ``mount`` (a private mount namespace: nothing on the
    host changes) and copy ``mount/run`` to ``out`` afterwards. None when namespaces are unavailable."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {mount} || exit 90; "
              f"{' '.join(cmd)}; rc=$?; cp -a {mount}/run {out}; exit $rc")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          cwd=ROOT, env=_clean_env(None), capture_output=True, text=True, timeout=600)


def _with_a_file_size_limit(cmd, out, limit_bytes):
    """Fallback: every write past ``limit_bytes`` in one file fails with EFBIG (a real OS write error)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    cmd = [c.replace("{RUN}", str(out)) for c in cmd]
    return subprocess.run(cmd, cwd=ROOT, env=_clean_env(None), capture_output=True, text=True, timeout=600,
                          preexec_fn=limit)


def test_a_full_disk_while_saving_names_the_problem_and_keeps_the_last_checkpoint(tmp_path):
    mount, out = tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    cmd = [sys.executable, "-m", "nemo_rlhf.train", "--config-name", "sft_tiny", f"hydra.run.dir={mount / 'run'}",
           *SHORT, "trainer.max_steps=40", "trainer.log_every_n_steps=1"]
    # a checkpoint of sft_tiny takes about 1.4 MiB: the first fits in 2.5 MiB, the second does not
    proc = _in_small_filesystem(cmd, mount, out, size_kib=2500)
    if proc is not None:
        failed_step, kept = 20, ["step_0000010"]
    else:   # no mount namespace here: every checkpoint file write fails, so step 10 is the first loss
        cmd[cmd.index(f"hydra.run.dir={mount / 'run'}")] = f"hydra.run.dir={out}"
        proc = _with_a_file_size_limit(cmd, out, limit_bytes=200_000)
        failed_step, kept = 10, []
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-5000:]
    err = proc.stderr
    assert f"RunDirectoryError: could not write the step-{failed_step} checkpoint to" in err, err[-3000:]
    assert f"step_{failed_step:07d}.tmp" in err and "the partial directory was removed" in err
    assert "Traceback" not in err and "Logging error" not in err
    ckpts = out / "checkpoints"
    if kept:
        assert "the disk is full" in err and "MiB are free there" in err
        assert "the last complete checkpoint is" in err and "step_0000010 (step 10; resume=auto continues" in err
        assert (ckpts / "latest").read_text().strip() == "step_0000010"
    assert sorted(p.name for p in ckpts.iterdir() if p.name != "latest") == kept   # no .tmp left behind
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]   # readable
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, failed_step + 1))


def test_a_single_process_run_listens_on_loopback_only():
    """The process's listening TCP sockets after the distributed start-up of a single-process run."""
    code = r"""
import os
from nemo_rlhf.config.schema import ParallelConfig
from nemo_rlhf.parallel import init_distributed, initialize_model_parallel
init_distributed("gloo")
initialize_model_parallel(ParallelConfig())
mine = {os.readlink(f"/proc/self/fd/{fd}")[8:-1] for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:[")}
for table in ("tcp", "tcp6"):
    for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in mine:
            print(table, f[1].split(":")[0])
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(None), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listening = [line.split() for line in proc.stdout.splitlines()]
    loopback = {"0100007F", "00000000000000000000000001000000"}          # 127.0.0.1, ::1
    assert all(addr in loopback for _, addr in listening), listening
