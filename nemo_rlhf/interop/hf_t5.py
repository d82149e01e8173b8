"""Hugging Face T5 (v1.0 t5-small style and v1.1 / flan-T5 style) -> megatron-core T5Model.

What maps where (HF ``T5ForConditionalGeneration`` -> our ``model.arch=t5``):

    shared.weight                              embedding.word_embeddings.weight (padded rows: 0)
    {enc,dec}.block.i.layer.0.SelfAttention.q/k/v   {enc,dec}oder.layers.i.self_attention.linear_qkv
                                               (per head [q_h; k_h; v_h], megatron's layout)
    ...SelfAttention.o                         ...self_attention.linear_proj
    block.0...relative_attention_bias          {encoder,decoder}_relative_pos_emb.relative_attention_bias
                                               (HF computes it in block 0 and shares it; so does megatron)
    dec.block.i.layer.1.EncDecAttention.q      decoder.layers.i.cross_attention.linear_q
    ...EncDecAttention.k/v                     ...cross_attention.linear_kv (per head [k_h; v_h])
    layer.N.layer_norm (RMSNorm, no bias)      input_layernorm / pre_cross_attn_layernorm / pre_mlp_layernorm
    DenseReluDense.wi | wi_0, wi_1 ; wo        mlp.linear_fc1 ([wi_0; wi_1] gated) ; mlp.linear_fc2
    {enc,dec}.final_layer_norm                 {encoder,decoder}.final_layernorm
    lm_head.weight                             lm_head.output_layer.weight (untied) | the embedding (tied)

and the settings: RMSNorm (``layer_norm_epsilon``), no linear biases, ``d_kv`` -> model.kv_channels,
no 1/sqrt(d) in attention (model.attention_softmax_scale=1.0), relative attention bias (on our
bias-taking local attention, models/t5.py), relu (v1.0) or gated tanh-gelu (v1.1, "gated-gelu").
T5 v1.0 multiplies the decoder output by d_model**-0.5 before the tied LM head; megatron has no such
scale, so it is folded into the decoder's final RMSNorm weight (exact: the norm is linear in its
weight). megatron's tied LM head has a bias; it is set to 0.

Anything else (other feed-forward activations, a vocabulary the tokenizer cannot hold) fails with a
ConfigError naming the config.json field.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

import torch

from nemo_rlhf.config.schema import ModelConfig
from nemo_rlhf.errors import CheckpointError, ConfigError
from nemo_rlhf.interop.hf_config import read_hf_config
from nemo_rlhf.interop.hf_gpt import read_hf_weights
from nemo_rlhf.models.gpt import padded_vocab_size, unwrap

Tensor = torch.Tensor
StateDict = Dict[str, Tensor]

# HF feed_forward_proj -> ModelConfig.activation
_ACTIVATIONS = {"relu": "relu", "gated-gelu": "geglu_tanh", "gated-relu": None, "gelu": "gelu"}


def model_config_from_hf_t5(hf: Dict[str, Any], base: ModelConfig | None = None, tied: bool = True,
                            where: str = "config.json") -> ModelConfig:
    """ModelConfig (arch=t5) for an HF T5 config dict. ``base`` supplies the training-side fields
    (seq_length, precision, ...); ``tied``: whether the weights tie the LM head to the embedding
    (:func:`lm_head_is_tied`; transformers >= 5 always writes tie_word_embeddings=true)."""
    mt = hf.get("model_type")
    if mt != "t5":
        raise ConfigError(f"{where}: model_type={mt!r} is not t5 (mt5/umt5 are not supported yet)")
    ffp = hf.get("feed_forward_proj", "relu")
    act = _ACTIVATIONS.get(ffp)
    if act is None:
        raise ConfigError(f"{where}: feed_forward_proj={ffp!r} is not supported (relu | gated-gelu | gelu)")
    base = base or ModelConfig()
    return dataclasses.replace(
        base, arch="t5", num_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        encoder_num_layers=hf["num_layers"], hidden_size=hf["d_model"], num_attention_heads=hf["num_heads"],
        kv_channels=hf["d_kv"], ffn_hidden_size=hf["d_ff"], normalization="RMSNorm",
        layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-6), activation=act, add_bias_linear=False,
        position_embedding_type="relative",
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        attention_softmax_scale=1.0, hidden_dropout=0.0, attention_dropout=0.0,
        vocab_size=hf["vocab_size"], share_embeddings_and_output_weights=tied)


def model_config_from_hf_t5_dir(path, base: ModelConfig | None = None) -> ModelConfig:
    """:func:`model_config_from_hf_t5` for an HF directory (reads the weights to see whether the LM
    head is tied); used when ``model.path`` of an arch=t5 run is a Hugging Face T5 directory."""
    return model_config_from_hf_t5(read_hf_config(path), base, tied=lm_head_is_tied(read_hf_weights(path)),
                                   where=f"{path}/config.json")


def lm_head_is_tied(hf_sd: StateDict) -> bool:
    """T5 v1.0 ties the LM head to the embedding; flan-T5 / v1.1 checkpoints carry their own."""
    head = hf_sd.get("lm_head.weight")
    return head is None or head.data_ptr() == hf_sd["shared.weight"].data_ptr() or torch.equal(head, hf_sd["shared.weight"])


def scales_decoder_output(hf: Dict[str, Any]) -> bool:
    """Whether HF multiplies the decoder output by d_model**-0.5 before the LM head (v1.0: yes)."""
    if "scale_decoder_outputs" in hf:           # transformers >= 5 saves it explicitly
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def _pack_heads(parts: List[Tensor], heads: int) -> Tensor:
    """[heads*d, h] each -> [heads * (len(parts)*d), h] with each head's rows together."""
    d = parts[0].shape[0] // heads
    return torch.cat([p.reshape(heads, d, -1) for p in parts], dim=1).reshape(-1, parts[0].shape[1])


