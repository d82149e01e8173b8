"""Supervised fine-tuning as a LightningModule (a system: data, megatron engine, loss, logging)."""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch

from nemo_rlhf.algorithms.sft import sft_loss
from nemo_rlhf.checkpoint import save_checkpoint
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.data.sampler import GlobalBatchSampler
from nemo_rlhf.data.sft import SFTDataset
from nemo_rlhf.logging import get_logger
from nemo_rlhf.modules.engine import MegatronEngine, lm_forward_step
from nemo_rlhf.modules.run_dir import RunDirectory

log = get_logger(__name__)


def sft_loss_func(batch: Dict[str, torch.Tensor], output_tensor: torch.Tensor):
    """Megatron loss closure: (masked NLL sum, token count, stats as [sum, count] pairs)."""
    loss_sum, num_tokens = sft_loss(output_tensor, batch["loss_mask"])
    count = num_tokens.to(torch.float64)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach().double(), count])}


class SFTModule(pl.LightningModule):
    """Token-level NLL on completion tokens; periodic sampling evaluation and checkpoints."""

    def __init__(self, cfg: RunConfig, dataset: SFTDataset, vocab_size: int, run_dir: RunDirectory,
                 evaluate_fn, dp_rank: int, dp_size: int, config_yaml: str = ""):
        super().__init__()
        self.cfg, self.dataset, self.run_dir = cfg, dataset, run_dir
        self.evaluate_fn, self.dp_rank, self.dp_size = evaluate_fn, dp_rank, dp_size
        self.config_yaml = config_yaml
        self.automatic_optimization = False
        self.engine = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, vocab_size, cfg.trainer.max_steps)
        self.chunks = torch.nn.ModuleList(self.engine.chunks)
        self.step = 0  # completed optimizer steps
        self.initial_eval: Optional[Dict[str, Any]] = None
        self.last_eval: Optional[Dict[str, Any]] = None
        self._last_ckpt_step = -1
        self._t_last = None

    # -- data -------------------------------------------------------------------------------
    def train_dataloader(self):
        t = self.cfg.trainer
        sampler = GlobalBatchSampler(len(self.dataset), t.global_batch_size, self.dp_rank, self.dp_size,
                                     seed=t.seed, start_step=self.step, end_step=t.max_steps)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=0)

    def configure_optimizers(self):
        return None  # the megatron optimizer lives in self.engine (stepped in training_step)

    # -- loop -------------------------------------------------------------------------------
    def on_train_start(self):
        if self.initial_eval is None:
            self.initial_eval = self.evaluate()
        self._t_last = time.perf_counter()

    def training_step(self, batch, batch_idx):
        t = self.cfg.trainer
        stats = self.engine.train_step(batch, t.micro_batch_size,
                                       partial(lm_forward_step, loss_fn=sft_loss_func))
        self.step += 1
        self.log("loss", stats["loss"], prog_bar=True, logger=False, batch_size=1)
        if self.step % t.log_every_n_steps == 0 or self.step == t.max_steps:
            now = time.perf_counter()
            steps = t.log_every_n_steps if self.step % t.log_every_n_steps == 0 else self.step % t.log_every_n_steps
            stats["step_time_s"] = (now - self._t_last) / max(1, steps)
            self._t_last = now
            self.run_dir.log(self.step, stats, kind="train")
        if t.eval_every_n_steps and self.step % t.eval_every_n_steps == 0 and self.step != t.max_steps:
            self.evaluate()
        if t.checkpoint_every_n_steps and self.step % t.checkpoint_every_n_steps == 0:
            self.save()

    # -- evaluation & checkpoints ---------------------------------------------------------------
    def evaluate(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        metrics = self.evaluate_fn(self.engine, self.step)
        metrics["eval_time_s"] = time.perf_counter() - t0
        self.run_dir.log(self.step, metrics, kind="eval")
        self.last_eval = dict(metrics, step=self.step)
        log.info("step %d eval: %s", self.step,
                 " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        return self.last_eval

    def save(self):
        if self._last_ckpt_step == self.step:
            return
        save_checkpoint(self.run_dir.checkpoint_dir, self.step, self.engine.chunks, self.engine.optimizer,
                        self.engine.scheduler, loop_state={"initial_eval": self.initial_eval},
                        config_yaml=self.config_yaml, keep_last=self.cfg.trainer.keep_last_n_checkpoints)
        self._last_ckpt_step = self.step
