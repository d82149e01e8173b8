"""ILQL as a LightningModule: offline (sample, reward) data, a megatron GPT with Q/target-Q/V heads,
the loss from :mod:`nemo_rlhf.algorithms.ilql`, target-Q Polyak sync, sampling evaluation."""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Dict

import torch

from nemo_rlhf.algorithms.ilql import ilql_logits, ilql_loss, polyak_update
from nemo_rlhf.config.schema import RunConfig

from nemo_rlhf.data.ilql import ILQLDataset
from nemo_rlhf.logging import get_logger
from nemo_rlhf.models.gpt import unwrap
from nemo_rlhf.models.heads import DecoderStates, attach_ilql_heads, has_head, ilql_heads_output
from nemo_rlhf.modules.engine import MegatronEngine, lm_forward_with_states
from nemo_rlhf.modules.loop import dp_loader, end_of_step, record_eval, save_engine, TrainingSystem
from nemo_rlhf.modules.run_dir import RunDirectory

log = get_logger(__name__)


def ilql_forward(batch: Dict[str, torch.Tensor], model, cfg):
    nll, states = lm_forward_with_states(model, batch["tokens"], batch["labels"], batch["loss_mask"])
    if not has_head(unwrap(model), "ilql_heads"):   # a stage before the last: its hidden states go on
        return nll, None
    heads = ilql_heads_output(unwrap(model), states)
    return nll, partial(ilql_loss_func, batch, cfg, heads)


def ilql_loss_func(batch, cfg, heads, nll):
    qs, target_qs, v = heads
    mask = batch["loss_mask"]
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1)
    loss, stats = ilql_loss(
        qs[0], qs[1] if len(qs) > 1 else None, target_qs[0], target_qs[1] if len(target_qs) > 1 else None,
        v, v_next, nll.float(), batch["labels"], batch["rewards"], mask, batch["next_nonterminal"],
        gamma=cfg.gamma, tau=cfg.tau, alpha=cfg.alpha, cql_scale=cfg.cql_scale, awac_scale=cfg.awac_scale,
        awac_beta=cfg.awac_beta)
    n = mask.sum()
    report = {"loss": torch.stack([loss.detach() * n, n]).double()}
    report.update({k: torch.stack([v_.detach() * n, n]).double() for k, v_ in stats.items()})
    return loss * n, n.to(torch.int), report


def ilql_logits_processor(model, beta: float):
    """For generate(): shift the last position's logits by beta * (min target Q - V), with the heads
    on the hidden states [S, B, H] of the forward that gave ``logits`` [B, V] (its last position)."""
    def process(logits, hidden):
        qs, target_qs, v = ilql_heads_output(model, DecoderStates(hidden))
        q1 = target_qs[0][:, -1]
        q2 = target_qs[1][:, -1] if len(target_qs) > 1 else None
        return ilql_logits(logits, q1, q2, v[:, -1], beta)
    return process


class ILQLModule(TrainingSystem):
    def __init__(self, cfg: RunConfig, dataset: ILQLDataset, vocab_size: int, run_dir: RunDirectory,
                 evaluate_fn, dp_rank: int, dp_size: int, config_yaml: str = ""):
        super().__init__()
        self.cfg, self.ilql, self.dataset, self.run_dir = cfg, cfg.ilql, dataset, run_dir
        self.evaluate_fn, self.dp_rank, self.dp_size, self.config_yaml = evaluate_fn, dp_rank, dp_size, config_yaml
        self.engine = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, vocab_size, cfg.trainer.max_steps,
                                     setup=lambda gpt: attach_ilql_heads(gpt, two_qs=cfg.ilql.two_qs,
                                                                       seed=cfg.trainer.seed))
        self.chunks = torch.nn.ModuleList(self.engine.chunks)

    def train_dataloader(self):
        return dp_loader(self.dataset, self)

    def training_step(self, batch, batch_idx):
        stats = self.engine.train_step(batch, self.cfg.trainer.micro_batch_size, partial(ilql_forward, cfg=self.ilql))
        self.step += 1
        if self.step % self.ilql.steps_for_target_q_sync == 0:
            for chunk in self.engine.chunks:   # the heads live on the last pipeline stage's last chunk
                heads = getattr(unwrap(chunk), "ilql_heads", None)
                for target, q in zip(heads.target_q_heads, heads.q_heads) if heads is not None else ():
                    polyak_update(target, q, self.ilql.target_sync_rate)
        end_of_step(self, stats)

    def evaluate(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        return record_eval(self, self.evaluate_fn(self.engine, self.step), t0)

    def save(self):
        save_engine(self, self.engine)
