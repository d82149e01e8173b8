"""Supervised fine-tuning as a LightningModule (a system: data, megatron engine, loss, logging)."""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Dict

import torch

from nemo_rlhf.algorithms.sft import sft_loss
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.data.sft import SFTDataset
from nemo_rlhf.logging import get_logger
from nemo_rlhf.modules.engine import MegatronEngine, lm_forward_step
from nemo_rlhf.modules.loop import dp_loader, end_of_step, record_eval, save_engine, TrainingSystem
from nemo_rlhf.modules.run_dir import RunDirectory

log = get_logger(__name__)


def sft_loss_func(batch: Dict[str, torch.Tensor], output_tensor: torch.Tensor):
    """Megatron loss closure: (masked NLL sum, token count, stats as [sum, count] pairs)."""
    loss_sum, num_tokens = sft_loss(output_tensor, batch["loss_mask"])
    count = num_tokens.to(torch.float64)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach().double(), count])}


class SFTModule(TrainingSystem):
    """Token-level NLL on completion tokens; periodic sampling evaluation and checkpoints."""

    def __init__(self, cfg: RunConfig, dataset: SFTDataset, vocab_size: int, run_dir: RunDirectory,
                 evaluate_fn, dp_rank: int, dp_size: int, config_yaml: str = ""):
        super().__init__()
        self.cfg, self.dataset, self.run_dir = cfg, dataset, run_dir
        self.evaluate_fn, self.dp_rank, self.dp_size = evaluate_fn, dp_rank, dp_size
        self.config_yaml = config_yaml
        self.engine = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, vocab_size, cfg.trainer.max_steps)
        self.chunks = torch.nn.ModuleList(self.engine.chunks)

    # -- data -------------------------------------------------------------------------------
    def train_dataloader(self):
        return dp_loader(self.dataset, self)

    def training_step(self, batch, batch_idx):
        stats = self.engine.train_step(batch, self.cfg.trainer.micro_batch_size,
                                       partial(lm_forward_step, loss_fn=sft_loss_func))
        self.step += 1
        end_of_step(self, stats)

    # -- evaluation & checkpoints ---------------------------------------------------------------
    def evaluate(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        return record_eval(self, self.evaluate_fn(self.engine, self.step), t0)

    def save(self):
        save_engine(self, self.engine)
