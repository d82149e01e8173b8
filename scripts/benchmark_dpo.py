"""DPO training throughput: nemo_rlhf (megatron-core) vs. Hugging Face TRL's ``DPOTrainer``.

    pip install -e '.[bench]'          # trl + transformers, only for this script
    python scripts/benchmark_dpo.py                                   # defaults below, CPU
    python scripts/benchmark_dpo.py --layers 4 --hidden 256 --batch 32 --steps 12
    python scripts/benchmark_dpo.py --no-packed          # skip the packed run of ours

One process, the same threads, the same model and batches for both:
  * a megatron-core GPT with GPT-2's layout (learned positions, LayerNorm, tanh-GELU MLP, tied
    embeddings) is built once; its weights are exported with ``nemo_rlhf.interop.export_hf`` and
    loaded by ``transformers.AutoModelForCausalLM`` for TRL, so both start from identical weights;
  * the batches are the randomwalks preference pairs (chosen = the more optimal walk), in the same
    order (TRL with ``train_sampling_strategy="sequential"``), one optimizer step per batch of
    ``--batch`` pairs, sigmoid DPO loss, beta 0.1, Adam (beta2 0.999), lr constant, grad clip 1.0,
    reference = a frozen copy of the initial policy in memory (forwarded every step) for both;
  * throughput = real (non-pad) tokens of chosen + rejected sequences per second of training
    step, median over the steps after ``--warmup`` (both run each batch at the width of its
    longest sequence: TRL pads to it, our engine cuts the model.seq_length padding after it);
  * ours runs twice from the same initial weights: as above, and with data.packing's layout (each
    micro-batch's chosen and rejected sequences packed into fewer rows for the policy and the
    reference forwards, nemo_rlhf/modules/packing.py). TRL's own ``padding_free`` needs flash
    attention, which the CPU does not have, so TRL runs padded.

Also prints both loss sequences: step 1 is ln 2 for both (policy == reference), and the
sequences should stay close (same math; the Adam implementations differ in rounding).
"""
from __future__ import annotations

import argparse
import json
import math
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
    p.add_argument("--batch", type=int, default=32, help="preference pairs per optimizer step")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-packed", action="store_true", help="skip the run of ours with packed micro-batches")
    p.add_argument("--full-width", action="store_true",
                   help="ours without dynamic padding (every batch at model.seq_length), for the before/after figure")
    return p.parse_args()


def setup(args):
    from nemo_rlhf.config.schema import ModelConfig, OptimConfig, ParallelConfig
    from nemo_rlhf.recipes.dpo import DPOConfig
    from nemo_rlhf.data.preference import PreferenceDataset, randomwalk_pairs
    from nemo_rlhf.data.tokenizers import CharTokenizer
    from nemo_rlhf.parallel import init_distributed, initialize_model_parallel
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    init_distributed()
    initialize_model_parallel(ParallelConfig(), seed=args.seed)
    torch.manual_seed(args.seed)
    task = RandomWalks(21, 0.1, 10, 5000, 1000)
    tok = CharTokenizer(task.vocab)
    pairs = randomwalk_pairs(task, tok, args.batch * args.steps, seed=args.seed)
    model = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                        ffn_hidden_size=4 * args.hidden, seq_length=16, activation="gelu_tanh",
                        transformer_impl="local",
                        # no vocabulary padding: megatron's softmax also covers padded rows, which
                        # the exported HF model drops; unpadded, both compute the same log-probs
                        make_vocab_size_divisible_by=1)
    optim = OptimConfig(lr=args.lr, min_lr=args.lr, adam_beta2=0.999, adam_eps=1e-8, clip_grad=1.0,
                        weight_decay=0.0, scheduler="constant")
    dataset = PreferenceDataset.build(pairs, model.seq_length, tok.pad_id, tok.eos_id)
    return task, tok, pairs, dataset, model, optim, DPOConfig(beta=args.beta, reference="model"), ParallelConfig()


def run_ours(args, tok, dataset, model_cfg, optim, dpo_cfg, parallel, hf_dir, pack=False):
    """Build the engine, export its initial weights for TRL, then time ``args.steps`` DPO steps
    (``pack``: with packed micro-batches; the engine starts from the same seed, so the same weights)."""
    from nemo_rlhf.interop import export_hf
    from nemo_rlhf.modules.dpo import dpo_forward
    from nemo_rlhf.modules.engine import MegatronEngine

    torch.manual_seed(args.seed)
    engine = MegatronEngine(model_cfg, parallel, optim, tok.vocab_size, args.steps)
    engine.trim_padding = not args.full_width
    if hf_dir is not None:
        export_hf(hf_dir, engine.chunks, model_cfg, tok.vocab_size, tokenizer=tok)
    reference = MegatronEngine(model_cfg, parallel, optim, tok.vocab_size, args.steps).module.eval()
    reference.load_state_dict(engine.module.state_dict())
    for p in reference.parameters():
        p.requires_grad_(False)
    step_fn = partial(dpo_forward, cfg=dpo_cfg, reference=reference, pack=pack)
    times, losses, first = [], [], None
    for k in range(args.steps):
        sl = slice(k * args.batch, (k + 1) * args.batch)
        batch = {"tokens": dataset.tokens[sl], "labels": dataset.labels[sl], "loss_mask": dataset.loss_mask[sl],
                 "ref_logps": dataset.ref_logps[sl]}
        t0 = time.perf_counter()
        stats = engine.train_step(batch, args.batch, step_fn)
        times.append(time.perf_counter() - t0)
        losses.append(stats["loss"])
        first = first or {"logps/chosen": stats["logps/chosen"], "logps/rejected": stats["logps/rejected"],
                          "grad_norm": stats["grad_norm"]}
    return times, losses, first


