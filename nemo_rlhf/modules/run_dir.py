"""The run-directory contract: resolved config, ``metrics.jsonl`` (one JSON object per log/eval
step), TensorBoard/CSV through Lightning's loggers, checkpoints, and ``summary.json`` with the
first and last evaluation (``{"initial": {...}, "final": {...}}``). Only rank 0 writes."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from nemo_rlhf.parallel.distributed import is_rank_zero


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


class RunDirectory:
    def __init__(self, path: str | os.PathLike, loggers: Iterable = ()):
        self.path = Path(path)
        self.loggers = list(loggers)
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
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {f"{kind}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for logger in self.loggers:
            logger.log_metrics(numeric, step=step)

    def read_metrics(self, kind: Optional[str] = None) -> List[Dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        with open(self.metrics_file) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r for r in rows if kind is None or r.get("kind") == kind]

    def write_summary(self, initial: Dict[str, Any], final: Dict[str, Any], extra: Dict[str, Any]) -> None:
        if not is_rank_zero():
            return
        summary = {"initial": initial, "final": final, **extra}
        tmp = self.path / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, self.path / "summary.json")
        for logger in self.loggers:
            logger.save()
