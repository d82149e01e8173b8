"""Entry point: ``python -m nemo_rlhf.train --config-name sft_tiny [key=value ...]``.

validate config -> init torch.distributed / megatron parallel state -> build task, data, model
-> Lightning fit -> final evaluation, checkpoint and ``summary.json`` in the run directory
(``hydra.run.dir=...``). Launch multi-process runs with torchrun or Slurm (``launchers/``).
"""
from __future__ import annotations

import dataclasses
import os
from functools import partial
import sys
import types
import time
from pathlib import Path
from typing import Any, Dict, Optional

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


class _Context:
    """What every algorithm's run needs: validated config, process layout, task, tokenizer."""

    def __init__(self, rcfg: RunConfig, run_dir: Path):
        import torch
        from megatron.core import parallel_state as ps

        from nemo_rlhf.data.tokenizers import tokenizer_for
        from nemo_rlhf.parallel import broadcast_object, init_distributed, initialize_model_parallel
        from nemo_rlhf.tasks.randomwalks import RandomWalks

        self.rcfg = rcfg
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(rcfg))
        self.env = init_distributed(rcfg.parallel.backend)
        self.dp_size = initialize_model_parallel(rcfg.parallel, seed=rcfg.trainer.seed)
        self.dp_rank = ps.get_data_parallel_rank()
        self.run_dir = Path(broadcast_object(str(Path(run_dir).resolve())))
        torch.manual_seed(rcfg.trainer.seed)
        tc = rcfg.task
        self.task = RandomWalks(tc.num_nodes, tc.edge_prob, tc.max_length, tc.num_walks, tc.seed)
        # the checkpoint's tokenizer when model.path is a Hugging Face directory with one
        self.tokenizer = tokenizer_for(rcfg.model.path, self.task.vocab)

    def evaluate_fn(self, engine, step):
        from nemo_rlhf.evaluation import evaluate_randomwalks

        rcfg, gen = self.rcfg, self.rcfg.generation
        if rcfg.parallel.pipeline_model_parallel_size > 1:
            return {}  # sampling needs PP=1 (see nemo_rlhf.generation)
        return evaluate_randomwalks(engine.module, self.task, self.tokenizer, rcfg.task.eval_samples_per_start,
                                    seed=rcfg.trainer.seed + step, temperature=gen.temperature,
                                    top_k=gen.top_k, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens)


def _resume_path(rcfg: RunConfig, checkpoint_dir: Path) -> Optional[Path]:
    from nemo_rlhf.checkpoint import CheckpointError, latest_checkpoint

    if rcfg.resume == "auto":
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            log.info("resume=auto: no complete checkpoint in %s, starting fresh", checkpoint_dir)
        return found
    if rcfg.resume:
        path = Path(rcfg.resume)
        if not path.exists():
            raise CheckpointError(f"resume={rcfg.resume}: no such checkpoint directory")
        return path
    return None


def _resume(module, engine, resume_from: Path, rd, extra=None) -> Dict[str, Any]:
    """Restore ``engine`` (+ ``extra`` models), the step and the initial evaluation from a
    checkpoint; drop metrics records after it (they will be redone)."""
    from nemo_rlhf.checkpoint import load_checkpoint

    loop = load_checkpoint(resume_from, engine.chunks, engine.optimizer, engine.scheduler, extra=extra)
    module.step, module.initial_eval = int(loop["step"]), loop.get("initial_eval")
    module._last_ckpt_step = module.step
    rd.truncate_metrics_after(module.step)
    log.info("resumed from %s at step %d", resume_from, module.step)
    return loop


