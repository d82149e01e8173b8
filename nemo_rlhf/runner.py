"""The runner: one code path for every recipe, used by the CLI (``nemo_rlhf.train``) and the Python
API (``nemo_rlhf.api``).

    run(cfg, run_dir)  ->  context (process layout, task, tokenizer)
                       ->  execute(recipe):  run dir + config.yaml -> prepare data (fails fast)
                           -> SFT warm-up stage if the recipe's block has one and model.path is null
                           -> build (module + how to start / resume) -> resume or start
                           -> Lightning fit -> final evaluation, checkpoint, summary.json
                       ->  the before/after table on the console

A recipe never touches the run directory's checkpoints, the Lightning trainer or the summary.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from nemo_rlhf import fault
from nemo_rlhf.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.errors import ConfigError, RunDirectoryError
from nemo_rlhf.logging import get_logger, set_verbosity
from nemo_rlhf.modules.run_dir import RunDirectory, RunDirLock
from nemo_rlhf.recipes import sft
from nemo_rlhf.recipes.common import Job, RunContext
from nemo_rlhf.recipes.registry import RECIPES, Recipe, check_inputs, run_config_yaml, to_run_config, validate
from nemo_rlhf.resume import plan_start, saved_value

log = get_logger(__name__)


def run(cfg, run_dir: str | os.PathLike, return_context: bool = False, **inputs):
    """Run the job ``cfg`` describes into ``run_dir``; returns the summary (also in summary.json), and
    the context holding the trained module when ``return_context``. ``inputs``: the Python API's
    reward_fn / prompts / eval_prompts / samples / rewards, as the recipe row allows."""
    # SIGTERM / SIGUSR1 from here on (start-up included) stop at the next step boundary with a
    # checkpoint; the caller's own handlers are back afterwards (nemo_rlhf.train from Python).
    with fault.stop_at_step_boundary():
        from nemo_rlhf.interop.formats import resolve_run_config

        rcfg = resolve_run_config(to_run_config(cfg))   # architecture from an HF / .nemo model.path
        recipe = validate(rcfg)
        check_inputs(recipe, inputs)
        set_verbosity(os.environ.get("NEMO_RLHF_VERBOSITY", rcfg.verbosity))
        ctx = make_context(rcfg, Path(run_dir))
        with run_dir_lock(ctx.run_dir):
            summary = execute(recipe, ctx, rcfg, ctx.run_dir, inputs)
        print_summary(summary, ctx.summary_dir, ctx.env.rank)
        return (summary, ctx) if return_context else summary


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Rank 0 holds the run directory's lock for the whole command (every stage); every rank gets
    the same error when another process holds it."""
    from nemo_rlhf.parallel import broadcast_object
    from nemo_rlhf.parallel.distributed import is_rank_zero

    lock, error = RunDirLock(run_dir), None
    if is_rank_zero():
        try:
            lock.acquire()
        except RunDirectoryError as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise RunDirectoryError(error)
    try:
        yield
    finally:
        lock.release()


def make_context(rcfg: RunConfig, run_dir: Path) -> RunContext:
    """torch.distributed and megatron parallel state, seeds, the task and the tokenizer."""
    import torch
    from megatron.core import parallel_state as ps

    from nemo_rlhf.data.tokenizers import tokenizer_for
    from nemo_rlhf.parallel import broadcast_object, init_distributed, initialize_model_parallel
    from nemo_rlhf.tasks import build_task

    env = init_distributed(rcfg.parallel.backend)
    dp_size = initialize_model_parallel(rcfg.parallel, seed=rcfg.trainer.seed)
    run_dir = Path(broadcast_object(str(Path(run_dir).resolve())))
    torch.manual_seed(rcfg.trainer.seed)
    task = build_task(rcfg.task)
    # the task's own (sentiment), else the checkpoint's when model.path is a Hugging Face directory with one
    tokenizer = task.tokenizer() if hasattr(task, "tokenizer") else tokenizer_for(rcfg.model.path, task.vocab)
    return RunContext(rcfg, env, ps.get_data_parallel_rank(), dp_size, run_dir, task, tokenizer)


