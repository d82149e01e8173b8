"""Peak memory and speed of a training step with the logits computed a chunk of tokens at a time
(model.logits_chunk_tokens) against megatron's output layer + cross-entropy on all tokens at once.

    python scripts/benchmark_logits_memory.py                      # defaults below, CPU
    python scripts/benchmark_logits_memory.py --seq 4096 --vocab 32000 --chunk 1024

Each variant runs in its own process (peak resident memory is per process): the same GPT, weights
and long sequences, ``--steps`` SFT steps (forward, backward, Adam) through MegatronEngine. Prints
peak RSS, the median step time and the largest loss difference between the two, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=512, help="model.logits_chunk_tokens of the chunked run")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)   # one variant: its chunk (0 = off)
    return p.parse_args(argv)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from nemo_rlhf.config.schema import ModelConfig, OptimConfig, ParallelConfig
    from nemo_rlhf.modules.engine import MegatronEngine, lm_forward_step
    from nemo_rlhf.modules.sft import sft_loss_func
    from nemo_rlhf.parallel import init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel(ParallelConfig(), seed=0)
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      seq_length=args.seq, transformer_impl="local", logits_chunk_tokens=args.child or None)
    engine = MegatronEngine(cfg, ParallelConfig(), OptimConfig(lr=1e-4), args.vocab, args.steps)
    g = torch.Generator().manual_seed(1)
    times, losses = [], []
    for _ in range(args.steps):
        seq = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        batch = {"tokens": seq[:, :-1], "labels": seq[:, 1:], "loss_mask": torch.ones(args.batch, args.seq)}
        t0 = time.perf_counter()
        stats = engine.train_step(batch, args.batch, partial(lm_forward_step, loss_fn=sft_loss_func))
        times.append(time.perf_counter() - t0)
        losses.append(stats["loss"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024          # Linux: KiB
    print(json.dumps({"peak_rss_bytes": peak, "step_s": statistics.median(times[1:] or times), "losses": losses}))


def main():
    args = parse_args()
    if args.child is not None:
        return child(args)
    runs = {}
    for name, chunk in (("all tokens at once", 0), (f"chunks of {args.chunk} tokens", args.chunk)):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", str(chunk)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    whole, chunked = runs.values()
    logits_gib = args.batch * args.seq * args.vocab * 4 / 2 ** 30
    print(f"SFT step, {args.layers} layers x {args.hidden}, vocab {args.vocab}, batch {args.batch} x seq {args.seq} "
          f"(fp32 logits: {logits_gib:.2f} GiB), {args.threads} threads, median of steps 2-{args.steps}")
    print(f"  {'logits':28s}{'peak RSS GiB':>14s}{'step s':>9s}")
    for name, r in runs.items():
        print(f"  {name:28s}{r['peak_rss_bytes'] / 2 ** 30:14.2f}{r['step_s']:9.2f}")
    loss_diff = max(abs(a - b) for a, b in zip(whole["losses"], chunked["losses"]))
    print(f"  largest loss difference over the {args.steps} steps: {loss_diff:.1e}")
    print(json.dumps({"whole_peak_rss_bytes": whole["peak_rss_bytes"], "chunked_peak_rss_bytes": chunked["peak_rss_bytes"],
                      "whole_step_s": whole["step_s"], "chunked_step_s": chunked["step_s"],
                      "memory_saved_bytes": whole["peak_rss_bytes"] - chunked["peak_rss_bytes"],
                      "chunked_over_whole_speed": whole["step_s"] / chunked["step_s"], "loss_max_abs_diff": loss_diff}))


if __name__ == "__main__":
    main()