def _finish(module, rd, ctx: _Context, rcfg: RunConfig, t_start: float,
            extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Final evaluation (unless the last step just ran one), final checkpoint, summary.json."""
    final = module.last_eval if module.last_eval and module.last_eval.get("step") == module.step \
        else module.evaluate()
    module.save()
    summary_extra = {"algorithm": rcfg.algorithm.name, "steps": module.step,
                     "wall_time_s": time.perf_counter() - t_start, "world_size": ctx.env.world_size,
                     "layout": {"tp": rcfg.parallel.tensor_model_parallel_size,
                                "pp": rcfg.parallel.pipeline_model_parallel_size, "dp": ctx.dp_size},
                     "checkpoint": str(rd.checkpoint_dir / f"step_{module.step:07d}"), **(extra or {})}
    rd.write_summary(module.initial_eval or {}, final, summary_extra)
    return {"initial": module.initial_eval or {}, "final": final, **summary_extra}


def _fit(module, ctx: _Context, rcfg: RunConfig, rd) -> None:
    trainer, loggers = _lightning_trainer(rcfg, ctx.env, rd.path)
    rd.loggers = loggers
    if module.step < rcfg.trainer.max_steps:
        trainer.fit(module)
    else:
        log.info("already at trainer.max_steps=%d; evaluating only", rcfg.trainer.max_steps)
        module.initial_eval = module.initial_eval or module.evaluate()


def _file_examples(ctx: _Context, rcfg: RunConfig, schema: str, max_new_tokens: int = 0):
    """(tokenised examples, {"data": counts}) from data.train_file, or (None, {}) without one."""
    from nemo_rlhf.data.files import load_examples

    if rcfg.data.train_file is None:
        return None, {}
    examples, report = load_examples(rcfg.data, schema, ctx.tokenizer, rcfg.model.seq_length, max_new_tokens)
    log.info("data.train_file=%s: %d examples (%d truncated, %d dropped)", rcfg.data.train_file,
             report.examples, report.truncated, report.dropped)
    return examples, {"data": {"train_file": str(rcfg.data.train_file), **report.as_dict()}}


def run_sft(ctx: _Context, rcfg: RunConfig, run_dir: Path, samples=None) -> Dict[str, Any]:
    """SFT on the task's walks, or on ``samples`` (strings, whose first token is the prompt, or
    [prompt, completion] pairs, trlX's convention); the loss covers completion tokens only."""
    from nemo_rlhf.checkpoint import load_weights
    from nemo_rlhf.data.sft import SFTDataset
    from nemo_rlhf.modules.run_dir import RunDirectory
    from nemo_rlhf.modules.sft import SFTModule

    t_start = time.perf_counter()
    task, tok = ctx.task, ctx.tokenizer
    pairs, data_extra = (None, {}) if samples is not None else _file_examples(ctx, rcfg, "sft")
    if pairs is None:
        if samples is None:
            samples = [[task.walk_text(walk[:1]), task.walk_text(walk[1:])] for walk in task.walks]
        pairs = []
        for i, sample in enumerate(samples):
            prompt, completion = (sample[:1], sample[1:]) if isinstance(sample, str) else sample
            try:
                pairs.append((tok.encode(prompt), tok.encode(completion) + [tok.eos_id]))
            except ValueError as e:
                raise ConfigError(f"SFT sample {i}: {e}") from None
    dataset = SFTDataset.from_pairs(pairs, rcfg.model.seq_length, tok.pad_id, tok.eos_id, add_eos=False)
    rd = RunDirectory(run_dir)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(rcfg))
    rd.write_config(config_yaml)
    module = SFTModule(rcfg, dataset, tok.vocab_size, rd, ctx.evaluate_fn, dp_rank=ctx.dp_rank,
                       dp_size=ctx.dp_size, config_yaml=config_yaml)
    resume_from = _resume_path(rcfg, rd.checkpoint_dir)
    if resume_from is not None:
        _resume(module, module.engine, resume_from, rd)
    elif rcfg.model.path:
        load_weights(rcfg.model.path, module.engine.chunks)
        module.engine.optimizer.reload_model_params()
    _fit(module, ctx, rcfg, rd)
    summary = _finish(module, rd, ctx, rcfg, t_start, data_extra)
    ctx.module = module
    return summary


def _sft_warmup_config(rcfg: RunConfig, block) -> RunConfig:
    """The SFT run that precedes PPO/DPO when no model.path is given (``block``: rcfg.ppo / rcfg.dpo)."""
    return dataclasses.replace(
        rcfg, algorithm=dataclasses.replace(rcfg.algorithm, name="sft"), resume="auto",
        data=dataclasses.replace(rcfg.data, train_file=None),
        trainer=dataclasses.replace(rcfg.trainer, max_steps=block.sft_steps, global_batch_size=block.sft_global_batch_size,
                                    micro_batch_size=block.sft_micro_batch_size, eval_every_n_steps=0,
                                    checkpoint_every_n_steps=0, keep_last_n_checkpoints=1),
        optim=dataclasses.replace(rcfg.optim, lr=block.sft_lr, min_lr=block.sft_lr / 30, scheduler="cosine",
                                  warmup_steps=0))


