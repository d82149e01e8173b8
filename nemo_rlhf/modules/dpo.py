"""DPO (and its variants) and KTO as a LightningModule: examples as [N, 2, S] token tensors
(DPO: chosen / rejected; KTO: the completion / a mismatched completion for the KL reference
point), a megatron policy engine, a reference (precomputed log-probs or a frozen model), the
losses from :mod:`nemo_rlhf.algorithms.dpo`. One step's forward-backward is chosen by the
algorithm's name (:data:`FORWARD_BACKWARD`), the variant by dpo.loss_type / kto.loss_type (one row
of :data:`~nemo_rlhf.algorithms.dpo.DPO_LOSSES` / :data:`~nemo_rlhf.algorithms.dpo.KTO_LOSSES`).
``cfg`` / ``algo_cfg`` arguments are the recipe's config block (``nemo_rlhf.recipes.dpo.DPOConfig``
/ ``recipes.kto.KTOConfig``; modules sit below recipes and do not import them)."""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from nemo_rlhf.algorithms.dpo import (PREFERENCE_LOSSES, KTOLogps, PreferenceLogps, kto_kl_sums, kto_reference_point,
                                      kto_variant_loss, preference_loss)
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.data.preference import PreferenceDataset
from nemo_rlhf.logging import get_logger
from nemo_rlhf.generation.pipeline import pipeline_size
from nemo_rlhf.modules.engine import MegatronEngine, build_chunks, lm_forward
from nemo_rlhf.modules.forward_only import lm_across_stages
from nemo_rlhf.modules.loop import dp_loader, end_of_step, record_eval, save_engine, TrainingSystem
from nemo_rlhf.modules.run_dir import RunDirectory


log = get_logger(__name__)

Batch = Dict[str, torch.Tensor]


def needs_reference(cfg) -> bool:
    """Whether the algorithm block ``cfg`` compares with a reference policy, as the row of its
    loss_type says (a row of DPO_LOSSES or KTO_LOSSES; SimPO and ORPO do not, KTO does)."""
    return PREFERENCE_LOSSES[cfg.loss_type].needs_reference


def length_normalized(cfg) -> bool:
    """Whether the variant of ``cfg`` reads mean (not summed) token log-probs: its row says so
    (SimPO, ORPO), or dpo.length_normalize (the KTO block has none: KTO sums)."""
    return PREFERENCE_LOSSES[cfg.loss_type].length_normalized or getattr(cfg, "length_normalize", False)


def sequence_logps(model, tokens, labels, loss_mask, length_normalize: bool = False, pack: bool = False
                   ) -> torch.Tensor:
    """[b, k, S] sequences -> summed (or mean) completion log-probs [b, k] (vocab-parallel safe:
    the model's own cross-entropy gives -log p of each label). ``pack``: the b * k sequences are
    packed into fewer rows for the forward (data.packing; modules/packing.py). ``model``: a model,
    or this rank's pipeline chunks (``MegatronEngine.stages``; at PP > 1 the rows go through
    megatron's forward-only schedule and every rank gets the log-probs)."""
    b, k, s = tokens.shape
    flat = tokens.reshape(b * k, s)
    mask = loss_mask.reshape(b * k, s)
    if isinstance(model, (list, tuple)) and pipeline_size() > 1:
        nll = lm_across_stages(model, flat, labels.reshape(b * k, s))[0]
    else:
        model = model[0] if isinstance(model, (list, tuple)) else model
        nll = lm_forward(model, flat, labels.reshape(b * k, s), mask, pack=pack)
    logps = -(nll.float() * mask).sum(-1)
    if length_normalize:
        logps = logps / mask.sum(-1).clamp(min=1)
    return logps.view(b, k)


# -- DPO and its variants ----------------------------------------------------------------------------
def dpo_forward(batch: Batch, model, cfg, reference=None, pack: bool = False):
    """Megatron forward step on [b, 2, S] pairs (chosen, rejected): both in one forward (packed
    into fewer rows with ``pack``)."""
    b, two, s = batch["tokens"].shape
    flat = batch["tokens"].reshape(b * two, s)
    nll = lm_forward(model, flat, batch["labels"].reshape(b * two, s), batch["loss_mask"].reshape(b * two, s),
                     pack=pack)
    ref = None
    if needs_reference(cfg):
        ref = batch["ref_logps"]
        if reference is not None:
            with torch.no_grad():
                ref = sequence_logps(reference, batch["tokens"], batch["labels"], batch["loss_mask"],
                                     length_normalized(cfg), pack=pack)
    return nll, partial(dpo_loss_func, batch, cfg, ref)


