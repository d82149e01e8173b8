"""Bookkeeping every training system shares (functions, not a base class): the DP-aware
resumable dataloader, the end-of-step cadence (progress bar, metrics, evaluation, checkpoints,
stopping on SIGTERM/SIGUSR1), recording an evaluation, and saving an engine's checkpoint."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence

import pytorch_lightning as pl
import torch

from nemo_rlhf import fault
from nemo_rlhf.checkpoint import save_checkpoint
from nemo_rlhf.data.sampler import GlobalBatchSampler
from nemo_rlhf.logging import get_logger
from nemo_rlhf.modules.throughput import peak_flops, throughput

log = get_logger(__name__)


def dp_loader(dataset, module, global_batch_size: Optional[int] = None) -> torch.utils.data.DataLoader:
    """Global batches from ``module.step`` to trainer.max_steps; this rank gets its DP slice."""
    t = module.cfg.trainer
    fault.install_signal_handlers()  # from here on (initial evaluation included) a signal stops at a step boundary
    sampler = GlobalBatchSampler(len(dataset), global_batch_size or t.global_batch_size, module.dp_rank,
                                 module.dp_size, seed=t.seed, start_step=module.step, end_step=t.max_steps)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)


def end_of_step(module, stats: Dict[str, float], prog_bar: Sequence[str] = ("loss",)) -> None:
    """After ``module.step`` was incremented: progress bar, train record every log_every_n_steps
    (with the mean step time since the last record), evaluation and checkpoint cadence; then, if
    any rank received SIGTERM/SIGUSR1 (see :mod:`nemo_rlhf.fault`), a checkpoint and
    :class:`~nemo_rlhf.fault.Preempted` (exit code 75) on every rank."""
    t = module.cfg.trainer
    for key in prog_bar:
        module.log(key, stats[key], prog_bar=True, logger=False, batch_size=1)
    module._tokens_since_log = getattr(module, "_tokens_since_log", 0.0) + sum(
        v for k, v in stats.items() if k.endswith("model_tokens"))
    if module.step % t.log_every_n_steps == 0 or module.step == t.max_steps or module.step == 1:
        now = time.perf_counter()
        last_step, last_time = getattr(module, "_last_log", (module.step - 1, now))
        stats["step_time_s"] = (now - last_time) / max(1, module.step - last_step)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        stats.update(throughput(module._tokens_since_log, now - last_time, module.cfg.model, module.vocab_size(),
                                module.cfg.model.seq_length, world, peak_flops(module.cfg.model)))
        module._last_log, module._tokens_since_log = (module.step, now), 0.0
        module.run_dir.log(module.step, stats, kind="train")
    if t.eval_every_n_steps and module.step % t.eval_every_n_steps == 0 and module.step != t.max_steps:
        module.evaluate()
    if t.checkpoint_every_n_steps and module.step % t.checkpoint_every_n_steps == 0:
        module.save()
    # Last, so that the step's records and evaluation are the same as in an uninterrupted run.
    signum = fault.agreed_stop_signal()
    if signum is not None:
        log.warning("%s: writing a checkpoint at step %d, then exiting with code %d",
                    fault.signal_name(signum), module.step, fault.EXIT_PREEMPTED)
        module.save()
        raise fault.Preempted(module.step, signum)


class TrainingSystem(pl.LightningModule):
    """What every algorithm's LightningModule shares: manual optimisation (the megatron optimizers
    live in the engines and are stepped in ``training_step``), the loop state that checkpoints
    and resume restore (``step`` = completed optimizer steps, the initial / last evaluation, the
    step of the last checkpoint), and the initial evaluation when training starts. Subclasses
    define ``evaluate()``, ``save()``, ``train_dataloader()`` and ``training_step()``."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.step = 0
        self.initial_eval: Optional[Dict[str, Any]] = None
        self.last_eval: Optional[Dict[str, Any]] = None
        self._last_ckpt_step = -1

    def configure_optimizers(self):
        return None

    def vocab_size(self) -> int:
        """The policy's (padded) vocabulary, for the model-FLOPs count of the throughput logs."""
        from nemo_rlhf.models.gpt import unwrap

        engine = getattr(self, "engine", None) or getattr(self, "actor", None)
        model = unwrap(engine.module) if engine is not None else None
        return getattr(model, "vocab_size", None) or self.cfg.model.vocab_size or 0

    def on_train_start(self):
        if self.initial_eval is None:
            self.initial_eval = self.evaluate()
        start_clock(self)


def start_clock(module) -> None:
    """At training start (on_train_start, after Lightning set its own signal handlers)."""
    fault.install_signal_handlers()
    module._last_log = (module.step, time.perf_counter())


def record_eval(module, metrics: Dict[str, Any], t0: float) -> Dict[str, Any]:
    """Time, log (metrics.jsonl + console) and remember an evaluation at ``module.step``.
    Collective: every rank keeps rank 0's record (timings differ per rank, and checkpoints hold
    the initial evaluation in their common state, which must be the same on all ranks)."""
    from nemo_rlhf.parallel import broadcast_object

    metrics["eval_time_s"] = time.perf_counter() - t0
    metrics = broadcast_object(metrics)
    module.run_dir.log(module.step, metrics, kind="eval")
    module.last_eval = dict(metrics, step=module.step)
    log.info("step %d eval: %s", module.step,
             " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    return module.last_eval


def save_engine(module, engine, loop_state: Optional[Dict[str, Any]] = None, extra=None) -> None:
    """Checkpoint ``engine`` (+ ``extra`` models) at ``module.step``, once per step."""
    if module._last_ckpt_step == module.step:
        return
    save_checkpoint(module.run_dir.checkpoint_dir, module.step, engine.chunks, engine.optimizer, engine.scheduler,
                    loop_state=dict(loop_state or {}, initial_eval=module.initial_eval),
                    config_yaml=module.config_yaml, keep_last=module.cfg.trainer.keep_last_n_checkpoints,
                    extra=extra, run_id=module.run_dir.run_id)
    module._last_ckpt_step = module.step
