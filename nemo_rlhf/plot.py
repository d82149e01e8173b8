"""A PNG of the curves a user looks at, from a run directory's metrics.jsonl.

    python -m nemo_rlhf.plot RUN_DIR [--out FILE]      # default RUN_DIR/curves.png

Every run writes it at its end too (``logger.plot=false`` to skip). One panel per metric that the
run logged, the ones a user reads first (reward, KL, losses, evaluation metrics, throughput) in that
order: train records as lines, evaluations as points. Works on a run in progress (a cut last line
is skipped) and on any recipe's metrics.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

TRAIN_FIRST = ("reward_mean", "kl", "loss", "actor/loss", "critic/loss", "accuracy", "reward_margin", "entropy",
               "response_length", "zero_std_groups", "accepted", "lr", "grad_norm", "tokens_per_s",
               "generation_tokens_per_s", "mfu")
EVAL_FIRST = ("optimality", "optimality_greedy", "valid_rate", "accuracy", "accuracy_greedy", "accuracy_equal_length",
              "reward_margin", "eval_reward_mean")
MAX_PANELS = 16


def read_series(metrics_file: Path) -> Tuple[Dict[str, List[Tuple[int, float]]], Dict[str, List[Tuple[int, float]]]]:
    """({train metric: [(step, value)]}, {eval metric: [(step, value)]}) of the numeric values."""
    train: Dict[str, List[Tuple[int, float]]] = {}
    evals: Dict[str, List[Tuple[int, float]]] = {}
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue   # a line cut by a crash or a run still writing
        target = evals if row.get("kind") == "eval" else train
        for key, value in row.items():
            if key in ("step", "kind") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                target.setdefault(key, []).append((int(row["step"]), float(value)))
    return train, evals


SKIP = ("model_tokens", "num_tokens", "update_skipped", "step_time_s", "eval_time_s", "heldout_pairs", "lr",
        "behaviour_optimality", "percentile", "kl_coef")
"""Bookkeeping, not curves (also under a prefix: actor/lr ...); time/* too."""


def _chosen(series: Dict[str, list], first: Tuple[str, ...], limit: int) -> List[str]:
    ordered = [k for k in first if k in series] + sorted(k for k in series if k not in first)
    keep = [k for k in ordered if not k.startswith("time/") and k.rsplit("/", 1)[-1] not in SKIP]
    return [k for k in keep if len({v for _, v in series[k]}) > 1 or k in first][:limit]


def plot_run(run_dir, out: Optional[Path] = None) -> Path:
    """Write the PNG for ``run_dir`` (a directory with metrics.jsonl); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a nemo_rlhf run directory?)")
    train, evals = read_series(metrics)
    eval_keys = [("eval", k) for k in _chosen(evals, EVAL_FIRST, 4)]
    keys = [("train", k) for k in _chosen(train, TRAIN_FIRST, MAX_PANELS - len(eval_keys))] + eval_keys
    if not keys:
        raise ValueError(f"{metrics} has no numeric metrics to plot yet")
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (kind, key) in zip(axes.flat, keys):
        points = (train if kind == "train" else evals)[key]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if kind == "eval" or len(points) < 3 else None,
                color="tab:orange" if kind == "eval" else "tab:blue")
        ax.set_title(f"{key} ({kind})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nemo_rlhf.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="the PNG to write (default RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except (FileNotFoundError, ValueError) as e:
        print(f"nemo_rlhf.plot: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
