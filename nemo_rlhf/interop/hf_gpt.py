"""Hugging Face decoder-only weights <-> megatron-core GPTModel, at any TP/PP.

The conversion works on *full* (unsharded, TP=1/PP=1) tensors named as megatron's local layer
spec names them (``decoder.layers.3.self_attention.linear_qkv.weight``); sharding to, and
gathering from, the chunks of the current rank is separate (:func:`load_full_state` /
:func:`gather_full_state`), so one table per architecture serves every layout.

Layouts that need care:
  * megatron's fused QKV is grouped per key/value head: ``[groups, (q heads of the group, k, v),
    head_dim, hidden]`` (GPT-NeoX's ``query_key_value`` already is, for one head per group);
  * GPT-2 stores ``Conv1D`` weights transposed (``[in, out]``);
  * SwiGLU ``linear_fc1`` is ``[gate; up]`` at TP=1 and ``[gate_r; up_r]`` on TP rank r;
  * the vocabulary is padded to ``make_vocab_size_divisible_by``: rows are zero-padded on import
    and cut on export.
Nothing is dropped silently: every tensor of the HF file must be consumed (only known non-weight
buffers such as ``rotary_emb.inv_freq`` are skipped) and every parameter of the megatron chunks
filled, or :class:`CheckpointError` names the keys.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from nemo_rlhf.config.schema import GATED_ACTIVATIONS, ModelConfig
from nemo_rlhf.errors import CheckpointError
from nemo_rlhf.models.gpt import unwrap

Tensor = torch.Tensor
StateDict = Dict[str, Tensor]

# HF buffers that are not weights (older transformers saved them)
_IGNORED_HF = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq|\.attention\.bias|"
                         r"\.attention\.masked_bias)$")


# ---------------------------------------------------------------------------------------------
# reading HF files

def read_hf_weights(path) -> StateDict:
    """All tensors of an HF model directory: model.safetensors, sharded safetensors with
    model.safetensors.index.json, or pytorch_model.bin (sharded with its index)."""
    path = Path(path)
    index = next((path / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (path / n).is_file()), None)
    if index is not None:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        files = ["pytorch_model.bin"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors, sharded safetensors index or pytorch_model.bin")
    out: StateDict = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{index}: names the shard {name}, which is missing")
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            out.update(load_file(str(f)))
        else:
            out.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return out


# ---------------------------------------------------------------------------------------------
# pure layout transforms (tested by round trips)

def pack_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int) -> Tensor:
    """[heads*d, ...], [groups*d, ...], [groups*d, ...] -> megatron's [groups*(heads/groups + 2)*d, ...]."""
    d, rest = q.shape[0] // heads, q.shape[1:]
    per = heads // groups
    qkv = torch.cat([q.reshape(groups, per * d, *rest), k.reshape(groups, d, *rest),
                     v.reshape(groups, d, *rest)], dim=1)
    return qkv.reshape(-1, *rest)