def run_trl(args, tok, pairs, hf_dir, out_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rows = [{"prompt": tok.decode(p), "chosen": tok.decode(c), "rejected": tok.decode(r)} for p, c, r in pairs]
    train = datasets.Dataset.from_list(rows)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.first, self._t0 = [], [], None, None

        def on_step_begin(self, a, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self._t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.first = self.first or {k: float(logs[k]) for k in ("logps/chosen", "logps/rejected", "grad_norm")}

    clock = Clock()
    config = TRLDPOConfig(
        output_dir=out_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        gradient_checkpointing=False, beta=args.beta, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=args.seed,
        disable_tqdm=True, dataset_num_proc=None)
    trainer = DPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         callbacks=[clock])
    trainer.train()
    return clock.times, clock.losses, clock.first


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    task, tok, pairs, dataset, model_cfg, optim, dpo_cfg, parallel = setup(args)
    real_tokens = [int(dataset.loss_mask[k * args.batch:(k + 1) * args.batch].sum().item())
                   + sum(len(p) * 2 for p, _, _ in pairs[k * args.batch:(k + 1) * args.batch])
                   for k in range(args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = f"{tmp}/hf"
        ours_t, ours_l, ours_first = run_ours(args, tok, dataset, model_cfg, optim, dpo_cfg, parallel, hf_dir)
        packed_t, packed_l = None, None
        if not args.no_packed:
            packed_t, packed_l, _ = run_ours(args, tok, dataset, model_cfg, optim, dpo_cfg, parallel, None, pack=True)
        try:
            trl_t, trl_l, trl_first = run_trl(args, tok, pairs, hf_dir, f"{tmp}/trl")
        except ImportError as e:
            raise SystemExit(f"TRL is not installed ({e}); pip install -e '.[bench]'") from None

    def rate(times):
        tokens = statistics.median(real_tokens[args.warmup:])
        return tokens / statistics.median(times[args.warmup:])

    ours, trl = rate(ours_t), rate(trl_t)
    print(f"DPO, {args.layers} layers x {args.hidden} ({args.heads} heads), {args.batch} pairs/step, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.threads} threads, "
          f"{statistics.mean(real_tokens):.0f} real tokens/step (policy + reference forwards on each)")
    print(f"  {'':28s}{'tokens/s':>10s}{'step (ms)':>11s}{'ratio':>8s}")
    print(f"  {'nemo_rlhf (megatron-core)':28s}{ours:10.0f}{1e3 * statistics.median(ours_t[args.warmup:]):11.1f}{1.0:8.2f}")
    if packed_t is not None:
        packed = rate(packed_t)
        print(f"  {'nemo_rlhf, packed':28s}{packed:10.0f}{1e3 * statistics.median(packed_t[args.warmup:]):11.1f}"
              f"{packed / ours:8.2f}")
    print(f"  {'TRL DPOTrainer':28s}{trl:10.0f}{1e3 * statistics.median(trl_t[args.warmup:]):11.1f}{trl / ours:8.2f}")
    n = min(len(ours_l), len(trl_l))
    diffs = [abs(a - b) for a, b in zip(ours_l[:n], trl_l[:n])]
    print(f"  loss step 1: ours {ours_l[0]:.6f}  TRL {trl_l[0]:.6f}  (ln 2 = {math.log(2):.6f}); "
          f"max |diff| over {n} steps {max(diffs):.2e}")
    print("  step 1 (same weights, same batch): " + ", ".join(
        f"{k} ours {ours_first[k]:.4f} TRL {trl_first[k]:.4f}" for k in ours_first))
    if packed_l is not None:
        print(f"  packed vs unpacked loss: max |diff| over {len(packed_l)} steps "
              f"{max(abs(a - b) for a, b in zip(packed_l, ours_l)):.2e}")
    print(json.dumps({"ours_tokens_per_s": ours, "trl_tokens_per_s": trl, "trl_over_ours": trl / ours,
                      "ours_packed_tokens_per_s": None if packed_t is None else rate(packed_t),
                      "ours_loss": ours_l, "trl_loss": trl_l, "ours_packed_loss": packed_l}))


if __name__ == "__main__":
    main()
