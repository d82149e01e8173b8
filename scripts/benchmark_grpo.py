"""One GRPO iteration: nemo_rlhf vs. Hugging Face TRL's ``GRPOTrainer`` on the same work.

    pip install -e '.[bench]'          # trl + transformers, only for this script
    python scripts/benchmark_grpo.py                                  # defaults below, CPU
    python scripts/benchmark_grpo.py --layers 4 --hidden 256 --prompts 8 --generations 8 --new-tokens 24

One process, the same threads, the same model, prompts and reward for both:
  * a GPT-2 model (learned positions, LayerNorm, tied embeddings) with random weights is written
    once as a Hugging Face directory with the randomwalks character tokenizer; TRL loads it with
    ``AutoModelForCausalLM``, nemo_rlhf imports it (``nemo_rlhf.train(model_path=...)``), so both
    start from identical weights;
  * an iteration is the same work in both: ``--prompts`` randomwalks start nodes x
    ``--generations`` samples each, up to ``--new-tokens`` new tokens at temperature 1 (both stop a
    row at EOS), the randomwalks reward of each sample, group-normalised advantages, the
    clipped-ratio loss over all samples and one Adam step (lr constant, grad clip 1.0), no KL term
    (TRL's ``beta=0``; ours ``ppo.kl_loss_coef=0``, ``ppo.init_kl_coef=0``, which also skips the
    reference forward, as TRL does), micro-batches of ``--micro-batch`` samples;
  * time per iteration = generation + scoring + log-probs + update, median over the iterations after
    ``--warmup``: ours from the run's metrics (``step_time_s``), TRL's between its step callbacks.
    Both report the reward mean of every iteration (the same prompts; different samples, since the
    samplers differ).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    p.add_argument("--generations", type=int, default=8, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="iterations left out of the timing")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None, help="also write the figures here")
    return p.parse_args()


def write_model(args, directory: Path, tok) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=args.hidden, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id,
                        pad_token_id=tok.pad_id, tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tok.save_hf(directory)


def run_ours(args, hf_dir: Path, prompts, reward, run_dir: Path):
    import nemo_rlhf

    config = nemo_rlhf.default_grpo_config(
        f"trainer.max_steps={args.steps}", "trainer.eval_every_n_steps=0", "trainer.checkpoint_every_n_steps=0",
        "trainer.log_every_n_steps=1", "trainer.progress_bar=false", f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.seed={args.seed}", f"ppo.num_rollouts={args.prompts * args.generations}",
        f"ppo.num_generations={args.generations}", "ppo.ppo_epochs=1", "ppo.num_minibatches=1",
        "ppo.kl_loss_coef=0.0", "ppo.init_kl_coef=0.0", "ppo.cliprange=0.2", "ppo.loss_aggregation=token_mean",
        f"generation.max_new_tokens={args.new_tokens}", "generation.temperature=1.0", "generation.top_k=0",
        f"optim.lr={args.lr}", f"optim.min_lr={args.lr}", "optim.scheduler=constant", "optim.warmup_steps=0",
        "optim.weight_decay=0.0", "optim.clip_grad=1.0", "task.eval_samples_per_start=1", "logger.plot=false",
        f"model.seq_length={args.new_tokens + 8}")
    trainer = nemo_rlhf.train(str(hf_dir), reward_fn=reward, prompts=prompts, config=config, run_dir=str(run_dir))
    rows = [json.loads(line) for line in (Path(trainer.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train"]
    return [r["step_time_s"] for r in rows], [r["reward_mean"] for r in rows], \
        [r.get("time/generation_s") for r in rows]


def run_trl(args, hf_dir: Path, prompts, reward, out_dir: Path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    train = datasets.Dataset.from_list([{"prompt": p} for p in prompts])

    def trl_reward(prompts, completions, **_):
        return reward([p + c for p, c in zip(prompts, completions)], prompts=prompts, completions=completions)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.rewards, self._t0 = [], [], None

        def on_step_begin(self, a, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self._t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))

    clock = Clock()
    n = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=n // args.micro_batch, num_generations=args.generations,
        max_completion_length=args.new_tokens, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, num_iterations=1, temperature=1.0, top_k=0, top_p=1.0,
        loss_type="dapo", scale_rewards="group", logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, fp16=False, seed=args.seed, disable_tqdm=True, shuffle_dataset=False,
        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=config, train_dataset=train,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    return clock.times, clock.rewards


def main():
    args = parse_args()
    if (args.prompts * args.generations) % args.micro_batch:
        raise SystemExit("--prompts x --generations must be a multiple of --micro-batch")
    torch.set_num_threads(args.threads)
    from nemo_rlhf.data.tokenizers import CharTokenizer
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    task = RandomWalks(21, 0.1, 10, 5000, 1000)
    tok = CharTokenizer(task.vocab)
    # one iteration's prompts, repeated: both take them in order (TRL: shuffle_dataset=False)
    starts = task.prompts()
    prompts = [starts[i % len(starts)] for i in range(args.prompts * args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        write_model(args, hf_dir, tok)
        try:
            trl_t, trl_r = run_trl(args, hf_dir, prompts, task.reward_fn, Path(tmp) / "trl")
        except ImportError as e:
            raise SystemExit(f"TRL is not installed ({e}); pip install -e '.[bench]'") from None
        ours_t, ours_r, ours_gen = run_ours(args, hf_dir, prompts, task.reward_fn, Path(tmp) / "ours")

    ours, trl = statistics.median(ours_t[args.warmup:]), statistics.median(trl_t[args.warmup:])
    n = args.prompts * args.generations
    print(f"GRPO, {args.layers} layers x {args.hidden} ({args.heads} heads), {args.prompts} prompts x "
          f"{args.generations} samples of <= {args.new_tokens} tokens per iteration, {args.steps} iterations "
          f"({args.warmup} warm-up), {args.threads} threads")
    print(f"  {'':28s}{'iteration (s)':>14s}{'samples/s':>11s}{'ratio':>8s}")
    print(f"  {'nemo_rlhf (megatron-core)':28s}{ours:14.3f}{n / ours:11.1f}{1.0:8.2f}")
    print(f"  {'TRL GRPOTrainer':28s}{trl:14.3f}{n / trl:11.1f}{ours / trl:8.2f}")
    print(f"  reward mean per iteration: ours {[round(r, 3) for r in ours_r]}, TRL {[round(r, 3) for r in trl_r]}")
    result = {"ours_iteration_s": ours, "trl_iteration_s": trl, "ours_over_trl_speed": trl / ours,
              "ours_generation_s": ours_gen, "ours_reward": ours_r, "trl_reward": trl_r}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
