"""Reference benchmark (after trlX's ``trlx.reference``): is this checkout worse than a git ref?

    python scripts/reference.py                                    # sft_tiny, ppo_tiny, dpo_tiny, grpo_tiny vs main
    python scripts/reference.py --ref HEAD~3 --configs sft_tiny,ppo_tiny --out runs/ref_check
    python scripts/reference.py --quick                            # shortened runs (about a minute per config and side)
    python scripts/reference.py --set trainer.seed=7 --set ppo_tiny:trainer.max_steps=20 --no-fail

Runs each config twice with the same Python (this interpreter): once on the current checkout (the
working tree as it is, uncommitted changes included: "branch") and once on ``--ref`` (exported with
``git archive`` into a temporary directory: "ref"). Each run is ``python -m nemo_rlhf.train
--config-name CONFIG hydra.run.dir=OUT/<side>/<config> [overrides]`` started in that tree with
``PYTHONPATH`` set to it, so that tree's nemo_rlhf and conf/ are used (checked before the runs: the
package path each side imports is in report.json). The runs of one config go back to back (ref,
then branch) so that both see about the same machine load.

From each run's summary.json (``final``, ``wall_time_s``) and metrics.jsonl it writes, under --out:
report.md, report.json and curves.png (ref and branch curves overlaid, one row per config), and
prints the table: config, metric, ref value, branch value, delta, verdict. The headline metric of a
config is the first of optimality, accuracy, reward_margin that its final evaluation has (optimality
for the randomwalks configs; higher is better). A config is **worse** when the branch's headline
metric is lower than the ref's by more than --tolerance (default 0.05), when its wall time is more
than --time-ratio (default 1.5) times the ref's and at least --time-slack seconds (default 2) longer
(so the noise of short runs on a shared machine is no verdict), or when the branch run failed.
Exit status: 1 when any config is worse or a run failed (0 with --no-fail), 2 for a usage error (an
unknown config, a git ref that does not exist, an --out that already holds runs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # nemo_rlhf.plot of this checkout, whatever is installed

CONFIGS = ("sft_tiny", "ppo_tiny", "dpo_tiny", "grpo_tiny")
HEADLINE = ("optimality", "accuracy", "reward_margin")
"""The headline metric of a run: the first of these its final evaluation has (higher is better)."""
SHOWN = ("valid_rate", "optimality_greedy")
"""Final metrics shown beside the headline, for the reader (no verdict on them)."""
_SHORT = ["trainer.checkpoint_every_n_steps=0", "task.eval_samples_per_start=8", "trainer.progress_bar=false"]
QUICK: Dict[str, List[str]] = {
    "sft_tiny": ["trainer.max_steps=100", "trainer.eval_every_n_steps=50", *_SHORT],
    "ppo_tiny": ["ppo.sft_warmup.steps=100", "trainer.max_steps=5", "ppo.num_rollouts=64", "trainer.eval_every_n_steps=0",
                 *_SHORT],
    "grpo_tiny": ["ppo.sft_warmup.steps=100", "trainer.max_steps=5", "ppo.num_rollouts=64", "trainer.eval_every_n_steps=0",
                  *_SHORT],
    "dpo_tiny": ["dpo.sft_warmup.steps=100", "trainer.max_steps=20", "dpo.num_pairs=640", "trainer.eval_every_n_steps=10",
                 *_SHORT],
}
"""--quick: overrides that shorten each default config to seconds of training (a smoke check)."""
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID")


class UsageError(Exception):
    """A problem with the command (config, ref, output directory): one line, exit status 2."""


# ---------------------------------------------------------------------------------------- git and trees
def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"git {' '.join(args)} in {repo}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def resolve_ref(repo: Path, ref: str) -> str:
    """The commit ``ref`` names in ``repo`` (a branch, tag, sha, HEAD~2, ...)."""
    if not (repo / ".git").exists():
        raise UsageError(f"{repo} is not a git checkout (no .git): cannot compare with a ref")
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"no git ref {ref!r} in {repo} (git branch -a lists the branches)")
    return proc.stdout.strip()


def describe_checkout(repo: Path) -> str:
    """``<short sha>`` of HEAD, with ``+changes`` when the working tree differs from it."""
    sha = git(repo, "rev-parse", "--short", "HEAD")
    dirty = git(repo, "status", "--porcelain", "--untracked-files=no")
    return sha + ("+changes" if dirty else "")


def export_tree(repo: Path, commit: str, dest: Path) -> Path:
    """The files of ``commit`` in ``dest`` (``git archive``: the repository itself is not touched)."""
    dest.mkdir(parents=True)
    proc = subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", commit], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:   # Python without extraction filters (< 3.10.12): git's own archive of our repository
            tar.extractall(dest)
    if proc.wait() != 0:
        raise UsageError(f"git archive {commit} in {repo} failed")
    return dest


def check_configs(configs: List[str], trees: Dict[str, Path], ref: str) -> None:
    for name in configs:
        for side in ("branch", "ref"):
            tree = trees[side]
            if not (tree / "conf" / f"{name}.yaml").is_file():
                known = ", ".join(sorted(p.stem for p in (tree / "conf").glob("*.yaml")))
                where = "this checkout" if side == "branch" else f"ref {ref}"
                raise UsageError(f"unknown config {name!r}: no conf/{name}.yaml in {where} (known: {known})")


def overrides_per_config(configs: List[str], sets: List[str], quick: bool) -> Dict[str, List[str]]:
    """``--set [CONFIG:]KEY=VALUE`` (and the --quick presets) as Hydra overrides per config."""
    out: Dict[str, List[str]] = {}
    for name in configs:
        if quick and name not in QUICK:
            raise UsageError(f"--quick has no preset for {name} (it has {', '.join(QUICK)}): shorten it with --set")
        out[name] = list(QUICK[name]) if quick else []
    for item in sets:
        key, eq, _ = item.partition("=")
        if not eq:
            raise UsageError(f"--set {item}: expected [CONFIG:]KEY=VALUE")
        target, colon, _ = key.partition(":")
        if colon:
            if target not in out:
                raise UsageError(f"--set {item}: {target} is not one of --configs ({', '.join(configs)})")
            out[target].append(item.split(":", 1)[1])
        else:
            for overrides in out.values():
                overrides.append(item)
    return out


# ---------------------------------------------------------------------------------------- runs
def child_env(tree: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["PYTHONPATH"] = str(tree)   # only this tree: its nemo_rlhf comes before the installed one
    return env


def imported_package(tree: Path) -> str:
    """The nemo_rlhf a run started in ``tree`` imports; an error unless it is ``tree``'s."""
    proc = subprocess.run([sys.executable, "-c", "import nemo_rlhf; print(nemo_rlhf.__file__)"], cwd=tree,
                          env=child_env(tree), capture_output=True, text=True)
    path = proc.stdout.strip()
    if proc.returncode != 0 or not Path(path).resolve().is_relative_to(tree.resolve()):
        raise UsageError(f"a run in {tree} would import nemo_rlhf from {path or proc.stderr.strip()!r}, "
                         f"not from {tree}")
    return path