def dpo_loss_func(batch: Batch, cfg, ref_logps: Optional[torch.Tensor], nll):
    b, two, s = batch["tokens"].shape
    mask = batch["loss_mask"].reshape(b * two, s)
    sums = -(nll.float() * mask).sum(-1)
    counts = mask.sum(-1).clamp(min=1)
    avg = (sums / counts).view(b, two)
    logps = avg if length_normalized(cfg) else sums.view(b, two)
    ref = (None, None) if ref_logps is None else (ref_logps[:, 0], ref_logps[:, 1])
    x = PreferenceLogps(logps[:, 0], logps[:, 1], *ref, chosen_nll=-avg[:, 0])
    losses, rc, rr = preference_loss(cfg.loss_type, x, cfg)
    n = torch.tensor(float(b), device=losses.device)
    pair = lambda x: torch.stack([x.detach().sum().double(), n.double()])
    report = {"loss": pair(losses), "rewards/chosen": pair(rc), "rewards/rejected": pair(rr),
              "rewards/margin": pair(rc - rr), "rewards/accuracy": pair((rc > rr).float()),
              "logps/chosen": pair(logps[:, 0]), "logps/rejected": pair(logps[:, 1])}
    # loss = sum over pairs; megatron divides the grads by the pairs of the whole global batch
    return losses.sum(), n.to(torch.int), report


def dpo_forward_backward(engine: MegatronEngine, batch: Batch, micro_batch_size: int, cfg,
                         reference=None, pack: bool = False) -> Dict[str, float]:
    """One DPO step's forward-backward over the DP-local part of the global batch."""
    return engine.forward_backward(batch, micro_batch_size,
                                   partial(dpo_forward, cfg=cfg, reference=reference, pack=pack))


# -- KTO -----------------------------------------------------------------------------------------
def kto_split(batch: Batch) -> Tuple[Batch, Batch]:
    """[N, 2, S] KTO examples -> (the completions, the mismatched completions), each [N, S] with
    their [N] reference log-probs (``desirable`` goes with the completions)."""
    halves = []
    for i in (0, 1):
        half = {k: batch[k][:, i] for k in ("tokens", "labels", "loss_mask", "ref_logps")}
        halves.append(half)
    halves[0]["desirable"] = batch["desirable"]
    return halves[0], halves[1]


def _logps_and_reference(batch: Batch, model, reference, pack: bool = False):
    """Policy NLL [b, S] of ``batch``'s [b, S] sequences and their reference log-probs [b]."""
    nll = lm_forward(model, batch["tokens"], batch["labels"], batch["loss_mask"], pack=pack)
    ref = batch["ref_logps"]
    if reference is not None:
        with torch.no_grad():
            ref = sequence_logps(reference, batch["tokens"][:, None], batch["labels"][:, None],
                                 batch["loss_mask"][:, None], pack=pack)[:, 0]
    return nll, ref


def kto_kl_forward(batch: Batch, model, reference=None, pack: bool = False):
    """Forward step of the no-grad pass over the mismatched completions [b, S]: reports the sum and
    count of their log pi - log pi_ref (the engine adds them over micro-batches and DP ranks)."""
    nll, ref = _logps_and_reference(batch, model, reference, pack)

    def report(nll):
        logps = -(nll.float() * batch["loss_mask"]).sum(-1)
        total, count = kto_kl_sums(logps, ref)
        return total, count.to(torch.int), {"kl": torch.stack([total, count]).double()}

    return nll, report


def kto_forward(batch: Batch, model, cfg, z0: torch.Tensor, reference=None, pack: bool = False):
    """Megatron forward step on the completions [b, S], with the global batch's reference point z0."""
    nll, ref = _logps_and_reference(batch, model, reference, pack)
    return nll, partial(kto_loss_func, batch, cfg, ref, z0)


def kto_loss_func(batch: Batch, cfg, ref_logps: torch.Tensor, z0: torch.Tensor, nll):
    b = batch["tokens"].shape[0]
    logps = -(nll.float() * batch["loss_mask"]).sum(-1)
    desirable = batch["desirable"].bool()
    z0 = z0.to(logps.device)
    losses = kto_variant_loss(cfg.loss_type, KTOLogps(logps, ref_logps, desirable, z0), cfg)
    rewards = cfg.beta * (logps - ref_logps).detach()
    d = desirable.to(rewards.dtype)
    n = torch.tensor(float(b), device=losses.device)
    both = lambda total, count: torch.stack([total.detach().double(), count.double()])
    report = {"loss": both(losses.sum(), n), "kl": both(z0 * b, n),
              "rewards/chosen": both((rewards * d).sum(), d.sum()),
              "rewards/rejected": both((rewards * (1 - d)).sum(), (1 - d).sum()),
              "logps/chosen": both((logps * d).sum(), d.sum()),
              "logps/rejected": both((logps * (1 - d)).sum(), (1 - d).sum())}
    return losses.sum(), n.to(torch.int), report


