"""Heads on the final hidden states of a stock megatron GPTModel or T5Model (its decoder), by
composition (no subclassing, no hooks).

``attach_value_head(model)`` registers ``model.value_head`` (a Linear(hidden, 1), replicated over TP
ranks); ``attach_ilql_heads(model)`` registers ``model.ilql_heads`` (Q, target-Q and V heads). They
are child modules of the megatron model, so megatron DDP, the optimizer and dist checkpointing
pick them up like any other parameter, under the keys ``value_head.*`` / ``ilql_heads.*``
(a plain SFT checkpoint loads into a model with heads by skipping those prefixes; the heads
start fresh).

Nothing is kept between calls: the forward that needs a head asks the model for its hidden
states explicitly (:func:`nemo_rlhf.models.gpt.gpt_forward`, :func:`nemo_rlhf.models.t5.t5_causal_forward`,
or :func:`nemo_rlhf.modules.engine.lm_forward_with_states` for both) and hands the returned
:class:`DecoderStates` to :func:`value_head_output` / :func:`ilql_heads_output`.

Why the heads hang off the GPTModel rather than a ``PolicyWithHeads(lm, heads)`` wrapper module:
the module megatron DDP wraps is what every consumer unwraps to a GPTModel/T5Model -- checkpoint
save/load (torch ``load_state_dict`` on the unwrapped chunk with the sharded keys), HF/NeMo
import/export, generation, evaluation. A wrapper would move every key under ``lm.`` and give
them a module that is not a megatron model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch


@dataclass
class DecoderStates:
    """The final hidden states of one forward, as the heads read them."""

    hidden: torch.Tensor
    """[S, B, H] the decoder block's output (after its final layernorm); sequence-sharded over TP
    ranks with sequence parallel"""
    layout: Optional[Any] = None
    """encoder-decoder training forwards (models/t5.py ``CausalLayout``): where the decoder positions
    sit in the causal [B, S] layout of the batch; None when positions are already causal (GPT, and
    T5 while decoding)"""

    def to_causal(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position head outputs [B, S', ...] -> the batch's causal layout (identity for GPT)."""
        return x if self.layout is None else self.layout.to_causal(x)


class ValueHead(torch.nn.Module):
    def __init__(self, hidden_size: int, init_std: float = 0.0):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=init_std) if init_std > 0 else torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).float().squeeze(-1)


def attach_value_head(model: torch.nn.Module, hidden_size: int) -> Optional[ValueHead]:
    """Register ``model.value_head`` on a GPTModel/T5Model (idempotent); returns the head. With
    pipeline stages only the chunk holding the output layer (the last stage) gets one: None elsewhere
    (the forward functions pass such a stage's hidden states on, see :func:`has_head`)."""
    if getattr(model, "value_head", None) is not None:
        return model.value_head
    if not model.post_process:
        return None
    head = ValueHead(hidden_size).to(model.config.params_dtype)   # (bf16 runs: as the trunk; outputs fp32)
    if torch.cuda.is_available():
        head.cuda(torch.cuda.current_device())
    model.value_head = head
    return head


def has_head(model: torch.nn.Module, name: str = "value_head") -> bool:
    """Whether this chunk carries head ``name`` (False on pipeline stages before the last)."""
    return getattr(model, name, None) is not None


def value_head_output(model: torch.nn.Module, states: DecoderStates) -> torch.Tensor:
    """Values [B, S] (causal layout) of ``model.value_head`` on the hidden states of one forward."""
    from megatron.core import tensor_parallel

    hidden = states.hidden
    if model.config.sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return states.to_causal(model.value_head(hidden).transpose(0, 1).contiguous())


class ILQLHeads(torch.nn.Module):
    """Q heads (one or two) with frozen target copies, and a V head, on the decoder's hidden states.

    Q heads are megatron ColumnParallelLinear layers sized to the padded vocabulary like the LM
    head (weights sharded over TP ranks, output gathered); V is a Linear(hidden, 1)."""

    def __init__(self, config, hidden_size: int, vocab_size: int, two_qs: bool = True):
        super().__init__()
        from megatron.core import tensor_parallel

        def q_head():
            return tensor_parallel.ColumnParallelLinear(
                hidden_size, vocab_size, config=config, init_method=config.init_method, bias=True,
                gather_output=True, skip_bias_add=False)

        self.two_qs = two_qs
        self.q_heads = torch.nn.ModuleList([q_head() for _ in range(2 if two_qs else 1)])
        self.target_q_heads = torch.nn.ModuleList([q_head() for _ in range(2 if two_qs else 1)])
        for target, q in zip(self.target_q_heads, self.q_heads):
            target.load_state_dict(q.state_dict())
            for p in target.parameters():
                p.requires_grad_(False)
        self.v_head = torch.nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor):
        """hidden [S, B, H] -> (qs, target_qs, v): lists of [B, S, V] and [B, S]."""
        qs = [q(hidden)[0].float().transpose(0, 1) for q in self.q_heads]
        with torch.no_grad():
            target_qs = [q(hidden)[0].float().transpose(0, 1) for q in self.target_q_heads]
        v = self.v_head(hidden.to(self.v_head.weight.dtype)).float().squeeze(-1).transpose(0, 1)
        return qs, target_qs, v


def attach_ilql_heads(model: torch.nn.Module, two_qs: bool = True, seed: Optional[int] = None) -> Optional[ILQLHeads]:
    """Register ``model.ilql_heads`` on a GPTModel/T5Model (idempotent); returns the heads. With
    pipeline stages only the last stage's chunk gets them (None elsewhere), as the value head.

    ``seed``: draw the heads' initial weights from a generator seeded with it (the default one's
    state is left as it was), so that they do not depend on how much of the random stream the
    trunk's layers on this stage used: with CPU initialisation (megatron's full weights drawn, then
    split over TP) every layout -- PP, VPP, TP -- starts from the same heads. Without it they come
    from the current stream."""
    if getattr(model, "ilql_heads", None) is not None:
        return model.ilql_heads
    if not model.post_process:
        return None
    if model.config.sequence_parallel:
        raise NotImplementedError("ILQL heads do not support sequence_parallel yet")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        heads = ILQLHeads(model.config, model.config.hidden_size, model.vocab_size, two_qs=two_qs)
    heads.to(model.config.params_dtype)   # bf16 runs: all parameters in one dtype, as megatron's optimizer expects
    if torch.cuda.is_available():
        heads.cuda(torch.cuda.current_device())
    model.ilql_heads = heads
    return heads


def ilql_heads_output(model: torch.nn.Module, states: DecoderStates
                      ) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """(qs, target_qs, v) of ``model.ilql_heads`` on the hidden states of one forward, in the
    causal layout: lists of [B, S, V] and [B, S]."""
    qs, target_qs, v = model.ilql_heads(states.hidden)
    return [states.to_causal(q) for q in qs], [states.to_causal(q) for q in target_qs], states.to_causal(v)