def _sft_warmup(ctx: _Context, rcfg: RunConfig, run_dir: Path, block, resuming: bool):
    """(initial checkpoint, SFT summary or None): model.path, or an SFT warm-up in the same command
    into <run dir>/sft (skipped when already complete there)."""
    from nemo_rlhf.checkpoint import latest_checkpoint

    if rcfg.model.path is not None or block.sft_steps == 0 or resuming:
        return rcfg.model.path, None
    sft_dir = run_dir / "sft"
    done, summary = latest_checkpoint(sft_dir / "checkpoints"), None
    if done is None or int(done.name.split("_")[1]) < block.sft_steps:
        log.info("no SFT checkpoint given (model.path=null): SFT warm-up for %d steps into %s",
                 block.sft_steps, sft_dir)
        summary = run_sft(ctx, _sft_warmup_config(rcfg, block), sft_dir)
        initialize_model_parallel_again(ctx)
    return latest_checkpoint(sft_dir / "checkpoints"), summary


def _sft_extra(sft_summary) -> Dict[str, Any]:
    return {"sft": {k: sft_summary[k] for k in ("initial", "final", "steps", "wall_time_s")}} if sft_summary else {}


def run_rm(ctx: _Context, rcfg: RunConfig, run_dir: Path) -> Dict[str, Any]:
    from nemo_rlhf.checkpoint import load_weights
    from nemo_rlhf.data.preference import PreferenceDataset, randomwalk_pairs
    from nemo_rlhf.modules.reward_model import RewardModelModule
    from nemo_rlhf.modules.run_dir import RunDirectory

    t_start = time.perf_counter()
    rd = RunDirectory(run_dir)
    rd.write_config(ctx.config_yaml)
    pairs, data_extra = _file_examples(ctx, rcfg, "preference")
    if pairs is None:
        pairs = [(p, c + [ctx.tokenizer.eos_id], r + [ctx.tokenizer.eos_id])
                 for p, c, r in randomwalk_pairs(ctx.task, ctx.tokenizer, rcfg.rm.num_pairs, rcfg.trainer.seed)]
    if len(pairs) < 2:
        raise ConfigError(f"rm: {len(pairs)} preference pair(s); need at least 2 (training + held-out)")
    n_held = max(1, int(len(pairs) * rcfg.rm.heldout_fraction))
    build = lambda ps: PreferenceDataset.build(ps, rcfg.model.seq_length, ctx.tokenizer.pad_id, ctx.tokenizer.eos_id,
                                               add_eos=False)
    train_set, heldout = build(pairs[:-n_held]), build(pairs[-n_held:])
    module = RewardModelModule(rcfg, train_set, heldout, ctx.tokenizer.vocab_size, rd, ctx.dp_rank, ctx.dp_size,
                               config_yaml=ctx.config_yaml)
    resume_from = _resume_path(rcfg, rd.checkpoint_dir)
    if resume_from is not None:
        _resume(module, module.engine, resume_from, rd)
    elif rcfg.model.path:
        load_weights(rcfg.model.path, module.engine.chunks)          # the head starts fresh
        module.engine.optimizer.reload_model_params()
    _fit(module, ctx, rcfg, rd)
    summary = _finish(module, rd, ctx, rcfg, t_start,
                      {"num_pairs": len(train_set), "heldout_pairs": len(heldout), **data_extra})
    ctx.module = module
    return summary


