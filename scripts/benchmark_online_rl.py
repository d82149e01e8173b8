"""Online RL on randomwalks, algorithm against algorithm: PPO (ppo_tiny), GRPO (grpo_tiny), RLOO
(rloo_tiny) and rejection fine-tuning (rft_tiny), each for the same number of iterations from one
SFT checkpoint, in turn on this machine.

    python scripts/benchmark_online_rl.py                         # 20 iterations each
    python scripts/benchmark_online_rl.py --iterations 40 --json runs/online_rl.json

Prints, per algorithm: eval optimality before / after (sampled and greedy), the RL wall time
(summary.json's wall_time_s, evaluations included), the positions the models computed (the sum of
model_tokens over the train records: the work done), and both as a ratio to PPO's. Each run is a
separate ``python -m nemo_rlhf.train`` process, so the timings include the same start-up costs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = ("ppo_tiny", "grpo_tiny", "rloo_tiny", "rft_tiny")


def train(config: str, run_dir: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "nemo_rlhf.train", "--config-name", config, f"hydra.run.dir={run_dir}",
           "trainer.progress_bar=false", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def work(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(v for r in rows if r["kind"] == "train" for k, v in r.items() if k.endswith("model_tokens"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train("sft_tiny", tmp / "sft", "trainer.eval_every_n_steps=0")
        sft = tmp / "sft" / "checkpoints" / "step_0001000"
        rows = {}
        for config in CONFIGS:
            run = tmp / config
            s = train(config, run, f"model.path={sft}", f"trainer.max_steps={args.iterations}",
                      "trainer.eval_every_n_steps=0", "trainer.checkpoint_every_n_steps=0")
            rows[config] = {"optimality_before": s["initial"]["optimality"], "optimality": s["final"]["optimality"],
                            "optimality_greedy": s["final"]["optimality_greedy"], "wall_time_s": s["wall_time_s"],
                            "model_tokens": work(run)}
    ppo = rows["ppo_tiny"]
    print(f"\n{args.iterations} iterations from one SFT checkpoint (optimality before: {ppo['optimality_before']:.3f})")
    print(f"{'config':<11}{'optimality':>11}{'greedy':>8}{'wall s':>8}{'x PPO':>7}{'model tokens':>14}{'x PPO':>7}")
    for config, r in rows.items():
        r["wall_vs_ppo"] = r["wall_time_s"] / ppo["wall_time_s"]
        r["work_vs_ppo"] = r["model_tokens"] / ppo["model_tokens"]
        print(f"{config:<11}{r['optimality']:>11.3f}{r['optimality_greedy']:>8.3f}{r['wall_time_s']:>8.1f}"
              f"{r['wall_vs_ppo']:>7.2f}{r['model_tokens']:>14.0f}{r['work_vs_ppo']:>7.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"iterations": args.iterations, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
