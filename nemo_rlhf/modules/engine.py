"""Megatron training engine shared by the LightningModules: model chunks in megatron DDP, the
megatron optimizer and LR scheduler, and one optimizer step over a DP-local batch using
megatron's forward/backward schedule (no pipelining, 1F1B, or interleaved 1F1B by layout)."""
from __future__ import annotations

import math

from functools import partial
from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist

from nemo_rlhf.config.schema import ModelConfig, OptimConfig, ParallelConfig
from nemo_rlhf.errors import ConfigError
from nemo_rlhf.models.gpt import build_gpt_chunks, gpt_forward, unwrap, wrap_ddp
from nemo_rlhf.models.heads import DecoderStates
from nemo_rlhf.modules.forward_only import gpt_layout, packed_attention
from nemo_rlhf.modules.packing import counting_positions, pack_rows, spans
from nemo_rlhf.models.t5 import CausalLayout, build_t5_chunks, is_t5, t5_causal_forward

# model.arch -> builder(model, parallel, vocab_size) -> chunks owned by this rank
BUILDERS = {"gpt": build_gpt_chunks, "t5": build_t5_chunks}


def build_chunks(model: ModelConfig, parallel: ParallelConfig, vocab_size: int) -> List[torch.nn.Module]:
    return BUILDERS[model.arch](model, parallel, vocab_size)

# forward_step(batch, model) -> (output_tensor, loss_func); loss_func(output) -> (loss_sum, num_tokens, stats)
ForwardStep = Callable[[Dict[str, torch.Tensor], torch.nn.Module], Tuple[torch.Tensor, Callable]]