def run_dpo(ctx: _Context, rcfg: RunConfig, run_dir: Path) -> Dict[str, Any]:
    """DPO and its variants (algorithm.name=dpo) or KTO (algorithm.name=kto) on pairs / labelled
    completions from data.train_file or built from the task's walks."""
    from nemo_rlhf.checkpoint import CheckpointError
    from nemo_rlhf.data.preference import KTODataset, PreferenceDataset, randomwalk_pairs, unpair
    from nemo_rlhf.modules.dpo import DPOModule, needs_reference
    from nemo_rlhf.modules.run_dir import RunDirectory

    t_start = time.perf_counter()
    kto = rcfg.algorithm.name == "kto"
    block = rcfg.kto if kto else rcfg.dpo
    tok = ctx.tokenizer
    rd = RunDirectory(run_dir)
    rd.write_config(ctx.config_yaml)
    resume_from = _resume_path(rcfg, rd.checkpoint_dir)
    examples, data_extra = _file_examples(ctx, rcfg, "kto" if kto else "preference")
    init_path, sft_summary = _sft_warmup(ctx, rcfg, run_dir, block, resume_from is not None)
    if examples is None:
        examples = [(p, c + [tok.eos_id], r + [tok.eos_id])
                    for p, c, r in randomwalk_pairs(ctx.task, tok, block.num_pairs, rcfg.trainer.seed)]
        examples = unpair(examples) if kto else examples
    try:
        if kto:
            dataset = KTODataset.build_unpaired(examples, rcfg.model.seq_length, tok.pad_id, tok.eos_id,
                                                seed=rcfg.trainer.seed, add_eos=False)
        else:
            dataset = PreferenceDataset.build(examples, rcfg.model.seq_length, tok.pad_id, tok.eos_id, add_eos=False)
    except ValueError as e:
        raise ConfigError(f"{rcfg.algorithm.name}: {e}") from None
    if kto:
        n_d = int(dataset.desirable.sum())
        n_u = len(dataset) - n_d
        ratio = rcfg.kto.desirable_weight * n_d / max(rcfg.kto.undesirable_weight * n_u, 1e-9)
        if not 1.0 <= ratio <= 4 / 3:
            log.warning("kto: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = %.3f "
                        "(%d desirable, %d undesirable); the KTO paper recommends [1, 4/3]", ratio, n_d, n_u)
        data_extra = {**data_extra, "desirable": n_d, "undesirable": n_u}
    module = DPOModule(rcfg, dataset, tok.vocab_size, rd, ctx.evaluate_fn, ctx.dp_rank, ctx.dp_size,
                       config_yaml=ctx.config_yaml)
    if resume_from is not None:
        extra = {"reference": ([module.reference], None, None)} if module.reference is not None else None
        _resume(module, module.engine, resume_from, rd, extra=extra)
        if block.reference == "precomputed" and needs_reference(block):
            import torch

            ref_file = rd.path / "reference_logps.pt"
            if not ref_file.is_file():
                raise CheckpointError(f"resume: {ref_file} (the precomputed reference log-probs) is missing")
            dataset.ref_logps.copy_(torch.load(ref_file))
    else:
        if init_path is not None:
            module.init_from(init_path)
        if block.reference == "precomputed" and needs_reference(block):
            module.precompute_reference()
    _fit(module, ctx, rcfg, rd)
    count = {"num_examples": len(dataset)} if kto else {"num_pairs": len(dataset)}
    summary = _finish(module, rd, ctx, rcfg, t_start, {**count, **data_extra, **_sft_extra(sft_summary)})
    ctx.module = module
    return summary


def run_ppo(ctx: _Context, rcfg: RunConfig, run_dir: Path, reward_fn=None, prompts=None,
            eval_prompts=None) -> Dict[str, Any]:
    """PPO on ``prompts`` (strings of any token lengths), else data.train_file's prompt column, else
    the task's prompts (the start node of each walk, as trlX)."""
    from nemo_rlhf.modules.ppo import PPOModule
    from nemo_rlhf.modules.run_dir import RunDirectory
    from nemo_rlhf.rewards import resolve_reward_fn

    t_start = time.perf_counter()
    rd = RunDirectory(run_dir)
    rd.write_config(ctx.config_yaml)
    if rcfg.ppo.reward_model is not None and reward_fn is None:
        from nemo_rlhf.rewards import RewardModelScorer

        reward_fn = RewardModelScorer(rcfg.ppo.reward_model, rcfg.model, rcfg.parallel, ctx.tokenizer)
    reward_fn = resolve_reward_fn(reward_fn if reward_fn is not None else rcfg.ppo.reward_fn, ctx.task)
    new_tokens = rcfg.generation.max_new_tokens or rcfg.task.max_length
    prompt_ids, data_extra = (None, {}) if prompts is not None else _file_examples(ctx, rcfg, "prompt", new_tokens)
    if prompts is not None:
        prompt_ids = encode_prompts(ctx.tokenizer, prompts, rcfg.model.seq_length - new_tokens)
    elif prompt_ids is None:  # the task's prompts: the start node of each walk (as trlX)
        prompt_ids = [[ctx.tokenizer.ids[ctx.task.walk_text(w[:1])]] for w in ctx.task.walks]
    resume_from = _resume_path(rcfg, rd.checkpoint_dir)
    init_path, sft_summary = _sft_warmup(ctx, rcfg, run_dir, rcfg.ppo, resume_from is not None)
    evaluate_fn = ctx.evaluate_fn
    if eval_prompts is not None:
        evaluate_fn = partial(_evaluate_with_prompts, ctx,
                              encode_prompts(ctx.tokenizer, eval_prompts, rcfg.model.seq_length - new_tokens,
                                             "eval_prompts"), reward_fn)
    module = PPOModule(rcfg, prompt_ids, ctx.tokenizer, reward_fn, rd, evaluate_fn, ctx.dp_rank, ctx.dp_size,
                       config_yaml=ctx.config_yaml)
    if resume_from is not None:
        module.load_loop_state(_resume(module, module.actor, resume_from, rd, extra=module.engines_for_checkpoint()))
    elif init_path is not None:
        module.init_from(init_path)
    _fit(module, ctx, rcfg, rd)
    summary = _finish(module, rd, ctx, rcfg, t_start,
                      {"num_prompts": len(prompt_ids), **data_extra, **_sft_extra(sft_summary)})
    ctx.module = module
    return summary