def kto_global_reference_point(engine: MegatronEngine, mismatched: Batch, micro_batch_size: int,
                               reference=None, pack: bool = False) -> torch.Tensor:
    """z0 of the whole global batch: one no-grad pass over all micro-batches of the mismatched
    completions; the engine's stat reduction adds their (sum, count) over micro-batches and DP
    ranks (and broadcasts it from the last pipeline stage), then z0 = max(0, sum / count)."""
    stats = engine.forward_backward(mismatched, micro_batch_size, partial(kto_kl_forward, reference=reference, pack=pack),
                                    forward_only=True)
    return kto_reference_point(torch.tensor(stats["kl"], dtype=torch.float32))


def kto_forward_backward(engine: MegatronEngine, batch: Batch, micro_batch_size: int, cfg,
                         reference=None, pack: bool = False) -> Dict[str, float]:
    """One KTO step's forward-backward over the DP-local part of the global batch: the reference
    point z0 from all its mismatched completions first (no grad), then the loss of the completions
    with that z0, so the loss and grads do not depend on the micro-batch or data-parallel split."""
    completions, mismatched = kto_split(batch)
    z0 = kto_global_reference_point(engine, mismatched, micro_batch_size, reference, pack)
    return engine.forward_backward(completions, micro_batch_size,
                                   partial(kto_forward, cfg=cfg, z0=z0, reference=reference, pack=pack))


ForwardBackward = Callable[..., Dict[str, float]]
FORWARD_BACKWARD: Dict[str, ForwardBackward] = {"dpo": dpo_forward_backward, "kto": kto_forward_backward}
"""One step's forward-backward by algorithm name: (engine, DP-local batch, micro-batch size,
algorithm config block, reference model or None, pack=False) -> the global batch's stats."""


class DPOModule(TrainingSystem):
    """DPO and its variants (algorithm.name=dpo) or KTO (algorithm.name=kto)."""

    def __init__(self, cfg: RunConfig, dataset: PreferenceDataset, vocab_size: int, run_dir: RunDirectory,
                 evaluate_fn, dp_rank: int, dp_size: int, config_yaml: str = "", *, algorithm: str,
                 algo_cfg):
        """``algorithm``: "dpo" | "kto" (a key of :data:`FORWARD_BACKWARD`); ``algo_cfg``: its
        config block (the DPOConfig or KTOConfig)."""
        super().__init__()
        if algorithm not in FORWARD_BACKWARD:
            raise ValueError(f"DPOModule runs {' | '.join(FORWARD_BACKWARD)}, not {algorithm!r}")
        self.cfg, self.dataset, self.run_dir = cfg, dataset, run_dir
        self.algorithm, self.algo_cfg = algorithm, algo_cfg
        self.evaluate_fn, self.dp_rank, self.dp_size, self.config_yaml = evaluate_fn, dp_rank, dp_size, config_yaml
        self.engine = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, vocab_size, cfg.trainer.max_steps)
        self.chunks = torch.nn.ModuleList(self.engine.chunks)
        self.pack = cfg.data.packing
        """Pack each micro-batch's sequences into fewer rows for the forwards (validated by the recipe)."""
        self.reference = None
        if algo_cfg.reference == "model" and needs_reference(algo_cfg):
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
        stages = self.engine.stages
        for chunk in stages:
            chunk.eval()
        ds = self.dataset
        for i in range(0, len(ds), batch_size):
            sl = slice(i, i + batch_size)
            ds.ref_logps[sl] = sequence_logps(stages, ds.tokens[sl], ds.labels[sl], ds.loss_mask[sl],
                                              length_normalized(self.algo_cfg), pack=self.pack)
        for chunk in stages:
            chunk.train()
        path = self.run_dir.path / "reference_logps.pt"
        if self.dp_rank == 0:
            torch.save(ds.ref_logps.clone(), path)

    def train_dataloader(self):
        return dp_loader(self.dataset, self)

    def training_step(self, batch, batch_idx):
        stats = FORWARD_BACKWARD[self.algorithm](self.engine, batch, self.cfg.trainer.micro_batch_size,
                                                 self.algo_cfg, self.reference, pack=self.pack)
        stats.update(self.engine.optimizer_step())
        self.step += 1
        end_of_step(self, stats)

    def evaluate(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        return record_eval(self, self.evaluate_fn(self.engine, self.step), t0)

    def save(self):
        extra = {"reference": ([self.reference], None, None)} if self.reference is not None else None
        save_engine(self, self.engine, extra=extra)