def build_optimizer(optim: OptimConfig, parallel: ParallelConfig, model: ModelConfig, chunks, max_steps: int):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[model.precision]
    config = OptimizerConfig(
        optimizer=optim.name, lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=model.precision == "bf16", fp16=model.precision == "fp16",
        params_dtype=dtype, use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    decay_steps = max(1, max_steps - optim.warmup_steps) if optim.scheduler == "cosine" else max(1, max_steps)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr,
        min_lr=optim.min_lr if optim.scheduler == "cosine" else optim.lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=decay_steps + optim.warmup_steps,
        lr_decay_style="cosine" if optim.scheduler == "cosine" else "constant",
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(1, max_steps),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


class MegatronEngine:
    """Owns the model chunks (megatron DDP), optimizer and scheduler of one policy."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, optim: OptimConfig, vocab_size: int,
                 max_steps: int, setup: Callable[[torch.nn.Module], object] | None = None):
        """``setup(model)`` runs on each model chunk (GPTModel, or T5Model with model.arch=t5)
        before DDP wrapping (e.g. to attach a head)."""
        self.model_cfg, self.parallel = model, parallel
        self.trim_padding = True
        """Cut each batch's padded tail before the forward (:func:`trim_right_padding`); False
        keeps the full model.seq_length width (the same losses, more compute)."""
        chunks = build_chunks(model, parallel, vocab_size)
        for chunk in chunks:
            if setup is not None:
                setup(chunk)
        self.chunks: List[torch.nn.Module] = wrap_ddp(chunks, parallel)
        self.optimizer, self.scheduler = build_optimizer(optim, parallel, model, self.chunks, max_steps)

    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped first chunk (the whole GPTModel when PP=1)."""
        return unwrap(self.chunks[0])

    @property
    def stages(self) -> List[torch.nn.Module]:
        """This rank's unwrapped chunks in pipeline order (one, or one per virtual stage): what
        generation and the forward-only passes across stages take; heads sit on ``stages[-1]``."""
        return [unwrap(c) for c in self.chunks]

    def train_step(self, batch: Dict[str, torch.Tensor], micro_batch_size: int,
                   forward_step: ForwardStep) -> Dict[str, float]:
        """Forward/backward over ``batch`` (the DP-local part of one global batch) and one
        optimizer step. Returns the global-batch stats, identical on all ranks: ``loss`` (sum /
        tokens over the global batch), ``grad_norm``, ``lr``, and the per-token means of any
        extra stats the loss function reports."""
        stats = self.forward_backward(batch, micro_batch_size, forward_step)
        stats.update(self.optimizer_step())
        return stats

    def forward_backward(self, batch: Dict[str, torch.Tensor], micro_batch_size: int,
                         forward_step: ForwardStep, forward_only: bool = False) -> Dict[str, float]:
        """Run megatron's schedule over ``batch`` split into micro-batches. Afterwards each
        parameter's ``main_grad`` holds d(global loss)/d(param), reduced over DP (and over TP for
        sequence-parallel norms, over first/last stage for tied embeddings)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self.trim_padding and self.model_cfg.arch == "gpt":
            batch = trim_right_padding(batch, self._pad_multiple())
        n = next(iter(batch.values())).shape[0]
        if n % micro_batch_size:
            raise ValueError(f"DP-local batch of {n} is not divisible by micro_batch_size={micro_batch_size}")
        num_micro = n // micro_batch_size
        micro = [{k: v[i * micro_batch_size:(i + 1) * micro_batch_size] for k, v in batch.items()}
                 for i in range(num_micro)]
        first = next(v for v in micro[0].values() if v.dim() >= 2)
        seq_length, schedule_mbs = first.shape[-1], micro_batch_size
        if len(self.chunks) > 1:
            # Interleaved schedule: fixed activation shapes [seq, rows, hidden] (see
            # transformer_config); rows = sequences one micro-batch feeds the model (DPO: 2 per pair).
            schedule_mbs = first.numel() // seq_length
            check_interleaved_microbatches(num_micro, self.parallel.pipeline_model_parallel_size)
        for chunk in self.chunks:
            chunk.train(not forward_only)
            if not forward_only:
                chunk.zero_grad_buffer()
        if not forward_only:
            self.optimizer.zero_grad()

        def step_fn(data_iterator, model):
            return forward_step(next(data_iterator), model)

        iters = [iter(micro) for _ in self.chunks]
        with torch.no_grad() if forward_only else torch.enable_grad(), counting_positions() as packed:
            outputs = get_forward_backward_func()(
                forward_step_func=step_fn,
                data_iterator=iters if len(self.chunks) > 1 else iters[0],
                model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                num_microbatches=num_micro, seq_length=seq_length, micro_batch_size=schedule_mbs,
                forward_only=forward_only,
            )
        # positions computed: the micro-batches' (trimmed) rows, or the packed rows where the forward packed
        return self._reduce_stats(outputs, positions=packed[0] or first.numel() * num_micro)

    def optimizer_step(self) -> Dict[str, float]:
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": float(self.optimizer.param_groups[0]["lr"]),
                "update_skipped": float(not ok)}

    def _pad_multiple(self) -> int:
        """Trimmed sequence lengths are multiples of 8 on GPUs (tensor-core friendly; any length on
        the CPU), and of TP with sequence parallel (the sequence is split over the TP ranks)."""
        base = 8 if torch.cuda.is_available() else 1
        tp = self.parallel.tensor_model_parallel_size if self.parallel.sequence_parallel else 1
        return base * tp // math.gcd(base, tp)

    @staticmethod
    def _reduce_stats(outputs: List[Dict[str, torch.Tensor]], positions: int) -> Dict[str, float]:
        """Loss functions report {"loss": [sum, tokens], name: [sum, tokens], ...} per
        micro-batch on the last pipeline stage. Sum over micro-batches and DP ranks, then
        broadcast from the last stage so every rank returns the same numbers. ``positions`` (the
        token positions this rank's step computed) rides along in the same reduction and comes
        back summed over DP as ``model_tokens`` (throughput logs)."""
        from megatron.core import parallel_state as ps

        keys = sorted(outputs[0].keys()) if outputs else []
        keys = ps_broadcast_keys(keys)
        totals = torch.zeros(len(keys) + 1, 2, dtype=torch.float64)
        for out in outputs:
            for i, k in enumerate(keys):
                totals[i] += out[k].detach().to(torch.float64).view(2)
        totals[-1, 0] = float(positions)
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(totals, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(totals, src=last, group=ps.get_pipeline_model_parallel_group())
        result = {k: float(totals[i, 0] / max(totals[i, 1], 1.0)) for i, k in enumerate(keys)}
        result["model_tokens"] = float(totals[-1, 0])
        if "loss" in keys:
            result["num_tokens"] = float(totals[keys.index("loss"), 1])
        return result


def trim_right_padding(batch: Dict[str, torch.Tensor], multiple: int = 8) -> Dict[str, torch.Tensor]:
    """``batch`` with its [..., S] tensors (those shaped like ``loss_mask``) cut one position after
    the last one any row's loss reads, rounded up to ``multiple`` (at most S): no compute on a padded
    tail (the batches are padded to model.seq_length; a causal model's real tokens never attend to
    the right padding, so the losses are those of the full width). Every rank that shares this
    batch (its TP group and pipeline) cuts it the same way."""
    mask = batch.get("loss_mask")
    if mask is None or mask.dim() < 2:
        return batch
    width = mask.shape[-1]
    used = mask.reshape(-1, width).ne(0).any(0).nonzero()
    keep = int(used.max()) + 2 if used.numel() else 1    # + the state after the last action (ILQL's V(s'))
    keep = min(width, -(-keep // multiple) * multiple)
    if keep == width:
        return batch
    return {k: (v[..., :keep] if torch.is_tensor(v) and v.shape == mask.shape else v) for k, v in batch.items()}


def check_interleaved_microbatches(num_micro: int, pp: int) -> None:
    """Megatron's interleaved 1F1B runs micro-batches in groups of PP per model chunk; a step
    needs a whole number of groups."""
    if num_micro % pp:
        raise ConfigError(
            f"interleaved pipeline (parallel.virtual_pipeline_model_parallel_size) needs the micro-batches "
            f"per step and data-parallel rank ({num_micro}) to be a multiple of "
            f"parallel.pipeline_model_parallel_size={pp}: change trainer.global_batch_size or "
            f"trainer.micro_batch_size")


def ps_broadcast_keys(keys: List[str]) -> List[str]:
    """Stat names exist only on the last pipeline stage; share them with the other stages."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return keys
    box = [keys]
    last = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(box, src=last, group=ps.get_pipeline_model_parallel_group())
    return box[0]


def lm_forward_with_states(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None,
                           completion_mask: torch.Tensor, pad: torch.Tensor | None = None,
                           segments: torch.Tensor | None = None, pack: bool = False
                           ) -> Tuple[torch.Tensor | None, DecoderStates]:
    """The causal-LM call of every trainer: ``(nll, states)`` with the per-token NLL [B, S] of
    ``labels`` (None without labels) and the final hidden states that the heads read
    (models/heads.py: ``value_head_output(unwrap(model), states)``). GPT runs on ``tokens`` as is;
    T5 puts the prompt (the positions before ``completion_mask``'s first 1) into the encoder and
    the rest into the decoder, returning the NLL in the same causal layout and the states with the
    layout that maps the heads' outputs there too (see models/t5.py).

    ``pad`` [B]: rows start with that many left-padding tokens (ragged prompts, as generation
    takes them). They are treated exactly as generation treats them: GPT masks them out of
    attention and counts positions from each row's first real token; T5 gets each prompt without
    its padding (rows shifted left for the call, results shifted back). ``segments`` [B, S]: packed
    rows (GPT only), see :func:`nemo_rlhf.modules.forward_only.gpt_layout`. ``pack`` (GPT, data.packing):
    the rows are packed for the call (:mod:`nemo_rlhf.modules.packing`), each from its first real
    token to the last position ``completion_mask`` reads; the NLL comes back in the rows' layout (0
    outside those spans) and the heads' outputs too (the states' layout unpacks them)."""
    if pack and segments is None and not is_t5(model):
        return _packed_forward(model, tokens, labels, completion_mask, pad)
    if pad is not None and not bool((pad > 0).any()):
        pad = None
    if is_t5(model):
        if segments is not None:
            raise ValueError("packed rows (segment_ids) are a GPT path: T5 batches are not packed")
        if pad is None:
            return t5_causal_forward(model, tokens, labels, completion_mask)
        return _t5_left_padded_forward(model, tokens, labels, completion_mask, pad)
    attention_mask, position_ids = gpt_layout(tokens, pad, segments)
    nll, hidden = gpt_forward(unwrap(model), tokens, position_ids, attention_mask, labels=labels)
    return (nll if labels is not None else None), DecoderStates(hidden)


def lm_forward(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
               completion_mask: torch.Tensor, pad: torch.Tensor | None = None,
               segments: torch.Tensor | None = None, pack: bool = False) -> torch.Tensor:
    """Per-token NLL [B, S] of ``labels`` (arguments as :func:`lm_forward_with_states`)."""
    return lm_forward_with_states(model, tokens, labels, completion_mask, pad, segments, pack)[0]


def _packed_forward(model, tokens, labels, completion_mask, pad):
    """:func:`lm_forward_with_states` with ``pack``: the GPT runs on the packed rows; the NLL comes
    back in the batch's layout and the states carry the packing as their layout (heads unpack)."""
    gpt = unwrap(model)
    tp = gpt.config.tensor_model_parallel_size if gpt.config.sequence_parallel else 1
    multiple = (8 if tokens.is_cuda else 1) * tp      # GPU-friendly widths; SP splits the sequence over TP
    rows = pack_rows(tokens, labels, *spans(completion_mask, pad), multiple=multiple)
    attention_mask, position_ids = packed_attention(rows.segments)
    nll, hidden = gpt_forward(gpt, rows.tokens, position_ids, attention_mask, labels=rows.labels)
    if not gpt.post_process:   # a pipeline stage before the last: its output is the packed hidden states
        return nll, DecoderStates(hidden, rows)
    return (rows.unpack(nll) if labels is not None else None), DecoderStates(hidden, rows)


def shift_rows(x: torch.Tensor, shift: torch.Tensor, fill=0) -> torch.Tensor:
    """Row i of ``x`` [B, S, ...] moved ``shift[i]`` places to the right (left when negative);
    places that come from outside the row get ``fill``."""
    b, s = x.shape[:2]
    src = torch.arange(s, device=x.device)[None, :] - shift.to(x.device)[:, None]        # [B, S]
    inside = (src >= 0) & (src < s)
    idx = src.clamp(0, s - 1).view(b, s, *([1] * (x.dim() - 2))).expand_as(x)
    out = x.gather(1, idx)
    return torch.where(inside.view(b, s, *([1] * (x.dim() - 2))), out, torch.full_like(out, fill))


def _t5_left_padded_forward(model, tokens, labels, completion_mask, pad):
    """T5 on left-padded rows: shift each row left by its padding (the encoder then sees the prompt
    right-padded, as in generation/seq2seq.py), run, and shift the NLL and the heads' layout back."""
    back = -pad.to(tokens.device)
    nll, states = t5_causal_forward(model, shift_rows(tokens, back),
                                    None if labels is None else shift_rows(labels, back),
                                    shift_rows(completion_mask, back))
    layout = states.layout                    # decoder position -> causal index of the shifted rows
    states = DecoderStates(states.hidden, CausalLayout(layout.offset + pad.to(layout.offset.device), layout.seq_length))
    return (None if nll is None else shift_rows(nll, pad)), states


def lm_forward_step(batch: Dict[str, torch.Tensor], model: torch.nn.Module, loss_fn: Callable):
    """Megatron forward step for a causal LM whose loss needs the per-token NLL:
    returns the model output (per-token NLL on the last stage) and a loss closure."""
    output = lm_forward(model, batch["tokens"], batch["labels"], batch["loss_mask"],
                        segments=batch.get("segment_ids"))    # packed rows (data/sft.py)
    return output, partial(loss_fn, batch)