def run_config(tree: Path, config: str, overrides: List[str], run_dir: Path, timeout: float) -> dict:
    """One ``python -m nemo_rlhf.train`` run in ``tree``; its log is ``run_dir``.log."""
    cmd = [sys.executable, "-m", "nemo_rlhf.train", "--config-name", config, f"hydra.run.dir={run_dir}", *overrides]
    log_file = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            code = subprocess.run(cmd, cwd=tree, env=child_env(tree), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = {"run_dir": str(run_dir), "log": str(log_file), "returncode": code,
              "process_s": round(time.perf_counter() - t0, 2)}
    summary_file = run_dir / "summary.json"
    if code == 0 and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        result.update(final=summary["final"], initial=summary.get("initial", {}), wall_time_s=summary["wall_time_s"],
                      steps=summary.get("steps"))
    return result


# ---------------------------------------------------------------------------------------- verdicts
def headline_of(final: dict) -> Optional[str]:
    return next((k for k in HEADLINE if isinstance(final.get(k), (int, float))), None)


def compare(ref: dict, branch: dict, tolerance: float, time_ratio: float, time_slack: float) -> dict:
    """Rows (metric, ref, branch, delta, verdict) and the config's verdict: worse | ok | ref failed."""
    if "final" not in branch:
        return {"verdict": "worse", "reason": f"the branch run failed (exit {branch['returncode']}: {branch['log']})",
                "rows": []}
    if "final" not in ref:
        return {"verdict": "ref failed", "reason": f"the ref run failed (exit {ref['returncode']}: {ref['log']})",
                "rows": []}
    rows, reasons = [], []
    headline = headline_of(ref["final"])
    if headline is None or headline not in branch["final"]:
        return {"verdict": "worse", "reason": f"no headline metric ({', '.join(HEADLINE)}) in both runs", "rows": []}
    r, b = float(ref["final"][headline]), float(branch["final"][headline])
    verdict = "worse" if b < r - tolerance else "better" if b > r + tolerance else "same"
    rows.append({"metric": headline, "ref": r, "branch": b, "delta": b - r, "verdict": verdict})
    if verdict == "worse":
        reasons.append(f"{headline} {b:.3f} < {r:.3f} - {tolerance}")
    for key in SHOWN:
        if key != headline and key in ref["final"] and key in branch["final"]:
            r, b = float(ref["final"][key]), float(branch["final"][key])
            rows.append({"metric": key, "ref": r, "branch": b, "delta": b - r, "verdict": "-"})
    r, b = float(ref["wall_time_s"]), float(branch["wall_time_s"])
    slower = b > time_ratio * r and b - r > time_slack
    faster = r > time_ratio * b and r - b > time_slack
    rows.append({"metric": "wall_time_s", "ref": r, "branch": b, "delta": b - r,
                 "verdict": "worse" if slower else "faster" if faster else "same"})
    if slower:
        reasons.append(f"wall time {b:.1f}s > {time_ratio} x {r:.1f}s")
    return {"verdict": "worse" if reasons else "ok", "reason": "; ".join(reasons), "rows": rows}


# ---------------------------------------------------------------------------------------- report
def plot_curves(results: Dict[str, dict], labels: Dict[str, str], out: Path) -> Optional[Path]:
    """curves.png: per config (a row), the headline evaluation metric and two training curves, the
    ref's and the branch's overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nemo_rlhf.plot import TRAIN_FIRST, read_series

    panels = []
    for config, res in results.items():
        series = {}
        for side in ("ref", "branch"):
            metrics = Path(res[side]["run_dir"]) / "metrics.jsonl"
            series[side] = read_series(metrics) if metrics.is_file() else ({}, {})
        evals = [k for k in (res.get("headline"),) if k and any(k in s[1] for s in series.values())]
        trains = [k for k in TRAIN_FIRST if k != "lr" and any(len(s[0].get(k, [])) > 1 for s in series.values())][:2]
        panels.append((config, series, [("eval", k) for k in evals] + [("train", k) for k in trains]))
    cols = max([len(keys) for _, _, keys in panels] + [1])
    if not any(keys for _, _, keys in panels):
        return None
    fig, axes = plt.subplots(len(panels), cols, figsize=(4.2 * cols, 3 * len(panels)), squeeze=False)
    for row, (config, series, keys) in enumerate(panels):
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(keys):
                ax.axis("off")
                continue
            kind, key = keys[col]
            for side, color, width in (("ref", "tab:gray", 3.0), ("branch", "tab:blue", 1.2)):   # equal curves: both seen
                points = series[side][0 if kind == "train" else 1].get(key, [])
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, color=color, label=labels[side], linewidth=width, alpha=0.8,
                            marker="o" if kind == "eval" else None)
            ax.set_title(f"{config}: {key} ({kind})", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _num(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3f}"


def table_rows(results: Dict[str, dict]) -> List[List[str]]:
    rows = []
    for config, res in results.items():
        if not res["rows"]:
            rows.append([config, "-", "-", "-", "-", f"{res['verdict']} ({res['reason']})"])
        for r in res["rows"]:
            rows.append([config, r["metric"], _num(r["ref"]), _num(r["branch"]), f"{r['delta']:+.3f}", r["verdict"]])
    return rows


def format_table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_report(out: Path, report: dict, labels: Dict[str, str], curves: Optional[Path]) -> str:
    header = ["config", "metric", f"ref ({labels['ref']})", f"branch ({labels['branch']})", "delta", "verdict"]
    rows = table_rows(report["configs"])
    table = format_table(header, rows)
    worse = report["worse"]
    verdict = f"WORSE on {', '.join(worse)}" if worse else "not worse"
    md = [f"# Reference benchmark: {labels['branch']} vs {labels['ref']}", "",
          f"Verdict: **{verdict}** (headline metric lower by more than {report['tolerance']}, or wall time over "
          f"{report['time_ratio']}x and {report['time_slack_s']} s longer, or a failed run).", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "Overrides per config:", ""]
    md += [f"- {c}: `{' '.join(o) or '(none)'}`" for c, o in report["overrides"].items()]
    md += ["", "Run directories and logs:", ""]
    for config, res in report["configs"].items():
        for side in ("ref", "branch"):
            md.append(f"- {config} {side}: `{res[side]['run_dir']}` (log `{res[side]['log']}`, nemo_rlhf from "
                      f"`{report['packages'][side]}`)")
    if curves is not None:
        md += ["", f"![curves]({curves.name})"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return f"{table}\n\nverdict: {verdict}\nreport: {out / 'report.md'} (report.json, curves.png beside it)"


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/reference.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ref", default="main", help="the git ref to compare with (default: main)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated (default: {','.join(CONFIGS)})")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/reference/<time>)")
    p.add_argument("--set", action="append", default=[], metavar="[CONFIG:]KEY=VALUE",
                   help="a Hydra override for every config (or only CONFIG), in both trees; repeatable")
    p.add_argument("--quick", action="store_true", help="shorten the default configs to seconds of training")
    p.add_argument("--tolerance", type=float, default=0.05, help="headline metric drop that is worse (default 0.05)")
    p.add_argument("--time-ratio", type=float, default=1.5, help="wall time ratio that is worse (default 1.5)")
    p.add_argument("--time-slack", type=float, default=2.0, help="seconds a slower run must also lose (default 2)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run (default 3600)")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout to compare (default: this script's)")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when the branch is worse")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return reference(args)
    except UsageError as e:
        print(f"reference.py: {e}", file=sys.stderr)
        return 2


def reference(args: argparse.Namespace) -> int:
    repo = args.repo.resolve()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs:
        raise UsageError("--configs is empty")
    commit = resolve_ref(repo, args.ref)
    out = (args.out or Path("runs/reference") / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    if out.exists() and any((out / side).exists() for side in ("ref", "branch")):
        raise UsageError(f"--out {out} already holds runs (they would be resumed, not rerun): give a new directory")
    overrides = overrides_per_config(configs, args.set, args.quick)
    labels = {"ref": commit[:7] if commit.startswith(args.ref) else f"{args.ref}@{commit[:7]}",
              "branch": describe_checkout(repo)}
    with tempfile.TemporaryDirectory(prefix="nemo_rlhf_reference_") as tmp:
        trees = {"ref": export_tree(repo, commit, Path(tmp) / "ref"), "branch": repo}
        check_configs(configs, trees, args.ref)
        packages = {side: imported_package(tree) for side, tree in trees.items()}
        out.mkdir(parents=True, exist_ok=True)
        print(f"reference: {labels['branch']} ({repo}) vs {labels['ref']} -> {out}", flush=True)
        for side in ("ref", "branch"):
            print(f"  {side}: nemo_rlhf from {packages[side]}", flush=True)
        results: Dict[str, dict] = {}
        for config in configs:
            runs = {}
            for side in ("ref", "branch"):
                runs[side] = run_config(trees[side], config, overrides[config], out / side / config, args.timeout)
                got = runs[side].get("final", {})
                head = headline_of(got)
                print(f"  {config} [{side}] exit {runs[side]['returncode']} in {runs[side]['process_s']:.0f}s"
                      + (f": {head} {got[head]:.3f}" if head else f" (log: {runs[side]['log']})"), flush=True)
            verdict = compare(runs["ref"], runs["branch"], args.tolerance, args.time_ratio, args.time_slack)
            results[config] = {**runs, "headline": headline_of(runs["ref"].get("final", {})), **verdict}
    curves = None
    try:
        curves = plot_curves(results, labels, out)
    except Exception as e:   # the table and the JSON are the report; a plotting problem is only noted
        print(f"reference.py: no curves.png ({type(e).__name__}: {e})", file=sys.stderr)
    failed = [c for c, r in results.items() if r["verdict"] != "ok"]
    report = {"ref": args.ref, "ref_commit": commit, "branch": labels["branch"], "repo": str(repo), "labels": labels,
              "packages": packages, "tolerance": args.tolerance, "time_ratio": args.time_ratio,
              "time_slack_s": args.time_slack, "overrides": overrides, "configs": results,
              "worse": [c for c, r in results.items() if r["verdict"] == "worse"],
              "failed": [c for c in failed if results[c]["verdict"] == "ref failed"]}
    print(write_report(out, report, labels, curves), flush=True)
    return 0 if args.no_fail or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
