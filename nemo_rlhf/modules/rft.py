"""Rejection fine-tuning as a LightningModule. One ``training_step`` is one RFT iteration:

    sample num_generations completions per prompt -> score -> keep each prompt's samples that reach
    its threshold (nemo_rlhf.algorithms.rft: a percentile rising over the iterations, floored by
    min_reward) -> epochs of SFT updates on the kept samples (global batches of
    trainer.global_batch_size over all data-parallel ranks)

``rft`` arguments are the recipe's config block (nemo_rlhf.recipes.rft.RFTConfig).
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Any, Callable, Dict, List, Tuple

import torch

from nemo_rlhf.algorithms.rft import accepted, rejection_thresholds, rising_percentile
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.data.sft import SFTDataset
from nemo_rlhf.modules.engine import MegatronEngine, lm_forward_step
from nemo_rlhf.modules.loop import dp_loader, end_of_step, record_eval, save_engine, TrainingSystem
from nemo_rlhf.modules.rollouts import PromptDataset, sample_rollouts, score_rollouts, trim_left_padding
from nemo_rlhf.modules.run_dir import RunDirectory
from nemo_rlhf.modules.sft import sft_loss_func
from nemo_rlhf.parallel.reductions import all_gather_lists, all_reduce_sum, data_parallel_group


class RFTModule(TrainingSystem):
    """Policy (megatron engine), reward function, prompts (token-id lists of any lengths)."""

    def __init__(self, cfg: RunConfig, prompts, tokenizer, reward_fn: Callable, run_dir: RunDirectory,
                 evaluate_fn, dp_rank: int, dp_size: int, config_yaml: str = ""):
        super().__init__()
        self.cfg, self.rft = cfg, cfg.rft
        self.prompts = PromptDataset(prompts, tokenizer.pad_id)
        self.tokenizer, self.reward_fn = tokenizer, reward_fn
        self.run_dir, self.evaluate_fn = run_dir, evaluate_fn
        self.dp_rank, self.dp_size, self.config_yaml = dp_rank, dp_size, config_yaml
        if self.rft.prompts_per_iteration % dp_size:
            raise ValueError(f"rft.prompts_per_iteration={self.rft.prompts_per_iteration} is not divisible by the "
                             f"data-parallel size {dp_size} (a prompt's samples stay on one rank)")
        self.engine = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, tokenizer.vocab_size, cfg.trainer.max_steps)
        self.chunks = torch.nn.ModuleList(self.engine.chunks)

    def train_dataloader(self):
        return dp_loader(self.prompts, self, global_batch_size=self.rft.prompts_per_iteration)

    def training_step(self, batch, batch_idx: int):
        rft, t = self.rft, self.cfg.trainer
        t0 = time.perf_counter()
        prompts, pad = trim_left_padding(*batch)
        g = rft.num_generations
        groups = torch.arange(prompts.shape[0], device=prompts.device).repeat_interleave(g)
        prompts, pad = prompts.repeat_interleave(g, 0), pad.repeat_interleave(g)
        tokens, mask = sample_rollouts(self.engine.stages, prompts, pad, self.cfg, self.tokenizer,
                                       seed=t.seed * 1_000_003 + self.step * 1009 + self.dp_rank)
        scores = score_rollouts(self.reward_fn, self.tokenizer, tokens, prompts.shape[1], pad)
        percentile = rising_percentile(self.step, rft.start_percentile, rft.end_percentile, rft.improve_steps)
        thresholds = rejection_thresholds(scores, groups, percentile, rft.min_reward)
        keep = accepted(scores, thresholds)
        t1 = time.perf_counter()
        kept = all_gather_lists(self._pairs(tokens, mask, pad, keep), self._dp_group())
        stats = self._fine_tune(kept, tokens.device)
        self.step += 1
        sums = all_reduce_sum(torch.tensor([float(scores.sum()), float(keep.sum()), float(thresholds.sum()),
                                            float(scores.numel())]), self._dp_group()).tolist()
        stats.update(reward_mean=sums[0] / sums[3], accepted=sums[1] / sums[3], threshold_mean=sums[2] / sums[3],
                     percentile=percentile, kept_samples=float(len(kept)),
                     **{"time/generation_s": t1 - t0, "time/training_s": time.perf_counter() - t1})
        end_of_step(self, stats, prog_bar=("reward_mean", "accepted"))

    def _pairs(self, tokens: torch.Tensor, mask: torch.Tensor, pad: torch.Tensor,
               keep: torch.Tensor) -> List[Tuple[List[int], List[int]]]:
        """(prompt ids without padding, completion ids through EOS) of the kept rows."""
        p = tokens.shape[1] - mask.shape[1]
        return [(tokens[i, int(pad[i]):p].tolist(), tokens[i, p:][mask[i].bool()].tolist())
                for i in torch.nonzero(keep).flatten().tolist()]

    def _fine_tune(self, kept: List[Tuple[List[int], List[int]]], device) -> Dict[str, float]:
        """rft.epochs passes of SFT over ``kept`` (the same list on every rank), in global batches of
        trainer.global_batch_size (the last one filled up from the start of the shuffled order),
        each rank training on its slice. Means of the steps' stats, and the number of updates."""
        if not kept:
            return {"updates": 0.0}
        t, tok = self.cfg.trainer, self.tokenizer
        # data.packing: the kept samples packed into rows as SFT packs (global batches then count rows)
        build = SFTDataset.packed if self.cfg.data.packing else SFTDataset.from_pairs
        data = build(kept, self.cfg.model.seq_length, tok.pad_id, tok.eos_id, add_eos=False)
        keys = ("tokens", "labels", "loss_mask") + (("segment_ids",) if data.segment_ids is not None else ())
        n, gbs = len(data), t.global_batch_size
        per_rank = gbs // self.dp_size
        sums: Dict[str, float] = {}
        updates = 0
        for epoch in range(self.rft.epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed + 7919 * self.step + epoch))
            for i in range(math.ceil(n / gbs)):
                idx = order[torch.arange(i * gbs, (i + 1) * gbs) % n][self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
                batch = {k: getattr(data, k)[idx].to(device) for k in keys}
                step_stats = self.engine.train_step(batch, t.micro_batch_size, partial(lm_forward_step, loss_fn=sft_loss_func))
                for k, v in step_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                updates += 1
        out = {k: v if k.endswith("model_tokens") else v / updates for k, v in sums.items()}
        out["updates"] = float(updates)
        return out

    def _dp_group(self):
        return data_parallel_group() if self.dp_size > 1 else None

    def evaluate(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        return record_eval(self, self.evaluate_fn(self.engine, self.step), t0)

    def save(self):
        save_engine(self, self.engine)
