"""Reward-model training as a LightningModule: Bradley-Terry loss on preference pairs with a
scalar head (``value_head``) on a megatron GPT, evaluated by held-out pairwise accuracy."""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch

from nemo_rlhf.algorithms.dpo import bradley_terry_loss
from nemo_rlhf.checkpoint import save_checkpoint
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.data.preference import PreferenceDataset
from nemo_rlhf.data.sampler import GlobalBatchSampler
from nemo_rlhf.logging import get_logger
from nemo_rlhf.models.gpt import unwrap
from nemo_rlhf.models.heads import attach_value_head, value_head_output
from nemo_rlhf.modules.engine import MegatronEngine
from nemo_rlhf.modules.run_dir import RunDirectory

log = get_logger(__name__)


def pair_rewards(model, tokens, loss_mask) -> torch.Tensor:
    """[b, 2, S] -> rewards [b, 2]: the head's output at the last completion token (where the
    input holds the whole prompt + completion, as RewardModelScorer reads samples)."""
    b, two, s = tokens.shape
    flat = tokens.reshape(b * two, s)
    model(flat, torch.arange(s, device=flat.device).expand_as(flat), None)
    values = value_head_output(unwrap(model))                                  # [2b, S]
    mask = loss_mask.reshape(b * two, s)
    last = (mask * torch.arange(s, device=mask.device)).argmax(-1)             # last completion label pos
    # label t is token t + 1: the last completion token sits at input position `last`
    return values.gather(1, last[:, None]).squeeze(1).view(b, two)


def rm_forward(batch, model, margin: float):
    rewards = pair_rewards(model, batch["tokens"], batch["loss_mask"])
    return rewards, partial(rm_loss_func, margin)


def rm_loss_func(margin: float, rewards):
    losses, correct = bradley_terry_loss(rewards[:, 0], rewards[:, 1], margin)
    n = torch.tensor(float(rewards.shape[0]))
    pair = lambda x: torch.stack([x.detach().sum().double(), n.double()])
    return losses.sum(), n.to(torch.int), {"loss": pair(losses), "accuracy": pair(correct),
                                           "reward_margin": pair(rewards[:, 0] - rewards[:, 1])}


class RewardModelModule(pl.LightningModule):
    def __init__(self, cfg: RunConfig, train_set: PreferenceDataset, heldout: PreferenceDataset, vocab_size: int,
                 run_dir: RunDirectory, dp_rank: int, dp_size: int, config_yaml: str = ""):
        super().__init__()
        self.cfg, self.train_set, self.heldout, self.run_dir = cfg, train_set, heldout, run_dir
        self.dp_rank, self.dp_size, self.config_yaml = dp_rank, dp_size, config_yaml
        self.automatic_optimization = False
        self.engine = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, vocab_size, cfg.trainer.max_steps,
                                     setup=lambda gpt: attach_value_head(gpt, cfg.model.hidden_size))
        self.chunks = torch.nn.ModuleList(self.engine.chunks)
        self.step = 0
        self.initial_eval: Optional[Dict[str, Any]] = None
        self.last_eval: Optional[Dict[str, Any]] = None
        self._last_ckpt_step = -1

    def train_dataloader(self):
        t = self.cfg.trainer
        sampler = GlobalBatchSampler(len(self.train_set), t.global_batch_size, self.dp_rank, self.dp_size,
                                     seed=t.seed, start_step=self.step, end_step=t.max_steps)
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler, num_workers=0)

    def configure_optimizers(self):
        return None

    def on_train_start(self):
        if self.initial_eval is None:
            self.initial_eval = self.evaluate()

    def training_step(self, batch, batch_idx):
        t = self.cfg.trainer
        stats = self.engine.train_step(batch, t.micro_batch_size, partial(rm_forward, margin=self.cfg.rm.margin))
        self.step += 1
        self.log("loss", stats["loss"], prog_bar=True, logger=False, batch_size=1)
        if self.step % t.log_every_n_steps == 0 or self.step == t.max_steps:
            self.run_dir.log(self.step, stats, kind="train")
        if t.eval_every_n_steps and self.step % t.eval_every_n_steps == 0 and self.step != t.max_steps:
            self.evaluate()
        if t.checkpoint_every_n_steps and self.step % t.checkpoint_every_n_steps == 0:
            self.save()

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        model = self.engine.module
        model.eval()
        correct, margins, n = 0.0, 0.0, 0
        for i in range(0, len(self.heldout), 256):
            r = pair_rewards(model, self.heldout.tokens[i:i + 256], self.heldout.loss_mask[i:i + 256])
            correct += float((r[:, 0] > r[:, 1]).sum())
            margins += float((r[:, 0] - r[:, 1]).sum())
            n += r.shape[0]
        model.train()
        metrics = {"accuracy": correct / n, "reward_margin": margins / n, "heldout_pairs": n,
                   "eval_time_s": time.perf_counter() - t0}
        self.run_dir.log(self.step, metrics, kind="eval")
        self.last_eval = dict(metrics, step=self.step)
        log.info("step %d eval: held-out pairwise accuracy %.3f (%d pairs)", self.step, metrics["accuracy"], n)
        return self.last_eval

    def save(self):
        if self._last_ckpt_step == self.step:
            return
        save_checkpoint(self.run_dir.checkpoint_dir, self.step, self.engine.chunks, self.engine.optimizer,
                        self.engine.scheduler, loop_state={"initial_eval": self.initial_eval},
                        config_yaml=self.config_yaml, keep_last=self.cfg.trainer.keep_last_n_checkpoints)
        self._last_ckpt_step = self.step
