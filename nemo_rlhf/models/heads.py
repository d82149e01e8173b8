"""Heads attached to a stock megatron GPTModel (or T5Model: its ``decoder`` is hooked the same way)
by composition (no subclassing).

``attach_value_head(gpt)`` registers ``gpt.value_head`` (a Linear(hidden, 1), replicated over
TP ranks) and a forward hook on ``gpt.decoder`` that keeps the decoder's output (after the final
layernorm). After any forward of ``gpt``, :func:`value_head_output` maps those hidden states to
values ``[B, S]``. Because the head is a child of the GPTModel, megatron DDP, the optimizer and
dist checkpointing pick it up like any other parameter.
"""
from __future__ import annotations

import torch


class ValueHead(torch.nn.Module):
    def __init__(self, hidden_size: int, init_std: float = 0.0):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=init_std) if init_std > 0 else torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self._hidden = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def _capture(module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    module._nemo_rlhf_value_head._hidden = hidden


def attach_value_head(gpt: torch.nn.Module, hidden_size: int) -> ValueHead:
    if getattr(gpt, "value_head", None) is not None:
        return gpt.value_head
    if not gpt.post_process:
        raise NotImplementedError("value heads need the last pipeline stage (pipeline_model_parallel_size=1)")
    head = ValueHead(hidden_size)
    if torch.cuda.is_available():
        head.cuda(torch.cuda.current_device())
    gpt.value_head = head
    object.__setattr__(gpt.decoder, "_nemo_rlhf_value_head", head)  # plain ref, not a submodule
    gpt.decoder.register_forward_hook(_capture)
    return head


def value_head_output(gpt: torch.nn.Module) -> torch.Tensor:
    """Values [B, S] from the hidden states of ``gpt``'s last forward."""
    from megatron.core import tensor_parallel

    head = gpt.value_head
    hidden = head._hidden  # [S, B, H] (sequence-sharded with sequence parallel)
    if hidden is None:
        raise RuntimeError("value_head_output called before a forward of the model")
    head._hidden = None
    if gpt.config.sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return _to_causal(gpt, head(hidden).transpose(0, 1).contiguous())


def _to_causal(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Encoder-decoder models (models/t5.py) leave ``causal_layout`` after a training forward:
    decoder positions -> the causal [B, S] layout of the batch. Identity for GPT."""
    layout = getattr(model, "causal_layout", None)
    return x if layout is None else layout.to_causal(x)


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
        self._hidden = None

    def forward(self, hidden: torch.Tensor):
        """hidden [S, B, H] -> (qs, target_qs, v): lists of [B, S, V] and [B, S]."""
        qs = [q(hidden)[0].transpose(0, 1) for q in self.q_heads]
        with torch.no_grad():
            target_qs = [q(hidden)[0].transpose(0, 1) for q in self.target_q_heads]
        v = self.v_head(hidden.float()).squeeze(-1).transpose(0, 1)
        return qs, target_qs, v


def _capture_ilql(module, args, output):
    module._nemo_rlhf_ilql_heads._hidden = output[0] if isinstance(output, tuple) else output


def attach_ilql_heads(gpt: torch.nn.Module, two_qs: bool = True) -> ILQLHeads:
    if getattr(gpt, "ilql_heads", None) is not None:
        return gpt.ilql_heads
    if not gpt.post_process:
        raise NotImplementedError("ILQL heads need the last pipeline stage (pipeline_model_parallel_size=1)")
    if gpt.config.sequence_parallel:
        raise NotImplementedError("ILQL heads do not support sequence_parallel yet")
    heads = ILQLHeads(gpt.config, gpt.config.hidden_size, gpt.vocab_size, two_qs=two_qs)
    if torch.cuda.is_available():
        heads.cuda(torch.cuda.current_device())
    gpt.ilql_heads = heads
    object.__setattr__(gpt.decoder, "_nemo_rlhf_ilql_heads", heads)
    gpt.decoder.register_forward_hook(_capture_ilql)
    return heads


def ilql_heads_output(gpt: torch.nn.Module):
    heads = gpt.ilql_heads
    hidden = heads._hidden
    if hidden is None:
        raise RuntimeError("ilql_heads_output called before a forward of the model")
    heads._hidden = None
    qs, target_qs, v = heads(hidden)
    return ([_to_causal(gpt, q) for q in qs], [_to_causal(gpt, q) for q in target_qs], _to_causal(gpt, v))
