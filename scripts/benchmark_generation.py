"""Generation throughput: our KV-cached sampler vs. no-cache vs. Hugging Face ``generate``.

    python scripts/benchmark_generation.py                      # defaults below, CPU
    python scripts/benchmark_generation.py --layers 4 --hidden 256 --batch 32 --new-tokens 64

Builds one megatron-core GPT (learned positions, LayerNorm, GELU MLP, tied embeddings: GPT-2's
architecture), exports the same weights as a Hugging Face GPT-2 directory (nemo_rlhf.interop) and
loads it with ``transformers.AutoModelForCausalLM`` when transformers is installed, and times greedy
generation of ``--new-tokens`` tokens for ``--batch`` prompts with each, in one run, taking turns
(best of ``--repeats`` rounds each). Prints tokens/s and ratios against our KV-cached generation, and checks that
all three produce the same tokens.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def build(args):
    from nemo_rlhf.config.schema import ModelConfig, ParallelConfig
    from nemo_rlhf.models.gpt import build_gpt_chunks
    from nemo_rlhf.parallel import init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel(ParallelConfig(), seed=0)
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      ffn_hidden_size=4 * args.hidden, seq_length=args.prompt_len + args.new_tokens,
                      make_vocab_size_divisible_by=128, transformer_impl="local")
    model = build_gpt_chunks(cfg, ParallelConfig(), args.vocab)[0].eval()
    return model, cfg


def to_hf(model, cfg, vocab):
    """The same weights as a transformers model: exported with nemo_rlhf.interop (GPT-2 format for
    this architecture) and loaded back with AutoModelForCausalLM, as a user would."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from nemo_rlhf.interop import export_hf

    with tempfile.TemporaryDirectory() as d:
        export_hf(d, [model], cfg, vocab, extra_config={"bos_token_id": 0, "eos_token_id": None,
                                                      "pad_token_id": 0})
        return AutoModelForCausalLM.from_pretrained(d).eval()


def timed_together(fns, repeats):
    """Best time of each of ``fns`` (name -> callable) over ``repeats`` rounds, the implementations
    taking turns within each round (after one warm-up call each), so that a slow spell of a shared
    machine falls on all of them rather than on whichever ran then; and each one's last output."""
    outs = {name: fn() for name, fn in fns.items()}     # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each implementation's best is reported")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from nemo_rlhf.generation.sampling import SamplingParams, generate

    model, cfg = build(args)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    n_tokens = args.batch * args.new_tokens
    fns = {"nemo_rlhf KV cache": lambda: generate(model, prompts, SamplingParams(args.new_tokens, greedy=True),
                                                  vocab_size=args.vocab)}
    no_cache = {"nemo_rlhf no cache": lambda: generate(model, prompts, SamplingParams(args.new_tokens, greedy=True,
                                                                                     use_kv_cache=False),
                                                       vocab_size=args.vocab)}
    try:
        hf = to_hf(model, cfg, args.vocab)
    except ImportError:
        hf = None
        print("transformers is not installed: skipping the Hugging Face comparison (pip install transformers)")
    if hf is not None:
        # the export cuts megatron's padded vocabulary tail: HF sees exactly args.vocab tokens
        fns["transformers generate"] = lambda: hf.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, pad_token_id=0)
    with torch.no_grad():
        rows, outs = timed_together(fns, args.repeats)
        more, outs_nc = timed_together(no_cache, 1)     # the slow reference row: one timed call
    rows.update(more)
    outs.update(outs_nc)
    t_kv, out_kv = rows["nemo_rlhf KV cache"], outs["nemo_rlhf KV cache"]
    same = {"no cache": torch.equal(out_kv.tokens, outs["nemo_rlhf no cache"].tokens)}
    if hf is not None:
        same["transformers"] = torch.equal(outs["transformers generate"], out_kv.tokens)
    print(f"\ngreedy generation, {args.layers} layers x {args.hidden} hidden, batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats} rounds taking turns (no cache: one call)")
    print(f"  {'implementation':<24}{'seconds':>10}{'tokens/s':>12}{'speed vs ours (KV)':>20}")
    figures = {}
    for name, t in rows.items():
        figures[name] = {"seconds": t, "tokens_per_s": n_tokens / t, "ratio_vs_kv": t_kv / t}
        print(f"  {name:<24}{t:>10.3f}{n_tokens / t:>12.1f}{t_kv / t:>19.2f}x")
    print("  same tokens as KV cache: " + ", ".join(f"{k}={v}" for k, v in same.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "figures": figures, "same_tokens": same}, f, indent=2)


if __name__ == "__main__":
    main()
