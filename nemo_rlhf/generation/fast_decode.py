"""A lean KV-cached forward for sampling from a megatron GPT built with the local layer spec.

megatron's own inference path runs every decoding step through its full module stack (about 80
module calls, autograd functions and parallel-state lookups per step for a 4-layer model); on a CPU
or at small batch that Python work costs more than the arithmetic. This forward reads the same
weights and runs the same operations in megatron's order (scores with megatron's scale, the -10000
mask fill, softmax, residual adds as megatron's bias-dropout-add), with a preallocated key/value cache
[layers, B, groups, max_len, head_dim] holding post-rotary keys. It differs in the last bits only:
each linear layer adds its bias inside the GEMM (on a CPU, oneDNN's prepacked GEMM, with a following
GELU or residual add fused: :class:`_Linears`), queries are scaled before the score GEMM, and the
heads of a query group share one GEMM against its keys.
The prompt is run once (prefill); each step then runs one position.

Used by generation.sampling.generate when :func:`supported` holds (local spec, one tensor- and
pipeline-parallel rank, no sequence parallel, learned or rotary positions, dense MLP, fp32/bf16);
anything else goes through megatron's inference context as before. ``SamplingParams(fast_decode=
False)`` forces megatron's path (the tests compare the two).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from nemo_rlhf.models.gpt import output_weight


def supported(gpt) -> bool:
    """Whether :class:`FastDecoder` reproduces ``gpt``'s forward."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP

    cfg = gpt.config
    if ps.model_parallel_is_initialized() and (ps.get_tensor_model_parallel_world_size() > 1
                                               or ps.get_pipeline_model_parallel_world_size() > 1):
        return False
    if cfg.sequence_parallel or getattr(cfg, "fp8", None) or cfg.fp16 or cfg.apply_query_key_layer_scaling:
        return False
    if gpt.position_embedding_type not in ("learned_absolute", "rope") or getattr(cfg, "rotary_interleaved", False):
        return False
    if getattr(cfg, "mrope_section", None) or getattr(cfg, "multi_latent_attention", False):
        return False
    if getattr(cfg, "attention_output_gate", False) or getattr(cfg, "softmax_scale", None) is not None:
        return False
    if not (gpt.pre_process and gpt.post_process) or getattr(gpt, "mtp_process", False):
        return False
    for layer in gpt.decoder.layers:
        att = layer.self_attention
        if not (isinstance(att.linear_qkv, ColumnParallelLinear) and isinstance(att.linear_proj, RowParallelLinear)):
            return False   # Transformer Engine modules (fused layernorm + linear, ...)
        if any(getattr(att, n, None) is not None and not isinstance(getattr(att, n), IdentityOp)
               for n in ("q_layernorm", "k_layernorm")):
            return False
        if not isinstance(layer.mlp, MLP) or not isinstance(layer.mlp.linear_fc1, ColumnParallelLinear):
            return False
    return True


