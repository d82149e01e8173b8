"""Entry point: ``python -m nemo_rlhf.train --config-name sft_tiny [key=value ...]``.

validate config -> init torch.distributed / megatron parallel state -> build task, data, model
-> Lightning fit -> final evaluation, checkpoint and ``summary.json`` in the run directory
(``hydra.run.dir=...``). Launch multi-process runs with torchrun or Slurm (``launchers/``).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_rlhf.config import ConfigError, RunConfig, register_configs, to_run_config
from nemo_rlhf.logging import get_logger, set_verbosity

log = get_logger(__name__)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()


def _lightning_trainer(cfg: RunConfig, env, run_dir: Path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from nemo_rlhf.parallel.strategy import MegatronStrategy

    if cfg.trainer.num_nodes != env.num_nodes:
        raise ConfigError(f"trainer.num_nodes={cfg.trainer.num_nodes} but the launcher started "
                          f"{env.world_size} processes on {env.num_nodes} node(s)")
    if cfg.trainer.devices is not None and cfg.trainer.devices != env.local_world_size:
        raise ConfigError(f"trainer.devices={cfg.trainer.devices} but the launcher started "
                          f"{env.local_world_size} process(es) per node")
    loggers = []
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version=""))
    if cfg.logger.csv:
        loggers.append(CSVLogger(str(run_dir), name="csv", version=""))
    import torch

    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else (
        "nccl" if torch.cuda.is_available() else "gloo")
    trainer = pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=env.local_world_size, num_nodes=env.num_nodes,
        strategy=MegatronStrategy(env, backend), max_epochs=1, precision="32-true",
        use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        enable_progress_bar=cfg.trainer.progress_bar and env.rank == 0,
        default_root_dir=str(run_dir),
    )
    return trainer, loggers


def run(cfg: DictConfig | RunConfig, run_dir: str | os.PathLike) -> Dict[str, Any]:
    """Run one training job described by ``cfg``; returns the summary (also in summary.json)."""
    import torch
    from megatron.core import parallel_state as ps

    from nemo_rlhf.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
    from nemo_rlhf.data.sft import SFTDataset
    from nemo_rlhf.data.tokenizers import CharTokenizer
    from nemo_rlhf.evaluation import evaluate_randomwalks
    from nemo_rlhf.modules.run_dir import RunDirectory
    from nemo_rlhf.modules.sft import SFTModule
    from nemo_rlhf.parallel import broadcast_object, init_distributed, initialize_model_parallel
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    rcfg = to_run_config(cfg)
    set_verbosity(os.environ.get("NEMO_RLHF_VERBOSITY", rcfg.verbosity))
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(rcfg))
    env = init_distributed(rcfg.parallel.backend)
    dp_size = initialize_model_parallel(rcfg.parallel, seed=rcfg.trainer.seed)
    run_dir = Path(broadcast_object(str(Path(run_dir).resolve())))
    t_start = time.perf_counter()

    torch.manual_seed(rcfg.trainer.seed)
    tc = rcfg.task
    task = RandomWalks(tc.num_nodes, tc.edge_prob, tc.max_length, tc.num_walks, tc.seed)
    tokenizer = CharTokenizer(task.vocab)
    pairs = [([tokenizer.ids[w] for w in task.walk_text(walk[:1])],
              tokenizer.encode(task.walk_text(walk[1:]))) for walk in task.walks]
    dataset = SFTDataset.from_pairs(pairs, rcfg.model.seq_length, tokenizer.pad_id, tokenizer.eos_id)

    trainer, loggers = _lightning_trainer(rcfg, env, run_dir)
    rd = RunDirectory(run_dir, loggers)
    rd.write_config(config_yaml)
    pp = rcfg.parallel.pipeline_model_parallel_size
    gen = rcfg.generation

    def evaluate_fn(engine, step):
        if pp > 1:
            return {}  # sampling needs PP=1 (see nemo_rlhf.generation)
        return evaluate_randomwalks(engine.module, task, tokenizer, tc.eval_samples_per_start,
                                    seed=rcfg.trainer.seed + step, temperature=gen.temperature,
                                    top_k=gen.top_k, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens)

    module = SFTModule(rcfg, dataset, tokenizer.vocab_size, rd, evaluate_fn,
                       dp_rank=ps.get_data_parallel_rank(), dp_size=dp_size, config_yaml=config_yaml)
    resume_from = None
    if rcfg.resume == "auto":
        resume_from = latest_checkpoint(rd.checkpoint_dir)
        if resume_from is None:
            log.info("resume=auto: no complete checkpoint in %s, starting fresh", rd.checkpoint_dir)
    elif rcfg.resume:
        resume_from = Path(rcfg.resume)
        if not resume_from.exists():
            raise CheckpointError(f"resume={rcfg.resume}: no such checkpoint directory")
    elif rcfg.model.path:
        load_checkpoint(rcfg.model.path, module.engine.chunks, load_rng=False)
    if resume_from is not None:
        loop = load_checkpoint(resume_from, module.engine.chunks, module.engine.optimizer,
                               module.engine.scheduler)
        module.step = int(loop["step"])
        module.initial_eval = loop.get("initial_eval")
        module._last_ckpt_step = module.step
        rd.truncate_metrics_after(module.step)
        log.info("resumed from %s at step %d", resume_from, module.step)

    if module.step < rcfg.trainer.max_steps:
        trainer.fit(module)
    else:
        log.info("already at trainer.max_steps=%d; evaluating only", rcfg.trainer.max_steps)
        module.initial_eval = module.initial_eval or module.evaluate()
    final = module.last_eval if module.last_eval and module.last_eval.get("step") == module.step \
        else module.evaluate()
    module.save()
    summary_extra = {"steps": module.step, "wall_time_s": time.perf_counter() - t_start,
                     "world_size": env.world_size,
                     "layout": {"tp": rcfg.parallel.tensor_model_parallel_size, "pp": pp, "dp": dp_size},
                     "checkpoint": str(rd.checkpoint_dir / f"step_{module.step:07d}")}
    rd.write_summary(module.initial_eval or {}, final, summary_extra)
    summary = {"initial": module.initial_eval or {}, "final": final, **summary_extra}
    _print_summary(summary, run_dir, env.rank)
    return summary


def _print_summary(summary: Dict[str, Any], run_dir: Path, rank: int) -> None:
    if rank != 0:
        return
    init, fin = summary["initial"], summary["final"]
    keys = [k for k in ("optimality", "valid_rate", "optimality_greedy", "valid_rate_greedy",
                        "behaviour_optimality") if k in fin]
    lines = [f"\nnemo_rlhf: {summary['steps']} steps in {summary['wall_time_s']:.1f}s -> {run_dir}",
             f"  {'metric':<22}{'before':>10}{'after':>10}"]
    for k in keys:
        lines.append(f"  {k:<22}{init.get(k, float('nan')):>10.3f}{fin[k]:>10.3f}")
    lines.append(f"  summary: {run_dir / 'summary.json'}")
    print("\n".join(lines), flush=True)


@hydra.main(config_path=CONF_DIR, config_name="sft_tiny", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from nemo_rlhf.checkpoint import CheckpointError
    from nemo_rlhf.parallel import destroy

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, CheckpointError) as e:
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    finally:
        destroy()


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
