"""The run-directory contract: resolved config, ``metrics.jsonl`` (one JSON object per log/eval
step), TensorBoard/CSV through Lightning's loggers, checkpoints, and ``summary.json`` with the
first and last evaluation (``{"initial": {...}, "final": {...}}``). Only rank 0 writes.

:class:`RunDirLock` keeps a second process off a run directory while a run uses it."""
from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from nemo_rlhf.errors import RunDirectoryError
from nemo_rlhf.parallel.distributed import is_rank_zero


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


class RunDirectory:
    def __init__(self, path: str | os.PathLike, loggers: Iterable = ()):
        self.path = Path(path)
        self.loggers = list(loggers)
        self.run_id: Optional[str] = None   # the run writing here (its checkpoints carry it)
        if is_rank_zero():
            self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, yaml_text: str) -> None:
        if is_rank_zero():
            (self.path / "config.yaml").write_text(yaml_text)

    def truncate_metrics_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they will be redone)."""
        if not is_rank_zero() or not self.metrics_file.exists():
            return
        keep = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        tmp = self.metrics_file.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.metrics_file)

    def log(self, step: int, metrics: Dict[str, Any], kind: str) -> None:
        if not is_rank_zero():
            return
        record = {"step": step, "kind": kind, **{k: _clean(v) for k, v in metrics.items()}}
        try:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise RunDirectoryError(f"could not append the step-{step} {kind} metrics to {self.metrics_file} "
                                    f"({e}); the lines before stay readable") from e
        numeric = {f"{kind}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for logger in self.loggers:
            logger.log_metrics(numeric, step=step)

    def read_metrics(self, kind: Optional[str] = None) -> List[Dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        rows = []
        with open(self.metrics_file) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:   # a line cut short by a full disk or a kill: the end
                    break
        return [r for r in rows if kind is None or r.get("kind") == kind]

    def write_summary(self, initial: Dict[str, Any], final: Dict[str, Any], extra: Dict[str, Any]) -> None:
        if not is_rank_zero():
            return
        train = self.read_metrics("train")
        # the last train record (rewards, KL, clip fractions, throughput, ...) next to the evaluations
        summary = {"initial": initial, "final": final, **extra, "last_train": train[-1] if train else None}
        tmp = self.path / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, self.path / "summary.json")
        for logger in self.loggers:
            logger.save()
            logger.finalize("success")   # (wandb closes its run; TensorBoard / CSV flush)


class RunDirLock:
    """An exclusive lock on a run directory for the life of a run: ``flock`` on
    ``<dir>/.nemo_rlhf.lock``, which the kernel releases when the process ends, SIGKILL included, so
    a restart or a Slurm requeue just takes it again. A second process gets a RunDirectoryError
    naming the holder (host, pid, since when)."""

    FILE = ".nemo_rlhf.lock"

    def __init__(self, directory: str | os.PathLike):
        self.file = Path(directory) / self.FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on host {h['host']} since {h['since']}"
            except (ValueError, KeyError, TypeError):
                who = "another process (it is starting up)"
            raise RunDirectoryError(
                f"{self.file.parent} is in use by another run: {who}. Wait for it to end or stop it "
                f"(its checkpoints stay; a restart continues from them), or use another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
