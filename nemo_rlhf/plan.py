"""Layout check and memory plan of a run, before anyone waits in a Slurm queue:

    python -m nemo_rlhf.plan --config-name ppo_20b trainer.num_nodes=4
    python -m nemo_rlhf.plan --config-name dpo_70b --gpu-memory-gb 141 trainer.num_nodes=8

Composes the same Hydra config as ``nemo_rlhf.train`` (same conf/ directory, schema and
overrides), checks the layout (the schema's checks, world size = trainer.num_nodes x GPUs per node
divisible by TP x PP, batch arithmetic per data-parallel rank), and prints the estimated memory per
GPU with the largest term first (the math: :mod:`nemo_rlhf.planning.memory`). When it does not fit,
it tries one knob at a time (TP, PP, sequence parallel, distributed optimizer, recompute, micro
batch, nodes, critic/reference placement) and prints what each saves and a combination that fits.

Exit status: 0 fits, 1 does not fit, 2 invalid config or layout.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from nemo_rlhf.config import CONF_DIR, ConfigError, RunConfig
from nemo_rlhf.planning.memory import GIB, MemoryEstimate, estimate_memory, layout_of, param_count, with_overrides
from nemo_rlhf.recipes.registry import check_renamed, register_configs, to_run_config

DEFAULT_GPUS_PER_NODE = 8


@dataclass
class PlanOptions:
    gpu_memory_gb: float = 80.0
    gpus_per_node: Optional[int] = None
    """Used when trainer.devices is null (the launcher decides at run time); None = 8 for bf16/fp16
    (GPU) recipes, 1 for fp32 ones (the CPU recipes run as one process)."""
    overhead_gb: float = 4.0
    fused_kernels: Optional[bool] = None
    vocab_size: Optional[int] = None


def compose(config_name: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The validated RunConfig ``python -m nemo_rlhf.train --config-name NAME overrides...`` would run."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    check_renamed(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return to_run_config(cfg)


def devices_per_node(cfg: RunConfig, gpus_per_node: Optional[int]) -> int:
    if cfg.trainer.devices:
        return cfg.trainer.devices
    if gpus_per_node:
        return gpus_per_node
    return 1 if cfg.model.precision == "fp32" else DEFAULT_GPUS_PER_NODE


def world_size(cfg: RunConfig, gpus_per_node: Optional[int]) -> int:
    return cfg.trainer.num_nodes * devices_per_node(cfg, gpus_per_node)


def check_layout(cfg: RunConfig, world: int, gpn: int = DEFAULT_GPUS_PER_NODE) -> List[str]:
    """Raise ConfigError naming the key for an impossible layout or batch split; return warnings."""
    from nemo_rlhf.parallel.distributed import validate_layout

    dp = validate_layout(cfg.parallel, world)
    t, warnings = cfg.trainer, []
    if cfg.algorithm.name == "ppo":
        ppo = cfg.ppo
        if ppo.num_rollouts % dp:
            raise ConfigError(f"ppo.num_rollouts={ppo.num_rollouts} is not divisible by the data-parallel size {dp}")
        per_rank = ppo.num_rollouts // ppo.num_minibatches // dp
        if per_rank == 0 or (ppo.num_rollouts // ppo.num_minibatches) % dp:
            raise ConfigError(f"ppo.num_rollouts / ppo.num_minibatches = {ppo.num_rollouts // ppo.num_minibatches} "
                              f"samples per minibatch do not split over the data-parallel size {dp}")
        mbs = min(t.micro_batch_size, per_rank)
        if per_rank % mbs:
            raise ConfigError(f"per-rank PPO minibatch of {per_rank} samples is not divisible by "
                              f"trainer.micro_batch_size={t.micro_batch_size}")
    elif t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
                          f"trainer.micro_batch_size * data-parallel size = {t.micro_batch_size} * {dp}")
    if cfg.parallel.virtual_pipeline_model_parallel_size:
        from nemo_rlhf.modules.engine import check_interleaved_microbatches

        check_interleaved_microbatches(layout_of(cfg, world).num_micro, cfg.parallel.pipeline_model_parallel_size)
    if cfg.parallel.tensor_model_parallel_size > gpn:
        warnings.append(f"parallel.tensor_model_parallel_size={cfg.parallel.tensor_model_parallel_size} spans nodes "
                        f"({gpn} GPUs per node): TP all-reduces then cross the network")
    if cfg.model.precision == "fp32" and world > 1 and cfg.model.num_layers * cfg.model.hidden_size > 10 ** 5:
        warnings.append("model.precision=fp32 at scale: bf16 halves weights and activations")
    return warnings


def vocab_size_of(cfg: RunConfig, opts: PlanOptions) -> Tuple[int, str]:
    if opts.vocab_size:
        return opts.vocab_size, "--vocab-size"
    if cfg.model.vocab_size:
        return cfg.model.vocab_size, "model.vocab_size"
    from nemo_rlhf.data.tokenizers import tokenizer_for
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    tc = cfg.task
    task = RandomWalks(tc.num_nodes, tc.edge_prob, tc.max_length, min(tc.num_walks, 10), tc.seed)
    try:
        return tokenizer_for(cfg.model.path, task.vocab).vocab_size, "tokenizer"
    except Exception:  # model.path not reachable from here: the task's tokenizer
        return tokenizer_for(None, task.vocab).vocab_size, "task tokenizer"


def plan(cfg: RunConfig, opts: PlanOptions, vocab: int) -> Tuple[MemoryEstimate, List[str]]:
    world = world_size(cfg, opts.gpus_per_node)
    warnings = check_layout(cfg, world, devices_per_node(cfg, opts.gpus_per_node))
    est = estimate_memory(cfg, world, vocab, opts.gpu_memory_gb, opts.overhead_gb, opts.fused_kernels)
    return est, warnings


# ----------------------------------------------------------------------------------------- knobs

def candidate_knobs(cfg: RunConfig, opts: PlanOptions) -> List[Tuple[str, RunConfig]]:
    """Single changes that can lower memory per GPU: (override, config), each re-validated."""
    par, m, t = cfg.parallel, cfg.model, cfg.trainer
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    gpn = devices_per_node(cfg, opts.gpus_per_node)
    algo = cfg.algorithm.name
    out: List[Tuple[str, dict]] = []
    new_tp = tp * 2
    while new_tp <= gpn:   # TP stays inside a node
        changes = {"tensor_model_parallel_size": new_tp}
        label = f"parallel.tensor_model_parallel_size={new_tp}"
        if par.sequence_parallel or (m.arch == "gpt" and algo != "ilql"):
            changes["sequence_parallel"] = True
            label += " parallel.sequence_parallel=true"
        out.append((label, {"parallel": changes}))
        new_tp *= 2
    if tp > 1 and not par.sequence_parallel and m.arch == "gpt" and algo != "ilql":
        out.append(("parallel.sequence_parallel=true", {"parallel": {"sequence_parallel": True}}))
    if algo not in ("ppo", "ilql") and m.arch == "gpt":
        out.append((f"parallel.pipeline_model_parallel_size={pp * 2}",
                    {"parallel": {"pipeline_model_parallel_size": pp * 2}}))
    if not par.use_distributed_optimizer:
        out.append(("parallel.use_distributed_optimizer=true", {"parallel": {"use_distributed_optimizer": True}}))
    if m.recompute_granularity is None:
        out.append(("model.recompute_granularity=selective", {"model": {"recompute_granularity": "selective"}}))
    if m.recompute_granularity != "full":
        out.append(("model.recompute_granularity=full", {"model": {"recompute_granularity": "full"}}))
    if m.arch == "gpt" and not m.logits_chunk_tokens:
        out.append(("model.logits_chunk_tokens=4096", {"model": {"logits_chunk_tokens": 4096}}))
    if t.micro_batch_size > 1:
        out.append((f"trainer.micro_batch_size={t.micro_batch_size // 2}",
                    {"trainer": {"micro_batch_size": t.micro_batch_size // 2}}))
    out.append((f"trainer.num_nodes={t.num_nodes * 2}", {"trainer": {"num_nodes": t.num_nodes * 2}}))
    if algo == "ppo" and cfg.ppo.num_rollouts // 2 >= cfg.ppo.num_minibatches:
        out.append((f"ppo.num_rollouts={cfg.ppo.num_rollouts // 2}", {"ppo": {"num_rollouts": cfg.ppo.num_rollouts // 2}}))
    if algo == "ppo" and cfg.ppo.critic == "separate":
        out.append(("ppo.critic=value_head", {"ppo": {"critic": "value_head"}}))
    if algo == "dpo" and cfg.dpo.reference == "model":
        out.append(("dpo.reference=precomputed", {"dpo": {"reference": "precomputed"}}))
    if algo == "kto" and cfg.kto.reference == "model":
        out.append(("kto.reference=precomputed", {"kto": {"reference": "precomputed"}}))
    valid = []
    for label, changes in out:
        try:
            new = with_overrides(cfg, **changes)
            check_layout(new, world_size(new, opts.gpus_per_node), gpn)
        except ConfigError:
            continue
        valid.append((label, new))
    return valid


def knob_effects(cfg: RunConfig, opts: PlanOptions, vocab: int) -> List[Tuple[str, float]]:
    """(override, total GiB) of each single knob that lowers the total, best first."""
    base = plan(cfg, opts, vocab)[0].total_bytes
    effects = []
    for label, new in candidate_knobs(cfg, opts):
        total = plan(new, opts, vocab)[0].total_bytes
        if total < base * 0.995:
            effects.append((label, total / GIB))
    return sorted(effects, key=lambda e: e[1])


def fitting_combination(cfg: RunConfig, opts: PlanOptions, vocab: int, max_knobs: int = 6) -> Optional[List[str]]:
    """Greedy: turn the knob that saves the most until it fits; None if it never does."""
    chosen: List[str] = []
    for _ in range(max_knobs):
        est = plan(cfg, opts, vocab)[0]
        if est.fits:
            return _merge_overrides(chosen)
        best = None
        for label, new in candidate_knobs(cfg, opts):
            total = plan(new, opts, vocab)[0].total_bytes
            if total < est.total_bytes * 0.995 and (best is None or total < best[0]):
                best = (total, label, new)
        if best is None:
            return None
        chosen.append(best[1])
        cfg = best[2]
    return _merge_overrides(chosen) if plan(cfg, opts, vocab)[0].fits else None


def _merge_overrides(labels: List[str]) -> List[str]:
    """'a=1 b=2', 'a=4' -> ['a=4', 'b=2'] (the last value of each key, in first-seen order)."""
    merged = {}
    for label in labels:
        for item in label.split():
            key, value = item.split("=", 1)
            merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


# ------------------------------------------------------------------------------------------ report

def _gib(b: float) -> str:
    return f"{b / GIB:8.2f} GiB" if b >= GIB / 100 else f"{b / 2 ** 20:8.2f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def report(name: str, cfg: RunConfig, est: MemoryEstimate, warnings: List[str], vocab_source: str,
           opts: PlanOptions) -> str:
    m, lay, par = cfg.model, est.layout, cfg.parallel
    pc = est.params
    full = param_count(m, est.vocab_size)
    lines = [f"nemo_rlhf.plan: {name} (algorithm={cfg.algorithm.name}, {m.arch} {m.num_layers} layers x "
             f"{m.hidden_size}, {m.num_attention_heads} heads, seq {m.seq_length}, {m.precision}, "
             f"vocab {est.vocab_size} from {vocab_source})"]
    per_node = devices_per_node(cfg, opts.gpus_per_node)
    lines.append(f"layout: {lay.world_size} GPUs = trainer.num_nodes {cfg.trainer.num_nodes} x {per_node} per node; "
                 f"TP={lay.tp} PP={lay.pp} VPP={par.virtual_pipeline_model_parallel_size or '-'} DP={lay.dp}; "
                 f"sequence_parallel={str(par.sequence_parallel).lower()}, "
                 f"use_distributed_optimizer={str(par.use_distributed_optimizer).lower()}, "
                 f"recompute={m.recompute_granularity or 'none'}")
    t = cfg.trainer
    if cfg.algorithm.name == "ppo":
        mb = cfg.ppo.num_rollouts // cfg.ppo.num_minibatches
        lines.append(f"batch: {cfg.ppo.num_rollouts} rollouts per iteration ({cfg.ppo.num_rollouts // lay.dp} per DP "
                     f"rank, generated at once); {cfg.ppo.num_minibatches} minibatches of {mb} ({mb // lay.dp} per DP "
                     f"rank = {lay.num_micro} micro-batch(es) of {min(t.micro_batch_size, mb // lay.dp)})")
    else:
        lines.append(f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x {lay.num_micro} "
                     f"micro-batch(es) x DP {lay.dp}" + (f" ({lay.rows_per_micro} sequences per micro-batch)"
                                                        if lay.rows_per_micro != t.micro_batch_size else ""))
    lines.append(f"parameters: {_count(full.total)} in the model, {_count(pc.rank_max)} on the fullest GPU")
    lines.append("memory per GPU, largest first:")
    for term in est.sorted_terms():
        phase = "" if term.phase == "static" else f" [{term.phase} phase]"
        lines.append(f"  {term.name:<30}{_gib(term.bytes)}  {term.note}{phase}")
    lines.append(f"  {'runtime overhead':<30}{_gib(est.overhead_bytes)}  CUDA context, NCCL buffers, "
                 f"fragmentation (--overhead-gb)")
    phases = est.phase_bytes()
    peak = est.peak_phase
    lines.append(f"total: {est.total_bytes / GIB:.2f} GiB of {opts.gpu_memory_gb:g} GiB per GPU "
                 f"(static {est.static_bytes / GIB:.2f}" + (f" + peak phase '{peak}' {phases[peak] / GIB:.2f}" if peak else "")
                 + f" + overhead {est.overhead_bytes / GIB:.2f} GiB)")
    for w in warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_rlhf.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", "-cn", default="sft_tiny", help="top-level config in conf/ (as nemo_rlhf.train)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node when trainer.devices is null (default 8 for bf16/fp16 recipes, "
                             "1 for the fp32 CPU recipes)")
    parser.add_argument("--overhead-gb", type=float, default=4.0,
                        help="CUDA context + NCCL buffers + allocator fragmentation per GPU (default 4)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary before padding (default: model.vocab_size, else the tokenizer's)")
    parser.add_argument("--fused-kernels", choices=("auto", "yes", "no"), default="auto",
                        help="Transformer Engine kernels: flash attention (no s^2 probabilities), fused "
                             "norms and SwiGLU (auto: transformer_impl=transformer_engine, or auto with bf16/fp16)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for nemo_rlhf.train")
    args = parser.parse_args(argv)
    opts = PlanOptions(gpu_memory_gb=args.gpu_memory_gb, gpus_per_node=args.gpus_per_node,
                       overhead_gb=args.overhead_gb, vocab_size=args.vocab_size,
                       fused_kernels={"auto": None, "yes": True, "no": False}[args.fused_kernels])
    from hydra.errors import HydraException

    try:
        cfg = compose(args.config_name, args.overrides)
        vocab, source = vocab_size_of(cfg, opts)
        est, warnings = plan(cfg, opts, vocab)
    except (ConfigError, HydraException) as e:
        cause = e.__cause__ if isinstance(e, HydraException) and e.__cause__ else e
        print(f"nemo_rlhf.plan: invalid config or layout: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 2
    print(report(args.config_name, cfg, est, warnings, source, opts))
    if est.fits:
        print(f"fits: {est.total_bytes / GIB:.1f} GiB <= {opts.gpu_memory_gb:g} GiB per GPU")
        return 0
    print(f"does not fit: {est.total_bytes / GIB:.1f} GiB > {opts.gpu_memory_gb:g} GiB per GPU")
    effects = knob_effects(cfg, opts, vocab)
    if effects:
        print("knobs, one at a time (total per GPU after the change):")
        for label, total in effects:
            mark = "  fits" if total <= opts.gpu_memory_gb else ""
            print(f"  {label:<70}{total:8.1f} GiB{mark}")
    combo = fitting_combination(cfg, opts, vocab)
    if combo:
        print("to fit, turn: " + " ".join(combo))
    else:
        print("no combination of these knobs fits: use more or larger GPUs, or a smaller model / sequence")
    return 1


if __name__ == "__main__":
    sys.exit(main())
