"""DPO as a LightningModule: preference pairs, a megatron policy engine, a reference (precomputed
log-probs or a frozen model), the loss from :mod:`nemo_rlhf.algorithms.dpo`."""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch

from nemo_rlhf.algorithms.dpo import dpo_loss, orpo_loss, simpo_loss

REFERENCE_FREE = ("simpo", "orpo")
from nemo_rlhf.config.schema import DPOConfig, RunConfig
from nemo_rlhf.data.preference import PreferenceDataset
from nemo_rlhf.logging import get_logger
from nemo_rlhf.models.gpt import build_gpt_chunks
from nemo_rlhf.modules.engine import MegatronEngine
from nemo_rlhf.modules.loop import dp_loader, end_of_step, record_eval, save_engine, start_clock
from nemo_rlhf.modules.run_dir import RunDirectory

log = get_logger(__name__)


def sequence_logps(model, tokens, labels, loss_mask, length_normalize: bool = False) -> torch.Tensor:
    """[b, 2, S] pairs -> summed (or mean) completion log-probs [b, 2] (vocab-parallel safe: the
    model's own cross-entropy gives -log p of each label)."""
    b, two, s = tokens.shape
    flat = tokens.reshape(b * two, s)
    nll = model(flat, torch.arange(s, device=flat.device).expand_as(flat), None, labels=labels.reshape(b * two, s))
    mask = loss_mask.reshape(b * two, s)
    logps = -(nll.float() * mask).sum(-1)
    if length_normalize:
        logps = logps / mask.sum(-1).clamp(min=1)
    return logps.view(b, two)


def dpo_forward(batch: Dict[str, torch.Tensor], model, cfg: DPOConfig, reference=None):
    b, two, s = batch["tokens"].shape
    flat = batch["tokens"].reshape(b * two, s)
    nll = model(flat, torch.arange(s, device=flat.device).expand_as(flat), None,
                labels=batch["labels"].reshape(b * two, s))
    ref = batch["ref_logps"]
    if reference is not None and cfg.loss_type not in REFERENCE_FREE:
        with torch.no_grad():
            ref = sequence_logps(reference, batch["tokens"], batch["labels"], batch["loss_mask"], cfg.length_normalize)
    return nll, partial(dpo_loss_func, batch, cfg, ref)


def dpo_loss_func(batch, cfg: DPOConfig, ref_logps, nll):
    b, two, s = batch["tokens"].shape
    mask = batch["loss_mask"].reshape(b * two, s)
    sums = -(nll.float() * mask).sum(-1)
    counts = mask.sum(-1).clamp(min=1)
    if cfg.loss_type in REFERENCE_FREE:
        # SimPO / ORPO: length-normalised log-probs, no reference; "rewards" are beta * avg logp
        avg = (sums / counts).view(b, two)
        if cfg.loss_type == "simpo":
            losses = simpo_loss(avg[:, 0], avg[:, 1], cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
        else:
            chosen_nll = -avg[:, 0]
            losses, _ = orpo_loss(avg[:, 0], avg[:, 1], chosen_nll, cfg.orpo_lambda)
        logps, rc, rr = avg, cfg.beta * avg[:, 0].detach(), cfg.beta * avg[:, 1].detach()
    else:
        logps = (sums / counts if cfg.length_normalize else sums).view(b, two)
        losses, rc, rr = dpo_loss(logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], cfg.beta,
                                  cfg.loss_type, cfg.label_smoothing)
    n = torch.tensor(float(b), device=losses.device)
    pair = lambda x: torch.stack([x.detach().sum().double(), n.double()])
    report = {"loss": pair(losses), "rewards/chosen": pair(rc), "rewards/rejected": pair(rr),
              "rewards/margin": pair(rc - rr), "rewards/accuracy": pair((rc > rr).float()),
              "logps/chosen": pair(logps[:, 0]), "logps/rejected": pair(logps[:, 1])}
    # loss = sum over pairs; megatron divides the grads by the pairs of the whole global batch
    return losses.sum(), n.to(torch.int), report


class DPOModule(pl.LightningModule):
    def __init__(self, cfg: RunConfig, dataset: PreferenceDataset, vocab_size: int, run_dir: RunDirectory,
                 evaluate_fn, dp_rank: int, dp_size: int, config_yaml: str = ""):
        super().__init__()
        self.cfg, self.dpo, self.dataset, self.run_dir = cfg, cfg.dpo, dataset, run_dir
        self.evaluate_fn, self.dp_rank, self.dp_size, self.config_yaml = evaluate_fn, dp_rank, dp_size, config_yaml
        self.automatic_optimization = False
        self.engine = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, vocab_size, cfg.trainer.max_steps)
        self.chunks = torch.nn.ModuleList(self.engine.chunks)
        self.reference = None
        if self.dpo.reference == "model" and self.dpo.loss_type not in REFERENCE_FREE:
            self.reference = build_gpt_chunks(cfg.model, cfg.parallel, vocab_size)[0].eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.step = 0
        self.initial_eval: Optional[Dict[str, Any]] = None
        self.last_eval: Optional[Dict[str, Any]] = None
        self._last_ckpt_step = -1

    def init_from(self, path) -> None:
        from nemo_rlhf.checkpoint import load_weights

        load_weights(path, self.engine.chunks)
        self.engine.optimizer.reload_model_params()
        if self.reference is not None:
            load_weights(path, [self.reference])

    @torch.no_grad()
    def precompute_reference(self, batch_size: int = 256) -> None:
        """One pass of the initial policy over the pairs (run before training)."""
        model = self.engine.module
        model.eval()
        ds = self.dataset
        for i in range(0, len(ds), batch_size):
            sl = slice(i, i + batch_size)
            ds.ref_logps[sl] = sequence_logps(model, ds.tokens[sl], ds.labels[sl], ds.loss_mask[sl],
                                              self.dpo.length_normalize)
        model.train()
        path = self.run_dir.path / "reference_logps.pt"
        if self.dp_rank == 0:
            torch.save(ds.ref_logps.clone(), path)

    def train_dataloader(self):
        return dp_loader(self.dataset, self)

    def configure_optimizers(self):
        return None

    def on_train_start(self):
        if self.initial_eval is None:
            self.initial_eval = self.evaluate()
        start_clock(self)

    def training_step(self, batch, batch_idx):
        stats = self.engine.train_step(batch, self.cfg.trainer.micro_batch_size,
                                       partial(dpo_forward, cfg=self.dpo, reference=self.reference))
        self.step += 1
        end_of_step(self, stats)

    def evaluate(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        return record_eval(self, self.evaluate_fn(self.engine, self.step), t0)

    def save(self):
        extra = {"reference": ([self.reference], None, None)} if self.reference is not None else None
        save_engine(self, self.engine, extra=extra)
