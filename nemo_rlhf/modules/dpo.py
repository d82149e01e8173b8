"""DPO (and its variants) and KTO as a LightningModule: examples as [N, 2, S] token tensors
(DPO: chosen / rejected; KTO: the completion / a mismatched completion for the KL reference
point), a megatron policy engine, a reference (precomputed log-probs or a frozen model), the
losses from :mod:`nemo_rlhf.algorithms.dpo`."""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Dict

import torch

from nemo_rlhf.algorithms.dpo import dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, simpo_loss
from nemo_rlhf.config.schema import DPOConfig, KTOConfig, RunConfig
from nemo_rlhf.data.preference import PreferenceDataset
from nemo_rlhf.logging import get_logger
from nemo_rlhf.modules.engine import MegatronEngine, build_chunks, lm_forward
from nemo_rlhf.modules.loop import dp_loader, end_of_step, record_eval, save_engine, TrainingSystem
from nemo_rlhf.modules.run_dir import RunDirectory

log = get_logger(__name__)

REFERENCE_FREE = ("simpo", "orpo")


def needs_reference(cfg) -> bool:
    """KTO and the DPO variants compare with a reference policy; SimPO and ORPO do not."""
    return getattr(cfg, "loss_type", "kto") not in REFERENCE_FREE


def sequence_logps(model, tokens, labels, loss_mask, length_normalize: bool = False) -> torch.Tensor:
    """[b, 2, S] pairs -> summed (or mean) completion log-probs [b, 2] (vocab-parallel safe: the
    model's own cross-entropy gives -log p of each label)."""
    b, two, s = tokens.shape
    flat = tokens.reshape(b * two, s)
    mask = loss_mask.reshape(b * two, s)
    nll = lm_forward(model, flat, labels.reshape(b * two, s), mask)
    logps = -(nll.float() * mask).sum(-1)
    if length_normalize:
        logps = logps / mask.sum(-1).clamp(min=1)
    return logps.view(b, two)


def dpo_forward(batch: Dict[str, torch.Tensor], model, cfg: DPOConfig, reference=None):
    b, two, s = batch["tokens"].shape
    flat = batch["tokens"].reshape(b * two, s)
    nll = lm_forward(model, flat, batch["labels"].reshape(b * two, s), batch["loss_mask"].reshape(b * two, s))
    ref = batch["ref_logps"]
    if reference is not None and needs_reference(cfg):
        with torch.no_grad():
            ref = sequence_logps(reference, batch["tokens"], batch["labels"], batch["loss_mask"],
                                 getattr(cfg, "length_normalize", False))
    loss_func = kto_loss_func if isinstance(cfg, KTOConfig) else dpo_loss_func
    return nll, partial(loss_func, batch, cfg, ref)


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


def kto_loss_func(batch, cfg: KTOConfig, ref_logps, nll):
    """KTO on a micro-batch: index 0 of each example is its completion, index 1 a mismatched
    completion whose policy/reference log-ratio estimates KL(policy || reference) (z0)."""
    b, two, s = batch["tokens"].shape
    mask = batch["loss_mask"].reshape(b * two, s)
    logps = (-(nll.float() * mask).sum(-1)).view(b, two)
    kl = kto_kl_estimate(logps[:, 1], ref_logps[:, 1])
    desirable = batch["desirable"].bool()
    losses = kto_loss(logps[:, 0], ref_logps[:, 0], desirable, kl, cfg.beta, cfg.desirable_weight,
                      cfg.undesirable_weight)
    rewards = cfg.beta * (logps[:, 0] - ref_logps[:, 0]).detach()
    d = desirable.to(rewards.dtype)
    n = torch.tensor(float(b), device=losses.device)
    both = lambda total, count: torch.stack([total.detach().double(), count.double()])
    report = {"loss": both(losses.sum(), n), "kl": both(kl * b, n),
              "rewards/chosen": both((rewards * d).sum(), d.sum()),
              "rewards/rejected": both((rewards * (1 - d)).sum(), (1 - d).sum()),
              "logps/chosen": both((logps[:, 0] * d).sum(), d.sum()),
              "logps/rejected": both((logps[:, 0] * (1 - d)).sum(), (1 - d).sum())}
    return losses.sum(), n.to(torch.int), report


class DPOModule(TrainingSystem):
    """DPO and its variants (algorithm.name=dpo) or KTO (algorithm.name=kto)."""

    def __init__(self, cfg: RunConfig, dataset: PreferenceDataset, vocab_size: int, run_dir: RunDirectory,
                 evaluate_fn, dp_rank: int, dp_size: int, config_yaml: str = ""):
        super().__init__()
        self.cfg, self.dataset, self.run_dir = cfg, dataset, run_dir
        self.dpo = cfg.kto if cfg.algorithm.name == "kto" else cfg.dpo
        self.evaluate_fn, self.dp_rank, self.dp_size, self.config_yaml = evaluate_fn, dp_rank, dp_size, config_yaml
        self.engine = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, vocab_size, cfg.trainer.max_steps)
        self.chunks = torch.nn.ModuleList(self.engine.chunks)
        self.reference = None
        if self.dpo.reference == "model" and needs_reference(self.dpo):
            self.reference = build_chunks(cfg.model, cfg.parallel, vocab_size)[0].eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)

    def init_from(self, path) -> None:
        from nemo_rlhf.weights import load_weights

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
                                              getattr(self.dpo, "length_normalize", False))
        model.train()
        path = self.run_dir.path / "reference_logps.pt"
        if self.dp_rank == 0:
            torch.save(ds.ref_logps.clone(), path)

    def train_dataloader(self):
        return dp_loader(self.dataset, self)

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