def unpack_qkv(qkv: Tensor, heads: int, groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    per, rest = heads // groups, qkv.shape[1:]
    d = qkv.shape[0] // (groups * (per + 2))
    g = qkv.reshape(groups, (per + 2) * d, *rest)
    q, k, v = g[:, :per * d], g[:, per * d:(per + 1) * d], g[:, (per + 1) * d:]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# Each transform: (to_megatron(list of HF tensors, cfg) -> tensor, to_hf(tensor, cfg) -> list of HF tensors)
def _heads(m: ModelConfig):
    return m.num_attention_heads, m.num_query_groups or m.num_attention_heads


_COPY = (lambda xs, m: xs[0], lambda x, m: [x])
_CONV1D = (lambda xs, m: xs[0].t(), lambda x, m: [x.t()])
_QKV = (lambda xs, m: pack_qkv(*xs, *_heads(m)), lambda x, m: list(unpack_qkv(x, *_heads(m))))
_QKV_FUSED_T = (lambda xs, m: pack_qkv(*xs[0].t().chunk(3, dim=0), *_heads(m)),
                lambda x, m: [torch.cat(unpack_qkv(x, *_heads(m)), dim=0).t()])
_QKV_FUSED_B = (lambda xs, m: pack_qkv(*xs[0].chunk(3, dim=0), *_heads(m)),
                lambda x, m: [torch.cat(unpack_qkv(x, *_heads(m)), dim=0)])
_GATE_UP = (lambda xs, m: torch.cat(xs, dim=0), lambda x, m: list(x.chunk(2, dim=0)))

# when a row applies: always, with linear biases, with a QKV bias, with LayerNorm (its bias)
_ALWAYS = lambda m: True
_BIAS = lambda m: m.add_bias_linear
_QKV_BIAS = lambda m: m.add_bias_linear or m.add_qkv_bias
_LN_BIAS = lambda m: m.normalization == "LayerNorm"

Row = Tuple[str, Sequence[str], tuple, Callable[[ModelConfig], bool]]

# per layer: (megatron suffix, HF suffixes, transform, condition)
_LAYERS: Dict[str, Tuple[str, List[Row]]] = {
    "gpt2": ("transformer.h.{i}.", [
        ("input_layernorm.weight", ["ln_1.weight"], _COPY, _ALWAYS),
        ("input_layernorm.bias", ["ln_1.bias"], _COPY, _ALWAYS),
        ("self_attention.linear_qkv.weight", ["attn.c_attn.weight"], _QKV_FUSED_T, _ALWAYS),
        ("self_attention.linear_qkv.bias", ["attn.c_attn.bias"], _QKV_FUSED_B, _ALWAYS),
        ("self_attention.linear_proj.weight", ["attn.c_proj.weight"], _CONV1D, _ALWAYS),
        ("self_attention.linear_proj.bias", ["attn.c_proj.bias"], _COPY, _ALWAYS),
        ("pre_mlp_layernorm.weight", ["ln_2.weight"], _COPY, _ALWAYS),
        ("pre_mlp_layernorm.bias", ["ln_2.bias"], _COPY, _ALWAYS),
        ("mlp.linear_fc1.weight", ["mlp.c_fc.weight"], _CONV1D, _ALWAYS),
        ("mlp.linear_fc1.bias", ["mlp.c_fc.bias"], _COPY, _ALWAYS),
        ("mlp.linear_fc2.weight", ["mlp.c_proj.weight"], _CONV1D, _ALWAYS),
        ("mlp.linear_fc2.bias", ["mlp.c_proj.bias"], _COPY, _ALWAYS),
    ]),
    "llama": ("model.layers.{i}.", [
        ("input_layernorm.weight", ["input_layernorm.weight"], _COPY, _ALWAYS),
        ("self_attention.linear_qkv.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                              "self_attn.v_proj.weight"], _QKV, _ALWAYS),
        ("self_attention.linear_qkv.bias", ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                            "self_attn.v_proj.bias"], _QKV, _QKV_BIAS),
        ("self_attention.linear_proj.weight", ["self_attn.o_proj.weight"], _COPY, _ALWAYS),
        ("self_attention.linear_proj.bias", ["self_attn.o_proj.bias"], _COPY, _BIAS),
        ("pre_mlp_layernorm.weight", ["post_attention_layernorm.weight"], _COPY, _ALWAYS),
        ("mlp.linear_fc1.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], _GATE_UP, _ALWAYS),
        ("mlp.linear_fc1.bias", ["mlp.gate_proj.bias", "mlp.up_proj.bias"], _GATE_UP, _BIAS),
        ("mlp.linear_fc2.weight", ["mlp.down_proj.weight"], _COPY, _ALWAYS),
        ("mlp.linear_fc2.bias", ["mlp.down_proj.bias"], _COPY, _BIAS),
    ]),
    "gpt_neox": ("gpt_neox.layers.{i}.", [
        ("input_layernorm.weight", ["input_layernorm.weight"], _COPY, _ALWAYS),
        ("input_layernorm.bias", ["input_layernorm.bias"], _COPY, _ALWAYS),
        # GPT-NeoX's fused QKV is [heads, (q, k, v), head_dim]: megatron's layout for MHA
        ("self_attention.linear_qkv.weight", ["attention.query_key_value.weight"], _COPY, _ALWAYS),
        ("self_attention.linear_qkv.bias", ["attention.query_key_value.bias"], _COPY, _ALWAYS),
        ("self_attention.linear_proj.weight", ["attention.dense.weight"], _COPY, _ALWAYS),
        ("self_attention.linear_proj.bias", ["attention.dense.bias"], _COPY, _ALWAYS),
        ("pre_mlp_layernorm.weight", ["post_attention_layernorm.weight"], _COPY, _ALWAYS),
        ("pre_mlp_layernorm.bias", ["post_attention_layernorm.bias"], _COPY, _ALWAYS),
        ("mlp.linear_fc1.weight", ["mlp.dense_h_to_4h.weight"], _COPY, _ALWAYS),
        ("mlp.linear_fc1.bias", ["mlp.dense_h_to_4h.bias"], _COPY, _ALWAYS),
        ("mlp.linear_fc2.weight", ["mlp.dense_4h_to_h.weight"], _COPY, _ALWAYS),
        ("mlp.linear_fc2.bias", ["mlp.dense_4h_to_h.bias"], _COPY, _ALWAYS),
    ]),
}
_LAYERS["mistral"] = _LAYERS["qwen2"] = _LAYERS["llama"]

# model-level: (megatron name, HF name, condition); output_layer only when untied
_TOP: Dict[str, List[Tuple[str, str, Callable[[ModelConfig], bool]]]] = {
    "gpt2": [("embedding.word_embeddings.weight", "transformer.wte.weight", _ALWAYS),
             ("embedding.position_embeddings.weight", "transformer.wpe.weight", _ALWAYS),
             ("decoder.final_layernorm.weight", "transformer.ln_f.weight", _ALWAYS),
             ("decoder.final_layernorm.bias", "transformer.ln_f.bias", _ALWAYS),
             ("output_layer.weight", "lm_head.weight", lambda m: not m.share_embeddings_and_output_weights)],
    "llama": [("embedding.word_embeddings.weight", "model.embed_tokens.weight", _ALWAYS),
              ("decoder.final_layernorm.weight", "model.norm.weight", _ALWAYS),
              ("output_layer.weight", "lm_head.weight", lambda m: not m.share_embeddings_and_output_weights)],
    "gpt_neox": [("embedding.word_embeddings.weight", "gpt_neox.embed_in.weight", _ALWAYS),
                 ("decoder.final_layernorm.weight", "gpt_neox.final_layer_norm.weight", _ALWAYS),
                 ("decoder.final_layernorm.bias", "gpt_neox.final_layer_norm.bias", _ALWAYS),
                 ("output_layer.weight", "embed_out.weight", lambda m: not m.share_embeddings_and_output_weights)],
}
_TOP["mistral"] = _TOP["qwen2"] = _TOP["llama"]
_TIED_HEAD = {"gpt2": "lm_head.weight", "llama": "lm_head.weight", "gpt_neox": "embed_out.weight"}
_TIED_HEAD["mistral"] = _TIED_HEAD["qwen2"] = _TIED_HEAD["llama"]
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] > rows:
        raise CheckpointError(f"embedding has {x.shape[0]} rows, more than the model's {rows}")
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if x.shape[0] < rows else x


def hf_to_megatron(hf: StateDict, model_type: str, model: ModelConfig, padded_vocab: int,
                   where: str = "checkpoint") -> StateDict:
    """Full megatron tensors from HF ones. Raises naming any HF tensor left unused or missing."""
    if model_type == "gpt2" and not any(k.startswith("transformer.") for k in hf):
        hf = {("transformer." + k if not k.startswith("lm_head.") else k): v for k, v in hf.items()}  # GPT2Model
    left = {k: v for k, v in hf.items() if not _IGNORED_HF.search(k)}

    def take(key):
        if key not in left:
            raise CheckpointError(f"{where}: tensor {key!r} is missing (model_type={model_type})")
        return left.pop(key)

    out: StateDict = {}
    for mg, name, cond in _TOP[model_type]:
        if cond(model) and not (mg == "embedding.position_embeddings.weight"
                                and model.position_embedding_type != "learned_absolute"):
            out[mg] = take(name)
    if model.share_embeddings_and_output_weights and _TIED_HEAD[model_type] in left:
        head = left.pop(_TIED_HEAD[model_type])   # saved although tied: it must be the embedding
        if not torch.equal(head, out["embedding.word_embeddings.weight"]):
            raise CheckpointError(f"{where}: tie_word_embeddings=true but {_TIED_HEAD[model_type]} differs "
                                  f"from the input embedding")
    prefix, rows = _LAYERS[model_type]
    for i in range(model.num_layers):
        p = prefix.format(i=i)
        for mg, names, (to_mg, _), cond in rows:
            if cond(model) and not (mg.endswith("layernorm.bias") and not _LN_BIAS(model)):
                out[f"decoder.layers.{i}.{mg}"] = to_mg([take(p + n) for n in names], model)
    if left:
        raise CheckpointError(f"{where}: tensors not used by the {model_type} conversion (an unsupported "
                              f"feature?): {sorted(left)[:20]}")
    for k in _VOCAB_ROWS:
        if k in out:
            out[k] = _pad_rows(out[k], padded_vocab)
    return {k: v.contiguous() for k, v in out.items()}


def megatron_to_hf(full: StateDict, model_type: str, model: ModelConfig, vocab_size: int) -> StateDict:
    """HF tensors from full megatron ones (vocabulary rows cut to ``vocab_size``)."""
    out: StateDict = {}
    for mg, name, cond in _TOP[model_type]:
        if cond(model) and mg in full:
            out[name] = full[mg][:vocab_size] if mg in _VOCAB_ROWS else full[mg]
    prefix, rows = _LAYERS[model_type]
    for i in range(model.num_layers):
        p = prefix.format(i=i)
        for mg, names, (_, to_hf), cond in rows:
            key = f"decoder.layers.{i}.{mg}"
            if cond(model) and key in full:
                for n, t in zip(names, to_hf(full[key], model)):
                    out[p + n] = t
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# sharding to / gathering from the chunks of this rank

# Transformer Engine specs fuse the pre-attention / pre-MLP norms into the next linear layer
_TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
             "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}


def _global_names(chunk) -> Dict[str, str]:
    """Local parameter name -> name in the TP=1/PP=1 model (layer numbers made global)."""
    gpt = unwrap(chunk)
    offsets = {}
    if getattr(gpt, "decoder", None) is not None:
        offsets = {str(j): layer.layer_number - 1 for j, layer in enumerate(gpt.decoder.layers)}
    names = {}
    for name, _ in gpt.named_parameters():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if m:
            rest = _TE_NAMES.get(m.group(2), m.group(2))
            names[name] = f"decoder.layers.{offsets[m.group(1)]}.{rest}"
        else:
            names[name] = name
    return names


def _is_gated_fc1(name: str, model: ModelConfig) -> bool:
    return model.activation in GATED_ACTIVATIONS and re.search(r"mlp\.linear_fc1\.(weight|bias)$", name) is not None


def _shard(full: Tensor, param: Tensor, name: str, model: ModelConfig, tp: int, rank: int) -> Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if _is_gated_fc1(name, model):   # [gate; up] -> [gate_r; up_r]
        return torch.cat([h.chunk(tp, dim=dim)[rank] for h in full.chunk(2, dim=dim)], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def load_full_state(full: StateDict, chunks: List[torch.nn.Module], model: ModelConfig,
                    skip_prefixes: Tuple[str, ...] = (), where: str = "checkpoint") -> None:
    """Copy this rank's shards of the full tensors into ``chunks`` (any TP/PP). Every parameter
    not under ``skip_prefixes`` must be filled, with the right shape."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    missing, bad = [], []
    for chunk in chunks:
        gpt = unwrap(chunk)
        names = _global_names(gpt)
        for local, param in gpt.named_parameters():
            if local.startswith(skip_prefixes):
                continue
            g = names[local]
            if g == "output_layer.weight" and model.share_embeddings_and_output_weights:
                g = "embedding.word_embeddings.weight"   # the last stage's copy of the tied embedding
            if g not in full:
                missing.append(g)
                continue
            shard = _shard(full[g], param, g, model, tp, rank)
            if shard.shape != param.shape:
                bad.append(f"{g}: checkpoint {tuple(full[g].shape)} -> shard {tuple(shard.shape)}, "
                           f"model {tuple(param.shape)}")
                continue
            with torch.no_grad():
                param.copy_(shard.to(param.dtype))
    if missing or bad:
        raise CheckpointError(f"{where} does not match the model: missing {missing[:20]}, wrong shapes {bad[:10]}")


def gather_full_state(chunks: List[torch.nn.Module], model: ModelConfig,
                      skip_prefixes: Tuple[str, ...] = ("value_head.", "ilql_heads.", "reward_head.")
                      ) -> Optional[StateDict]:
    """Collective over all ranks: the full TP=1/PP=1 tensors (on CPU), returned on global rank 0
    (None elsewhere). Tensor-parallel shards are all-gathered inside each TP group, then the
    pipeline stages' pieces are gathered to rank 0 (the first data-parallel replica sends)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    mine: StateDict = {}
    for chunk in chunks:
        gpt = unwrap(chunk)
        names = _global_names(gpt)
        for local, param in gpt.named_parameters():
            g = names[local]
            if local.startswith(skip_prefixes) or (g == "output_layer.weight"
                                                   and model.share_embeddings_and_output_weights):
                continue
            t = param.detach()
            if tp > 1 and getattr(param, "tensor_model_parallel", False):
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=group)
                dim = param.partition_dim
                if _is_gated_fc1(g, model):
                    halves = [p.chunk(2, dim=dim) for p in parts]
                    t = torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
                else:
                    t = torch.cat(parts, dim=dim)
            mine[g] = t.cpu().clone()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    send = mine if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 else {}
    got = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(send, got, dst=0)
    if dist.get_rank() != 0:
        return None
    full: StateDict = {}
    for part in got:
        full.update(part)
    return full
