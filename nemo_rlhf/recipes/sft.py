"""SFT recipe: supervised fine-tuning on the task's examples (randomwalks: its walks), on ``data.train_file``
(prompt/completion) or on samples given from Python; the loss covers completion tokens only.
Also the warm-up stage the RL / preference recipes run first (``<block>.sft_warmup``)."""
from __future__ import annotations

import dataclasses
from functools import partial

from nemo_rlhf.config.schema import RunConfig, SFTWarmupConfig
from nemo_rlhf.data.sft import SFTDataset
from nemo_rlhf.errors import ConfigError
from nemo_rlhf.modules.sft import SFTModule
from nemo_rlhf.recipes.common import Job, RunContext, file_examples, load_initial_weights, replace_algorithm

Config = None
"""SFT has no block of its own: trainer.* and optim.* are its settings."""


def prepare(ctx: RunContext, rcfg: RunConfig, block, samples=None):
    """Token-id (prompt, completion + EOS) pairs; ``samples`` are strings (the first token is the
    prompt) or [prompt, completion] pairs, trlX's convention."""
    tok = ctx.tokenizer
    pairs, extra = (None, {}) if samples is not None else file_examples(ctx, rcfg, "sft")
    if pairs is None:
        if samples is None:
            samples = ctx.task.sft_samples()
        pairs = []
        for i, sample in enumerate(samples):
            prompt, completion = (sample[:1], sample[1:]) if isinstance(sample, str) else sample
            try:
                pairs.append((tok.encode(prompt), tok.encode(completion) + [tok.eos_id]))
            except ValueError as e:
                raise ConfigError(f"SFT sample {i}: {e}") from None
    return pairs, extra


def build(ctx: RunContext, rcfg: RunConfig, block, data, rd, config_yaml: str) -> Job:
    pairs, extra = data
    tok = ctx.tokenizer
    dataset = (SFTDataset.packed if rcfg.data.packing else SFTDataset.from_pairs)(
        pairs, rcfg.model.seq_length, tok.pad_id, tok.eos_id, add_eos=False)
    module = SFTModule(rcfg, dataset, tok.vocab_size, rd, ctx.evaluate_fn, dp_rank=ctx.dp_rank,
                       dp_size=ctx.dp_size, config_yaml=config_yaml)
    return Job(module, load_initial=partial(load_initial_weights, module.engine), summary=extra)


def warmup_config(rcfg: RunConfig, warmup: SFTWarmupConfig) -> RunConfig:
    """The SFT run that precedes a recipe whose block has ``sft_warmup`` when model.path is null."""
    rcfg = replace_algorithm(rcfg, "sft")
    return dataclasses.replace(
        rcfg, resume="auto", data=dataclasses.replace(rcfg.data, train_file=None),
        trainer=dataclasses.replace(rcfg.trainer, max_steps=warmup.steps, global_batch_size=warmup.global_batch_size,
                                    micro_batch_size=warmup.micro_batch_size, eval_every_n_steps=0,
                                    checkpoint_every_n_steps=0, keep_last_n_checkpoints=1),
        optim=dataclasses.replace(rcfg.optim, lr=warmup.lr, min_lr=warmup.lr / 30, scheduler="cosine",
                                  warmup_steps=0))