def execute(recipe: Recipe, ctx: RunContext, rcfg: RunConfig, run_dir: Path,
            inputs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One stage: ``recipe`` with config ``rcfg`` into ``run_dir`` (the command's run dir, or
    <run dir>/sft for a warm-up stage)."""
    t_start = time.perf_counter()
    block = recipe.config_block(rcfg)
    config_yaml = run_config_yaml(rcfg)
    start = plan_start(rcfg, config_yaml, run_dir)
    run_dir, resume_from = start.run_dir, start.checkpoint
    rd = RunDirectory(run_dir)
    rd.run_id = start.run_id
    rd.write_config(config_yaml)
    data = recipe.module.prepare(ctx, rcfg, block, **{k: v for k, v in (inputs or {}).items() if v is not None})
    init_path, stages = rcfg.model.path, {}
    warmup = getattr(block, "sft_warmup", None)
    if warmup is not None and init_path is None and warmup.steps > 0 and resume_from is None:
        init_path, sft_summary = sft_warmup(ctx, rcfg, run_dir, warmup)
        stages = {"sft": sft_summary} if sft_summary else {}
    job: Job = recipe.module.build(ctx, rcfg, block, data, rd, config_yaml)
    module, engine = job.module, job.engine or job.module.engine
    if resume_from is not None:
        _follow_new_max_steps(resume_from, rcfg, [engine, *(job.extra_engines or {}).values()])
        loop = load_checkpoint(resume_from, engine.chunks, engine.optimizer, engine.scheduler, extra=job.extra_engines)
        module.step, module.initial_eval = int(loop["step"]), loop.get("initial_eval")
        module._last_ckpt_step = module.step
        rd.truncate_metrics_after(module.step)   # records after the checkpoint will be redone
        log.info("resumed from %s at step %d", resume_from, module.step)
        job.after_resume(loop, rd)
    else:
        if init_path is not None:
            job.load_initial(str(init_path))
        job.after_start()
    fit(module, ctx, rcfg, rd)
    summary = finish(module, rd, ctx, rcfg, t_start, {**job.summary, **stages})
    ctx.module, ctx.summary_dir = module, run_dir
    return summary


def _follow_new_max_steps(checkpoint: Path, rcfg: RunConfig, engines) -> None:
    """A continued run with another trainer.max_steps: the learning-rate schedule follows the new
    value (megatron's scheduler would otherwise keep the checkpoint's decay length)."""
    saved = saved_value(checkpoint, "trainer.max_steps")
    if saved is None or saved == rcfg.trainer.max_steps:
        return
    log.info("trainer.max_steps was %s when %s was saved, now %d: continuing to step %d, the learning-rate "
             "schedule follows the new max_steps", saved, checkpoint.name, rcfg.trainer.max_steps, rcfg.trainer.max_steps)
    for engine in engines:
        scheduler = engine[2] if isinstance(engine, tuple) else engine.scheduler
        if scheduler is not None:
            scheduler.override_opt_param_scheduler = True


def sft_warmup(ctx: RunContext, rcfg: RunConfig, run_dir: Path, warmup):
    """(initial checkpoint, SFT summary or None): an SFT stage in the same command into
    <run dir>/sft, skipped when already complete there."""
    from nemo_rlhf.parallel import initialize_model_parallel

    sft_dir = run_dir / "sft"
    done, summary = latest_checkpoint(sft_dir / "checkpoints"), None
    if done is None or int(done.name.split("_")[1]) < warmup.steps:
        log.info("no SFT checkpoint given (model.path=null): SFT warm-up for %d steps into %s", warmup.steps, sft_dir)
        summary = execute(RECIPES["sft"], ctx, sft.warmup_config(rcfg, warmup), sft_dir)
        initialize_model_parallel(ctx.rcfg.parallel, seed=ctx.rcfg.trainer.seed)   # fresh state for the next models
    summary = {k: summary[k] for k in ("initial", "final", "steps", "wall_time_s")} if summary else None
    return latest_checkpoint(sft_dir / "checkpoints"), summary


def lightning_trainer(rcfg: RunConfig, env, run_dir: Path):
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from nemo_rlhf.parallel.strategy import MegatronStrategy

    if rcfg.trainer.num_nodes != env.num_nodes:
        raise ConfigError(f"trainer.num_nodes={rcfg.trainer.num_nodes} but the launcher started "
                          f"{env.world_size} processes on {env.num_nodes} node(s)")
    if rcfg.trainer.devices is not None and rcfg.trainer.devices != env.local_world_size:
        raise ConfigError(f"trainer.devices={rcfg.trainer.devices} but the launcher started "
                          f"{env.local_world_size} process(es) per node")
    loggers = []
    if rcfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version=""))
    if rcfg.logger.csv:
        loggers.append(CSVLogger(str(run_dir), name="csv", version=""))
    if rcfg.logger.wandb:
        loggers.append(_wandb_logger(rcfg, run_dir))
    backend = rcfg.parallel.backend if rcfg.parallel.backend != "auto" else (
        "nccl" if torch.cuda.is_available() else "gloo")
    trainer = pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=env.local_world_size, num_nodes=env.num_nodes,
        strategy=MegatronStrategy(env, backend), max_epochs=1, precision="32-true",
        use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        enable_progress_bar=rcfg.trainer.progress_bar and env.rank == 0,
        default_root_dir=str(run_dir),
    )
    return trainer, loggers


def _wandb_logger(rcfg: RunConfig, run_dir: Path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("logger.wandb=true needs the wandb package: pip install -e '.[wandb]'") from None
    from pytorch_lightning.loggers import WandbLogger

    lc = rcfg.logger
    return WandbLogger(project=lc.wandb_project, name=f"{run_dir.parent.name}/{run_dir.name}", save_dir=str(run_dir),
                       offline=lc.wandb_mode == "offline", config={"algorithm": rcfg.algorithm.name})


def fit(module, ctx: RunContext, rcfg: RunConfig, rd: RunDirectory) -> None:
    trainer, rd.loggers = lightning_trainer(rcfg, ctx.env, rd.path)
    if module.step < rcfg.trainer.max_steps:
        trainer.fit(module)
    else:
        log.info("already at trainer.max_steps=%d; evaluating only", rcfg.trainer.max_steps)
        module.initial_eval = module.initial_eval or module.evaluate()


def finish(module, rd: RunDirectory, ctx: RunContext, rcfg: RunConfig, t_start: float,
           extra: Dict[str, Any]) -> Dict[str, Any]:
    """Final evaluation (unless the last step just ran one), final checkpoint, summary.json."""
    final = module.last_eval if module.last_eval and module.last_eval.get("step") == module.step \
        else module.evaluate()
    module.save()
    summary_extra = {"algorithm": rcfg.algorithm.name, "steps": module.step,
                     "wall_time_s": time.perf_counter() - t_start, "world_size": ctx.env.world_size,
                     "layout": {"tp": rcfg.parallel.tensor_model_parallel_size,
                                "pp": rcfg.parallel.pipeline_model_parallel_size, "dp": ctx.dp_size,
                                "vpp": rcfg.parallel.virtual_pipeline_model_parallel_size or 1},
                     "checkpoint": str(rd.checkpoint_dir / f"step_{module.step:07d}"), **extra}
    rd.write_summary(module.initial_eval or {}, final, summary_extra)
    samples = getattr(ctx.task, "samples_markdown", None)     # tasks that show their samples (sentiment)
    text = samples(f"{rcfg.algorithm.name}, steps 0 -> {module.step}") if samples is not None else ""
    if text and ctx.env.rank == 0:
        (rd.path / "samples.md").write_text(text + "\n")
        print(text, flush=True)
    if rcfg.logger.plot and ctx.env.rank == 0:
        _plot(rd.path)
    return {"initial": module.initial_eval or {}, "final": final, **summary_extra}


SUMMARY_METRICS = ("optimality", "valid_rate", "optimality_greedy", "valid_rate_greedy", "optimality_beta0",
                   "valid_rate_beta0", "behaviour_optimality", "accuracy", "accuracy_greedy", "accuracy_equal_length",
                   "reward_margin", "sentiment", "perplexity", "pref_accuracy", "pref_margin")
"""The metrics of the before/after table, in this order, where the run has them."""


def _plot(run_dir: Path) -> None:
    """curves.png next to metrics.jsonl; a plotting problem is logged, never fails the run."""
    try:
        from nemo_rlhf.plot import plot_run

        log.info("curves: %s", plot_run(run_dir))
    except Exception as e:   # matplotlib missing or a metrics file without numbers: the run itself is done
        log.warning("could not plot %s (%s: %s); the metrics are in metrics.jsonl", run_dir, type(e).__name__, e)


def print_summary(summary: Dict[str, Any], run_dir: Path, rank: int) -> None:
    if rank != 0:
        return
    init, fin = summary["initial"], summary["final"]
    lines = [f"\nnemo_rlhf: {summary['steps']} steps in {summary['wall_time_s']:.1f}s -> {run_dir}",
             f"  {'metric':<22}{'before':>10}{'after':>10}"]
    for k in (k for k in SUMMARY_METRICS if k in fin):
        lines.append(f"  {k:<22}{init.get(k, float('nan')):>10.3f}{fin[k]:>10.3f}")
    lines.append(f"  summary: {run_dir / 'summary.json'}")
    print("\n".join(lines), flush=True)


def export(module, engine, rcfg: RunConfig, tokenizer, directory, megatron: bool = True) -> Path:
    """The policy in ``engine`` as a Hugging Face model in ``directory`` (config.json, model.safetensors,
    tokenizer files), gathered from any TP/PP (heads stay out); with ``megatron`` also the megatron
    dist checkpoint under ``directory/checkpoints`` and config.yaml (returns that checkpoint's path)."""
    from nemo_rlhf.interop import export_hf, is_hf_dir

    directory = Path(directory)
    model = rcfg.model
    source = model.path if model.path is not None and is_hf_dir(model.path) else None
    export_hf(directory, engine.chunks, model, model.vocab_size or tokenizer.vocab_size,
              source_dir=source, tokenizer=tokenizer)
    if not megatron:
        return directory
    path = save_checkpoint(directory / "checkpoints", module.step, engine.chunks, config_yaml=module.config_yaml)
    (directory / "config.yaml").write_text(module.config_yaml)
    return path