def hf_t5_to_megatron(hf_sd: StateDict, hf: Dict[str, Any], padded_vocab: int) -> StateDict:
    """Full (unsharded) megatron T5Model state dict from an HF T5 state dict. Pure tensor moves."""
    heads = hf["num_heads"]
    gated = str(hf.get("feed_forward_proj", "relu")).startswith("gated")
    out: StateDict = {}

    def get(name):
        if name not in hf_sd:
            raise ConfigError(f"the Hugging Face T5 weights lack {name}")
        return hf_sd[name]

    emb = get("shared.weight")
    if emb.shape[0] > padded_vocab:
        raise ConfigError(f"config.json vocab_size={emb.shape[0]} exceeds the padded vocabulary {padded_vocab}")
    padded = torch.zeros(padded_vocab, emb.shape[1], dtype=emb.dtype)
    padded[:emb.shape[0]] = emb
    out["embedding.word_embeddings.weight"] = padded

    def mlp(src, dst):
        if gated:
            out[f"{dst}.mlp.linear_fc1.weight"] = torch.cat([get(f"{src}.DenseReluDense.wi_0.weight"),
                                                             get(f"{src}.DenseReluDense.wi_1.weight")], 0)
        else:
            out[f"{dst}.mlp.linear_fc1.weight"] = get(f"{src}.DenseReluDense.wi.weight")
        out[f"{dst}.mlp.linear_fc2.weight"] = get(f"{src}.DenseReluDense.wo.weight")
        out[f"{dst}.pre_mlp_layernorm.weight"] = get(f"{src}.layer_norm.weight")

    def self_attn(src, dst):
        a = f"{src}.SelfAttention"
        out[f"{dst}.self_attention.linear_qkv.weight"] = _pack_heads(
            [get(f"{a}.q.weight"), get(f"{a}.k.weight"), get(f"{a}.v.weight")], heads)
        out[f"{dst}.self_attention.linear_proj.weight"] = get(f"{a}.o.weight")
        out[f"{dst}.input_layernorm.weight"] = get(f"{src}.layer_norm.weight")

    for i in range(hf["num_layers"]):
        self_attn(f"encoder.block.{i}.layer.0", f"encoder.layers.{i}")
        mlp(f"encoder.block.{i}.layer.1", f"encoder.layers.{i}")
    for i in range(hf.get("num_decoder_layers") or hf["num_layers"]):
        src, dst = f"decoder.block.{i}.layer", f"decoder.layers.{i}"
        self_attn(f"{src}.0", dst)
        c = f"{src}.1.EncDecAttention"
        out[f"{dst}.cross_attention.linear_q.weight"] = get(f"{c}.q.weight")
        out[f"{dst}.cross_attention.linear_kv.weight"] = _pack_heads([get(f"{c}.k.weight"), get(f"{c}.v.weight")], heads)
        out[f"{dst}.cross_attention.linear_proj.weight"] = get(f"{c}.o.weight")
        out[f"{dst}.pre_cross_attn_layernorm.weight"] = get(f"{src}.1.layer_norm.weight")
        mlp(f"{src}.2", dst)
    for stack in ("encoder", "decoder"):
        out[f"{stack}_relative_pos_emb.relative_attention_bias.weight"] = get(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    out["encoder.final_layernorm.weight"] = get("encoder.final_layer_norm.weight")
    final = get("decoder.final_layer_norm.weight")
    if scales_decoder_output(hf):
        final = final * hf["d_model"] ** -0.5     # (x * w) * s == x * (w * s): the v1.0 output scale
    out["decoder.final_layernorm.weight"] = final
    if lm_head_is_tied(hf_sd):
        out["lm_head.output_layer.bias"] = torch.zeros(padded_vocab, dtype=emb.dtype)
    else:
        head = get("lm_head.weight")
        padded_head = torch.zeros(padded_vocab, head.shape[1], dtype=head.dtype)
        padded_head[:head.shape[0]] = head
        out["lm_head.output_layer.weight"] = padded_head
    return out


def _shard(full: Tensor, param: Tensor, name: str, gated: bool, tp: int, rank: int) -> Tensor:
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if gated and name.endswith("mlp.linear_fc1.weight"):      # [gate; up] -> [gate_r; up_r]
        return torch.cat([h.chunk(tp, dim=dim)[rank] for h in full.chunk(2, dim=dim)], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


# heads we attach to the T5 decoder (models/heads.py) start fresh on import
HEAD_PREFIXES = ("value_head.", "ilql_heads.")


def load_hf_t5(full: StateDict, t5: torch.nn.Module, gated: bool, skip_prefixes=()) -> None:
    """Copy this rank's TP shards of ``full`` (from :func:`hf_t5_to_megatron`) into an unwrapped
    T5Model; every parameter (but attached heads and ``skip_prefixes``) must be filled with the
    right shape."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    skip = HEAD_PREFIXES + tuple(skip_prefixes)
    names = {n: p for n, p in t5.named_parameters() if not n.startswith(skip)}
    missing = sorted(set(names) - set(full))
    unused = sorted(set(full) - set(names))
    if missing or unused:
        raise CheckpointError(f"Hugging Face T5 -> megatron: parameters without weights {missing[:10]}, "
                              f"weights without parameters {unused[:10]}")
    with torch.no_grad():
        for name, param in names.items():
            shard = _shard(full[name], param, name, gated, tp, rank)
            if shard.shape != param.shape:
                raise CheckpointError(f"Hugging Face T5 -> megatron: {name} has shape {tuple(shard.shape)} "
                                      f"for a parameter of {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
    bias = names.get("lm_head.output_layer.bias")
    if bias is not None:
        # megatron's tied T5 LM head has a bias; HF T5 has none: keep it at 0 (no gradient), so a
        # fine-tuned model still exports to Hugging Face exactly
        bias.requires_grad_(False)


def import_hf_t5(path, chunks: List[torch.nn.Module], model: ModelConfig, skip_prefixes=()) -> None:
    """Fill T5 ``chunks`` (built from ``model``, e.g. :func:`model_config_from_hf_t5`) with the HF
    T5 checkpoint in directory ``path`` (config.json + safetensors / .bin)."""
    hf = read_hf_config(path)
    hf_sd = read_hf_weights(path)
    t5 = unwrap(chunks[0])
    if model.share_embeddings_and_output_weights != lm_head_is_tied(hf_sd):
        raise ConfigError(f"{path}: the checkpoint's LM head is {'tied' if lm_head_is_tied(hf_sd) else 'untied'}; "
                          f"set model.share_embeddings_and_output_weights={lm_head_is_tied(hf_sd)}")
    full = hf_t5_to_megatron(hf_sd, hf, padded_vocab_size(model.vocab_size or hf["vocab_size"], model))
    load_hf_t5(full, t5, gated=str(hf.get("feed_forward_proj", "relu")).startswith("gated"),
               skip_prefixes=skip_prefixes)


# ---------------------------------------------------------------------------------------------
# export: megatron T5Model -> Hugging Face T5 directory (AutoModelForSeq2SeqLM loads it)

def hf_t5_config_from_model(model: ModelConfig, vocab_size: int) -> Dict[str, Any]:
    """config.json for a T5-compatible ``model``; a field HF T5 cannot express raises, named."""
    need = {"arch": "t5", "normalization": "RMSNorm", "add_bias_linear": False,
            "position_embedding_type": "relative", "attention_softmax_scale": 1.0}
    for key, want in need.items():
        if getattr(model, key) != want:
            raise ConfigError(f"Hugging Face T5 export needs model.{key}={want!r}, got {getattr(model, key)!r}")
    acts = {"relu": "relu", "geglu_tanh": "gated-gelu", "gelu": "gelu"}
    if model.activation not in acts:
        raise ConfigError(f"Hugging Face T5 export: model.activation={model.activation!r} has no T5 "
                          f"feed_forward_proj (relu | geglu_tanh | gelu)")
    tied = model.share_embeddings_and_output_weights
    return {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True,
            "vocab_size": vocab_size, "d_model": model.hidden_size,
            "d_kv": model.kv_channels or model.hidden_size // model.num_attention_heads,
            "d_ff": model.ffn_hidden_size or 4 * model.hidden_size,
            "num_layers": model.encoder_num_layers or model.num_layers, "num_decoder_layers": model.num_layers,
            "num_heads": model.num_attention_heads,
            "relative_attention_num_buckets": model.relative_attention_num_buckets,
            "relative_attention_max_distance": model.relative_attention_max_distance,
            "dropout_rate": 0.0, "layer_norm_epsilon": model.layernorm_epsilon,
            "feed_forward_proj": acts[model.activation],
            # tied: T5 v1.0's convention (output scale); untied: v1.1's (no scale)
            "tie_word_embeddings": tied, "scale_decoder_outputs": tied,
            "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}


def _unpack_heads(x: Tensor, heads: int, parts: int) -> List[Tensor]:
    g = x.reshape(heads, -1, x.shape[1])
    d = g.shape[1] // parts
    return [g[:, i * d:(i + 1) * d].reshape(-1, x.shape[1]) for i in range(parts)]


def megatron_to_hf_t5(full: StateDict, hf: Dict[str, Any]) -> StateDict:
    """Inverse of :func:`hf_t5_to_megatron` for the config ``hf`` (:func:`hf_t5_config_from_model`)."""
    heads, v = hf["num_heads"], hf["vocab_size"]
    gated = hf["feed_forward_proj"].startswith("gated")
    out: StateDict = {"shared.weight": full["embedding.word_embeddings.weight"][:v]}

    def mlp(src, dst):
        fc1 = full[f"{src}.mlp.linear_fc1.weight"]
        if gated:
            out[f"{dst}.DenseReluDense.wi_0.weight"], out[f"{dst}.DenseReluDense.wi_1.weight"] = fc1.chunk(2, 0)
        else:
            out[f"{dst}.DenseReluDense.wi.weight"] = fc1
        out[f"{dst}.DenseReluDense.wo.weight"] = full[f"{src}.mlp.linear_fc2.weight"]
        out[f"{dst}.layer_norm.weight"] = full[f"{src}.pre_mlp_layernorm.weight"]

    def self_attn(src, dst):
        q, k, vv = _unpack_heads(full[f"{src}.self_attention.linear_qkv.weight"], heads, 3)
        a = f"{dst}.SelfAttention"
        out[f"{a}.q.weight"], out[f"{a}.k.weight"], out[f"{a}.v.weight"] = q, k, vv
        out[f"{a}.o.weight"] = full[f"{src}.self_attention.linear_proj.weight"]
        out[f"{dst}.layer_norm.weight"] = full[f"{src}.input_layernorm.weight"]

    for i in range(hf["num_layers"]):
        self_attn(f"encoder.layers.{i}", f"encoder.block.{i}.layer.0")
        mlp(f"encoder.layers.{i}", f"encoder.block.{i}.layer.1")
    for i in range(hf["num_decoder_layers"]):
        src, dst = f"decoder.layers.{i}", f"decoder.block.{i}.layer"
        self_attn(src, f"{dst}.0")
        c = f"{dst}.1.EncDecAttention"
        out[f"{c}.q.weight"] = full[f"{src}.cross_attention.linear_q.weight"]
        out[f"{c}.k.weight"], out[f"{c}.v.weight"] = _unpack_heads(full[f"{src}.cross_attention.linear_kv.weight"], heads, 2)
        out[f"{c}.o.weight"] = full[f"{src}.cross_attention.linear_proj.weight"]
        out[f"{dst}.1.layer_norm.weight"] = full[f"{src}.pre_cross_attn_layernorm.weight"]
        mlp(src, f"{dst}.2")
    for stack in ("encoder", "decoder"):
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
            full[f"{stack}_relative_pos_emb.relative_attention_bias.weight"]
    out["encoder.final_layer_norm.weight"] = full["encoder.final_layernorm.weight"]
    final = full["decoder.final_layernorm.weight"]
    out["decoder.final_layer_norm.weight"] = final / hf["d_model"] ** -0.5 if hf["scale_decoder_outputs"] else final
    if hf["tie_word_embeddings"]:
        bias = full.get("lm_head.output_layer.bias")
        if bias is not None and bool(bias.abs().max() > 0):
            raise ConfigError("Hugging Face T5 export: megatron's tied LM head has a nonzero bias "
                              "(lm_head.output_layer.bias), which T5 has no place for")
    else:
        out["lm_head.weight"] = full["lm_head.output_layer.weight"][:v]
    return {k: t.detach().clone().contiguous() for k, t in out.items()}


def gather_t5_full_state(t5: torch.nn.Module, gated: bool) -> StateDict:
    """Collective over the TP group: the full (unsharded) tensors of an unwrapped T5Model."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    full: StateDict = {}
    for name, p in t5.named_parameters():
        if name.startswith(HEAD_PREFIXES):
            continue
        x = p.detach()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(x) for _ in range(tp)]
            dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
            dim = p.partition_dim
            if gated and name.endswith("mlp.linear_fc1.weight"):       # [gate_r; up_r] per rank
                halves = [q.chunk(2, dim=dim) for q in parts]
                x = torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
            else:
                x = torch.cat(parts, dim=dim)
        full[name] = x.float().cpu()
    return full


def export_hf_t5(directory, chunks: List[torch.nn.Module], model: ModelConfig, vocab_size: int,
                 tokenizer=None):
    """Collective: write ``directory`` (config.json + model.safetensors) for transformers'
    ``AutoModelForSeq2SeqLM``; ``tokenizer`` (the run's) sets config.json's eos/pad ids (its files are
    written by :func:`nemo_rlhf.interop.export_hf`). Rank 0 writes and returns the path; other ranks
    return None."""
    import json
    from pathlib import Path

    import torch.distributed as dist
    from safetensors.torch import save_file

    hf = hf_t5_config_from_model(model, vocab_size)
    if tokenizer is not None:
        hf.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    full = gather_t5_full_state(unwrap(chunks[0]), gated=hf["feed_forward_proj"].startswith("gated"))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    tensors = megatron_to_hf_t5(full, hf)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return directory