def _onednn_linear_available(device, dtype) -> bool:
    """Whether oneDNN's prepacked linear (the op torch.compile's CPU freezing uses) can run here."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


_PACK_LIMIT_BYTES = 2 << 30
"""Weights are prepacked only up to this size: packing copies them."""


def _gelu_kind(activation_func) -> Optional[str]:
    """"none" / "tanh" when ``activation_func`` is torch's exact / tanh-approximated GELU (which
    oneDNN can apply inside the GEMM), else None."""
    import functools

    f = torch.nn.functional.gelu
    if activation_func is f:
        return "none"
    if isinstance(activation_func, functools.partial) and activation_func.func is f and not activation_func.args:
        return activation_func.keywords.get("approximate", "none")
    return None


class _Linears:
    """The decoder's GEMMs, ``y = x W^T + b`` as one ``F.linear`` each (the bias inside the GEMM, not in
    a second pass as megatron does). On a CPU with oneDNN the weights are first reordered into
    oneDNN's blocked layout for the decode batch size (a copy of the weights, made once per
    ``generate`` call so that it always holds the current weights), and a following GELU or
    residual add runs inside the GEMM: at the small row counts of decoding this takes about half of
    MKL's time here (4 layers x 256 hidden, batch 16). Both round differently from megatron's
    matmul-then-bias in the last bits (fp32: ~1e-6 relative)."""

    def __init__(self, weights, batch: int, device, dtype):
        self.packed = {}
        if not _onednn_linear_available(device, dtype) or \
                sum(w.numel() * w.element_size() for w in weights) > _PACK_LIMIT_BYTES:
            return
        try:
            for w in weights:
                self.packed[id(w)] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch)
            ok = self._agrees(weights[0])
        except Exception:   # noqa: BLE001  (private ops: any failure means MKL's GEMMs, as before)
            ok = False
        if not ok:
            self.packed = {}

    def _agrees(self, weight: torch.Tensor) -> bool:
        """The private oneDNN ops still compute what this class expects of them (torch may change
        them between releases): each form once, on a small input, against ``F.linear``."""
        F = torch.nn.functional
        n, k = weight.shape
        x = torch.linspace(-1.0, 1.0, 2 * k, dtype=weight.dtype, device=weight.device).view(2, k)
        bias = torch.linspace(-0.5, 0.5, n, dtype=weight.dtype, device=weight.device)
        residual = torch.linspace(1.0, -1.0, 2 * n, dtype=weight.dtype, device=weight.device).view(2, n)
        with torch.no_grad():
            plain = F.linear(x, weight, bias)
            tol = 1e-4 * (1.0 + float(plain.abs().max()))
            return all(float((got - want).abs().max()) <= tol for got, want in (
                (self(x, weight, bias), plain),
                (self(x, weight, bias, gelu="none"), F.gelu(plain)),
                (self(x, weight, bias, gelu="tanh"), F.gelu(plain, approximate="tanh")),
                (self(x, weight, bias, residual=residual), residual + plain)))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 residual: Optional[torch.Tensor] = None, gelu: Optional[str] = None) -> torch.Tensor:
        """``residual + act(x W^T + b)``, act = GELU (``gelu``: its approximation) or the identity."""
        packed = self.packed.get(id(weight))
        if packed is None:
            y = torch.nn.functional.linear(x, weight, bias)
            if gelu is not None:
                y = torch.nn.functional.gelu(y, approximate=gelu)
            return y if residual is None else residual + y
        if gelu is None and residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none" if gelu is None else "gelu", [],
                                               "" if gelu is None else gelu)
        return y if residual is None else residual + y


class FastDecoder:
    """KV-cached forward of one GPT over ``batch`` rows and up to ``max_len`` positions."""

    def __init__(self, gpt, batch: int, max_len: int, device, dtype):
        cfg = gpt.config
        self.gpt, self.cfg = gpt, cfg
        self.heads = cfg.num_attention_heads
        self.groups = cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim = cfg.kv_channels
        self.scale = 1.0 / (self.head_dim ** 0.5)
        n = len(gpt.decoder.layers)
        self.keys = torch.empty((n, batch, self.groups, max_len, self.head_dim), device=device, dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self.length = 0
        self.rope = None
        if gpt.position_embedding_type == "rope":
            self.rope = gpt.rotary_pos_emb(max_len)   # [max_len, 1, 1, dim]
        self.parallel_residual = type(gpt.decoder.layers[0]).__name__ == "ParallelResidualLayer"
        weights = [m.weight for layer in gpt.decoder.layers for m in (layer.self_attention.linear_qkv,
                   layer.self_attention.linear_proj, layer.mlp.linear_fc1, layer.mlp.linear_fc2)]
        self.gelu = _gelu_kind(cfg.activation_func)
        self.linear = _Linears(weights + [output_weight(self.gpt)], batch, device, dtype)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """From now on compute only ``rows`` (indices into the current rows) of the batch."""
        self.keys, self.values = self.keys.index_select(1, rows), self.values.index_select(1, rows)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attention_mask: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, s, V], final hidden states [s, B, H]) of ``ids`` [B, s] appended to the cached
        positions; ``attention_mask`` [B, 1, s, length + s] (True = blocked) or None (causal)."""
        gpt = self.gpt
        x = gpt.embedding(input_ids=ids, position_ids=positions)          # [s, B, H]
        s, b = x.shape[0], x.shape[1]
        start, end = self.length, self.length + s
        if attention_mask is None and s > 1:
            idx = torch.arange(end, device=x.device)
            attention_mask = (idx[None, :] > (start + torch.arange(s, device=x.device))[:, None])[None, None]
        freqs = None if self.rope is None else self.rope[start:end]
        for i, layer in enumerate(gpt.decoder.layers):
            if self.parallel_residual:
                x = self._attention(i, layer, x, freqs, attention_mask, start, end) + self._mlp(layer, x) - x
            else:
                x = self._attention(i, layer, x, freqs, attention_mask, start, end)
                x = self._mlp(layer, x)
        self.length = end
        hidden = gpt.decoder.final_layernorm(x) if gpt.decoder.final_layernorm is not None else x
        logits = self.linear(hidden, output_weight(self.gpt))
        return logits.transpose(0, 1).contiguous(), hidden

    def _attention(self, i, layer, x, freqs, mask, start, end):
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        att = layer.self_attention
        s, b = x.shape[:2]
        qkv = self._linear(layer.input_layernorm(x), att.linear_qkv)
        per_group = self.heads // self.groups
        qkv = qkv.view(s, b, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = torch.split(qkv, [per_group * self.head_dim, self.head_dim, self.head_dim], dim=3)
        q = q.reshape(s, b, self.heads, self.head_dim)
        if freqs is not None:
            q = apply_rotary_pos_emb(q, freqs, config=self.cfg)
            k = apply_rotary_pos_emb(k, freqs, config=self.cfg)
        self.keys[i, :, :, start:end] = k.permute(1, 2, 0, 3)
        self.values[i, :, :, start:end] = v.permute(1, 2, 0, 3)
        g, d = self.groups, self.head_dim
        keys = self.keys[i, :, :, :end].reshape(b * g, end, d).transpose(1, 2)  # [B g, d, T]
        values = self.values[i, :, :, :end].reshape(b * g, end, d)          # [B g, T, d]
        # the heads of a query group share its keys and values: one GEMM per group, no copies of them
        q = (q * self.scale).view(s, b, g, per_group, d).permute(1, 2, 3, 0, 4).reshape(b * g, per_group * s, d)
        scores = torch.bmm(q, keys).view(b, self.heads, s, end)
        if scores.dtype != torch.float32:
            scores = scores.float()
        if mask is not None:
            scores = scores.masked_fill(mask, -10000.0)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        context = torch.bmm(probs.view(b * g, per_group * s, end), values)
        context = context.view(b, self.heads, s, d).permute(2, 0, 1, 3).reshape(s, b, -1)
        return self._linear(context, att.linear_proj, residual=x)

    def _linear(self, x, module, **kwargs):
        """megatron's Column/RowParallelLinear at one rank"""
        return self.linear(x, module.weight, module.bias, **kwargs)

    def _mlp(self, layer, x):
        mlp, cfg = layer.mlp, self.cfg
        h = layer.pre_mlp_layernorm(x)
        if cfg.gated_linear_unit:
            a, g = torch.chunk(self._linear(h, mlp.linear_fc1), 2, dim=-1)
            h = cfg.activation_func(a) * g
        elif self.gelu is not None:
            h = self._linear(h, mlp.linear_fc1, gelu=self.gelu)
        else:
            h = cfg.activation_func(self._linear(h, mlp.linear_fc1))
        return self._linear(h, mlp.linear_fc2, residual=x)
