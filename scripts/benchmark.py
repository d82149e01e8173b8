"""The benchmark suite: one table of nemo_rlhf against the simple tools on the same work, and JSON.

    pip install -e '.[bench]'                     # transformers + TRL, only for the baselines
    python scripts/benchmark.py                   # all rows, a few minutes on 2 CPU cores
    python scripts/benchmark.py --json runs/benchmark.json --rows generation sft

Every row is one of the scripts beside this one, run in its own process, which times ours and the
baseline in that same process on the same weights and batches (so each ratio is measured under the
same conditions; absolute figures move with the machine's load):

    generation_b16 / generation_b64   scripts/benchmark_generation.py: greedy KV-cached sampling vs
                                      transformers ``generate`` (target: ours >= 1.5x)
    sft                               scripts/benchmark_sft.py: training tokens/s vs a plain
                                      transformers + torch.optim.Adam loop, and the share of the
                                      measured fp32 matmul FLOP/s (target: >= 70%)
    dpo / dpo_packed                  scripts/benchmark_dpo.py: DPO tokens/s vs TRL ``DPOTrainer``
                                      (target: ours >= 1.5x), ours as is and with data.packing's
                                      packed micro-batches (one process, both rows)

    grpo                              scripts/benchmark_grpo.py: one GRPO iteration (generation, reward,
                                      log-probs, update) vs TRL ``GRPOTrainer`` on the same HF model

scripts/benchmark_online_rl.py compares our own algorithms (PPO, GRPO, RLOO, RFT) with each other.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def _run(args, json_file=None) -> dict:
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]}
    if json_file is not None:
        return json.loads(Path(json_file).read_text())
    return _last_json(proc.stdout)


def generation(batch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = _run([HERE / "benchmark_generation.py", "--batch", batch, "--json", f"{d}/g.json"], f"{d}/g.json")
    if "error" in out:
        return out
    fig = out["figures"]
    ours = fig["nemo_rlhf KV cache"]["tokens_per_s"]
    hf = fig.get("transformers generate", {}).get("tokens_per_s")
    return {"metric": "tokens/s", "ours": ours, "baseline": hf, "baseline_name": "transformers generate",
            "ratio": ours / hf if hf else None, "target": 1.5, "same_tokens": out["same_tokens"]}


def sft() -> dict:
    out = _run([HERE / "benchmark_sft.py"])
    if "error" in out:
        return out
    return {"metric": "tokens/s", "ours": out["ours_tokens_per_s"], "baseline": out["hf_tokens_per_s"],
            "baseline_name": "transformers + torch Adam", "ratio": out["ours_over_hf"],
            "fraction_of_matmul": out["ours_fraction_of_matmul"], "target_fraction_of_matmul": 0.7}


def dpo() -> dict:
    out = _run([HERE / "benchmark_dpo.py"])
    if "error" in out:
        return out
    trl = out["trl_tokens_per_s"]
    row = lambda ours, name: {"metric": "tokens/s", "ours": ours, "baseline": trl, "ratio": ours / trl, "target": 1.5,
                              "baseline_name": name}
    return {"rows": {"dpo": row(out["ours_tokens_per_s"], "TRL DPOTrainer"),
                     "dpo_packed": row(out["ours_packed_tokens_per_s"], "TRL DPOTrainer (padded; ours data.packing=true)")}}


def grpo() -> dict:
    out = _run([HERE / "benchmark_grpo.py"])
    if "error" in out:
        return out
    return {"metric": "samples/s", "ours": 64 / out["ours_iteration_s"], "baseline": 64 / out["trl_iteration_s"],
            "baseline_name": "TRL GRPOTrainer (one iteration: 8 prompts x 8 samples)",
            "ratio": out["ours_over_trl_speed"]}


ROWS = {"generation_b16": lambda: generation(16), "generation_b64": lambda: generation(64), "sft": sft, "dpo": dpo,
        "grpo": grpo}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    p.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    table = {}
    for name in args.rows:
        print(f"running {name} ...", flush=True)
        result = ROWS[name]()
        table.update(result["rows"] if "rows" in result else {name: result})
    print(f"\n{'row':<16}{'ours':>10}{'baseline':>10}{'ours/base':>11}{'target':>8}  baseline / note")
    for name, r in table.items():
        if "error" in r:
            print(f"{name:<16}{'':>39}  failed: {r['error']}")
            continue
        target = r.get("target")
        note = r["baseline_name"]
        if "fraction_of_matmul" in r:
            note += f"; {r['fraction_of_matmul']:.0%} of measured matmul FLOP/s (target {r['target_fraction_of_matmul']:.0%})"
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
        base = f"{r['baseline']:.0f}" if r.get("baseline") else "-"
        print(f"{name:<16}{r['ours']:>10.0f}{base:>10}{ratio:>11}{(f'{target}x' if target else ''):>8}  {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