def encode_prompts(tokenizer, prompts, max_tokens: Optional[int] = None, name: str = "prompts"):
    """Token-id lists of ``prompts`` (strings, any lengths; at most ``max_tokens`` tokens each =
    model.seq_length - generation.max_new_tokens, the room generation leaves)."""
    if isinstance(prompts, str) or not prompts:
        raise ConfigError(f"{name} must be a non-empty list of non-empty strings")
    ids = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ConfigError(f"{name}[{i}] must be a non-empty string, got {p!r}")
        try:
            ids.append(list(tokenizer.encode(p)))
        except ValueError as e:
            raise ConfigError(f"{name}[{i}]: {e}") from None
        if not ids[-1]:
            raise ConfigError(f"{name}[{i}] encodes to no tokens")
        if max_tokens is not None and len(ids[-1]) > max_tokens:
            raise ConfigError(f"{name}[{i}] has {len(ids[-1])} tokens, more than model.seq_length - "
                              f"generation.max_new_tokens = {max_tokens}")
    return ids


def _evaluate_with_prompts(ctx: _Context, prompt_ids, reward_fn, engine, step):
    """Task metrics plus the mean reward of temperature-1 samples from user-given eval prompts."""
    import torch

    from nemo_rlhf.generation.sampling import SamplingParams, generate, left_pad
    from nemo_rlhf.rewards import score

    metrics = ctx.evaluate_fn(engine, step)
    tok, g = ctx.tokenizer, ctx.rcfg.generation
    ids, lengths = left_pad(prompt_ids, tok.pad_id)
    out = generate(engine.module, ids, SamplingParams(
        max_new_tokens=g.max_new_tokens or ctx.rcfg.task.max_length, temperature=g.temperature, top_k=g.top_k,
        top_p=g.top_p, eos_id=tok.eos_id, pad_id=tok.pad_id),
        generator=torch.Generator().manual_seed(ctx.rcfg.trainer.seed + step), vocab_size=tok.vocab_size,
        prompt_lengths=lengths)
    prompts = [tok.decode(p) for p in prompt_ids]
    completions = [tok.decode(c.tolist()) for c in out.completions]
    scores = score(reward_fn, [p + c for p, c in zip(prompts, completions)], prompts, completions)
    metrics["eval_reward_mean"] = sum(scores) / len(scores)
    return metrics


def run_ilql(ctx: _Context, rcfg: RunConfig, run_dir: Path, samples=None, rewards=None) -> Dict[str, Any]:
    from nemo_rlhf.checkpoint import load_weights
    from nemo_rlhf.data.ilql import ILQLDataset, load_jsonl_samples
    from nemo_rlhf.evaluation import evaluate_randomwalks
    from nemo_rlhf.modules.ilql import ILQLModule, ilql_logits_processor
    from nemo_rlhf.modules.run_dir import RunDirectory

    t_start = time.perf_counter()
    ic, task, tok = rcfg.ilql, ctx.task, ctx.tokenizer
    if samples is None and ic.samples_path:
        samples, rewards = load_jsonl_samples(ic.samples_path)
    elif samples is None:  # the task's walks, labeled with their optimality
        samples = [task.walk_text(w) for w in task.walks]
        rewards = [task.walk_optimality(w) for w in task.walks]
    dataset = ILQLDataset.build(samples, rewards, tok, rcfg.model.seq_length, ic.reward_normalization)
    rd = RunDirectory(run_dir)
    rd.write_config(ctx.config_yaml)

    def evaluate_fn(engine, step):
        gpt, gen = engine.module, rcfg.generation
        common = dict(seed=rcfg.trainer.seed + step, temperature=gen.temperature, top_k=ic.gen_top_k,
                      max_new_tokens=gen.max_new_tokens)
        metrics = evaluate_randomwalks(gpt, task, tok, rcfg.task.eval_samples_per_start,
                                       logits_processor=ilql_logits_processor(gpt, ic.beta), **common)
        metrics.update(evaluate_randomwalks(gpt, task, tok, rcfg.task.eval_samples_per_start, suffix="_beta0",
                                            logits_processor=ilql_logits_processor(gpt, 0.0), **common))
        metrics["beta"] = ic.beta
        return metrics

    module = ILQLModule(rcfg, dataset, tok.vocab_size, rd, evaluate_fn, ctx.dp_rank, ctx.dp_size,
                        config_yaml=ctx.config_yaml)
    resume_from = _resume_path(rcfg, rd.checkpoint_dir)
    if resume_from is not None:
        _resume(module, module.engine, resume_from, rd)
    elif rcfg.model.path:
        load_weights(rcfg.model.path, module.engine.chunks, skip_prefixes=("ilql_heads.",))
        module.engine.optimizer.reload_model_params()
    _fit(module, ctx, rcfg, rd)
    summary = _finish(module, rd, ctx, rcfg, t_start, {"num_samples": len(dataset)})
    ctx.module = module
    return summary


