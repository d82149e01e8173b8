"""SFT training throughput: nemo_rlhf's engine vs. a plain PyTorch loop on the same Hugging Face
model, and both as a fraction of this machine's measured matmul FLOP/s (the ceiling).

    python scripts/benchmark_sft.py                         # defaults below, CPU
    python scripts/benchmark_sft.py --layers 4 --hidden 256 --batch 32 --seq 64 --steps 12

One process, the same threads, weights and batches: a megatron-core GPT with GPT-2's layout is
built once and exported (nemo_rlhf.interop) to a transformers GPT-2 for the baseline; each step is
forward + backward + Adam on ``--batch`` full-length sequences (loss on every position). Reports
tokens/s (median over the steps after ``--warmup``), model FLOP/s (forward + backward, the count of
nemo_rlhf/modules/throughput.py) and that over the best fp32 matmul FLOP/s measured in the same
run (square matmuls of ``--matmul-size``); prints one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--matmul-size", type=int, default=1024)
    return p.parse_args()


def matmul_flops(n: int, seconds: float = 2.0) -> float:
    """Best fp32 FLOP/s of n x n matmuls over about ``seconds``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from nemo_rlhf.config.schema import ModelConfig, OptimConfig, ParallelConfig
    from nemo_rlhf.interop import export_hf
    from nemo_rlhf.modules.engine import MegatronEngine, lm_forward_step
    from nemo_rlhf.modules.sft import sft_loss_func
    from nemo_rlhf.modules.throughput import flops_per_token
    from nemo_rlhf.parallel import init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel(ParallelConfig(), seed=0)
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      ffn_hidden_size=4 * args.hidden, seq_length=args.seq, make_vocab_size_divisible_by=128,
                      transformer_impl="local")
    optim = OptimConfig(lr=1e-4, clip_grad=1.0)
    engine = MegatronEngine(cfg, ParallelConfig(), optim, args.vocab, args.steps)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g) for _ in range(args.steps)]
    step_fn = partial(lm_forward_step, loss_fn=sft_loss_func)

    with tempfile.TemporaryDirectory() as d:
        export_hf(d, engine.chunks, cfg, args.vocab)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(d).train()
    hf_opt = torch.optim.Adam(hf.parameters(), lr=1e-4)

    ours, theirs = [], []
    for seq in batches:
        batch = {"tokens": seq[:, :-1], "labels": seq[:, 1:], "loss_mask": torch.ones(args.batch, args.seq)}
        t0 = time.perf_counter()
        engine.train_step(batch, args.batch, step_fn)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loss = hf(input_ids=seq[:, :-1], labels=seq[:, :-1]).loss   # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        theirs.append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    ours_rate = tokens / statistics.median(ours[args.warmup:])
    hf_rate = tokens / statistics.median(theirs[args.warmup:])
    per_token = flops_per_token(cfg, args.vocab, args.seq)
    ceiling = matmul_flops(args.matmul_size)
    print(f"SFT, {args.layers} layers x {args.hidden}, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
          f"median of steps {args.warmup + 1}-{args.steps}; fp32 matmul ceiling {ceiling / 1e9:.1f} GFLOP/s")
    print(f"  {'':30s}{'tokens/s':>10s}{'GFLOP/s':>10s}{'of ceiling':>12s}{'ratio':>8s}")
    for name, rate in (("nemo_rlhf (megatron-core)", ours_rate), ("transformers + torch Adam", hf_rate)):
        print(f"  {name:30s}{rate:10.0f}{rate * per_token / 1e9:10.1f}{rate * per_token / ceiling:12.2f}"
              f"{rate / ours_rate:8.2f}")
    print(json.dumps({"ours_tokens_per_s": ours_rate, "hf_tokens_per_s": hf_rate, "ours_over_hf": ours_rate / hf_rate,
                      "flops_per_token": per_token, "matmul_flops": ceiling,
                      "ours_fraction_of_matmul": ours_rate * per_token / ceiling,
                      "hf_fraction_of_matmul": hf_rate * per_token / ceiling}))


if __name__ == "__main__":
    main()
