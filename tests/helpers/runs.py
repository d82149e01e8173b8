"""Reading a finished run in end-to-end tests: its exit, summary.json and metrics.jsonl."""
import json


def ok(proc):
    """``proc`` (a finished nemo_rlhf.train subprocess) succeeded; else its output's tail."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def summary(run):
    return json.loads((run / "summary.json").read_text())


def train_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def without_timings(rows):
    """Train records without their wall-clock fields (``*_s``, ``time/*``, ``*per_s``): what a
    resumed run must reproduce exactly."""
    return [{k: v for k, v in r.items() if not (k.endswith("_s") or k.startswith("time/"))} for r in rows]


def losses(run):
    return [(r["step"], r["loss"]) for r in train_rows(run)]