def initialize_model_parallel_again(ctx: _Context) -> None:
    """Fresh megatron parallel state and seeds before building the next stage's models."""
    from nemo_rlhf.parallel import initialize_model_parallel

    initialize_model_parallel(ctx.rcfg.parallel, seed=ctx.rcfg.trainer.seed)


def run(cfg: DictConfig | RunConfig, run_dir: str | os.PathLike, reward_fn=None, prompts=None,
        eval_prompts=None, samples=None, rewards=None, return_context: bool = False):
    """Run one job described by ``cfg`` into ``run_dir``; returns the summary (also in
    summary.json), and the context holding the trained module when ``return_context``."""
    from nemo_rlhf import fault

    # SIGTERM / SIGUSR1 from here on (start-up included) stop at the next step boundary with a
    # checkpoint; the caller's own handlers are back afterwards (nemo_rlhf.train from Python).
    with fault.stop_at_step_boundary():
        return _run(cfg, run_dir, reward_fn, prompts, eval_prompts, samples, rewards, return_context)


def _run(cfg, run_dir, reward_fn, prompts, eval_prompts, samples, rewards, return_context):
    from nemo_rlhf.interop.formats import resolve_run_config

    rcfg = resolve_run_config(to_run_config(cfg))   # architecture from an HF / .nemo model.path
    set_verbosity(os.environ.get("NEMO_RLHF_VERBOSITY", rcfg.verbosity))
    ctx = _Context(rcfg, Path(run_dir))
    if rcfg.algorithm.name == "ppo":
        summary = run_ppo(ctx, rcfg, ctx.run_dir, reward_fn, prompts, eval_prompts)
    elif rcfg.algorithm.name == "ilql":
        summary = run_ilql(ctx, rcfg, ctx.run_dir, samples, rewards)
    elif rcfg.algorithm.name in ("dpo", "kto"):
        summary = run_dpo(ctx, rcfg, ctx.run_dir)
    elif rcfg.algorithm.name == "rm":
        summary = run_rm(ctx, rcfg, ctx.run_dir)
    else:
        if reward_fn is not None or prompts is not None:
            raise ConfigError("reward_fn / prompts are PPO inputs: set algorithm.name=ppo")
        summary = run_sft(ctx, rcfg, ctx.run_dir, samples)
    _print_summary(summary, ctx.run_dir, ctx.env.rank)
    return (summary, ctx) if return_context else summary


def _print_summary(summary: Dict[str, Any], run_dir: Path, rank: int) -> None:
    if rank != 0:
        return
    init, fin = summary["initial"], summary["final"]
    keys = [k for k in ("optimality", "valid_rate", "optimality_greedy", "valid_rate_greedy",
                        "optimality_beta0", "valid_rate_beta0", "behaviour_optimality", "accuracy",
                        "reward_margin") if k in fin]
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
    from nemo_rlhf.data.ilql import DataError
    from nemo_rlhf.rewards import RewardFunctionError

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, CheckpointError, RewardFunctionError, DataError) as e:
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    finally:
        destroy()


def main() -> None:
    _hydra_main()



class _CallableModule(types.ModuleType):
    """``nemo_rlhf.train`` is both this module (``python -m nemo_rlhf.train``) and the trlX-style
    function ``nemo_rlhf.train(...)``: importing the submodule rebinds the package attribute to
    it, so the module itself forwards calls to :func:`nemo_rlhf.api.train`."""

    def __call__(self, *args, **kwargs):
        from nemo_rlhf.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    main()
