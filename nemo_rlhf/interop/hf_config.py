"""Hugging Face ``config.json`` <-> :class:`ModelConfig` for decoder-only models.

Supported ``model_type``: gpt2, llama, mistral, qwen2, gpt_neox. Every HF field that changes the
function the model computes is either mapped or checked; a value megatron-core 0.16.1 cannot
express (GPT-NeoX's parallel residual, a sliding window shorter than the sequence, Llama-3 RoPE
scaling with non-default frequency factors, ...) raises :class:`ConfigError` naming the field.

How a config and ``config.json`` interact (``model.path=<HF dir>``): the architecture fields
(:data:`ARCH_FIELDS`) come from ``config.json``. A field left at the schema default is taken
from it silently; a field set to anything else must agree with it, or the run stops naming both
values (so ``model=gpt_tiny``'s ``ffn_hidden_size: 256`` cannot silently become a different
model). Training fields (seq_length, dropout, precision, ...) stay the config's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional

from nemo_rlhf.config.schema import ModelConfig
from nemo_rlhf.errors import ConfigError

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox")

ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "position_embedding_type", "normalization", "activation", "add_bias_linear", "add_qkv_bias",
               "layernorm_epsilon", "rotary_base", "rotary_percent", "rope_scaling", "rope_scaling_factor",
               "share_embeddings_and_output_weights", "vocab_size", "max_position_embeddings", "parallel_residual")

_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
           "relu": "relu", "silu": "silu", "swish": "silu"}
_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def is_hf_dir(path) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_hf_config(path) -> Dict[str, Any]:
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: cannot read the Hugging Face config ({e})") from None


def _rope(hf: Dict[str, Any], where: str) -> Dict[str, Any]:
    """RoPE fields from transformers 5 ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    src = params if params.get("rope_type", "default") != "default" else scaling
    out = {"rotary_base": float(theta), "rope_scaling": None, "rope_scaling_factor": 8.0}
    if rope_type == "default":
        return out
    if rope_type == "linear":
        return dict(out, rope_scaling="linear", rope_scaling_factor=float(src["factor"]))
    if rope_type == "llama3":
        # megatron-core 0.16.1 hard-codes the other llama3 parameters: they must match
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in fixed.items():
            if key in src and float(src[key]) != value:
                raise ConfigError(f"{where}: rope llama3 {key}={src[key]} is not supported "
                                  f"(megatron-core 0.16.1 implements only {key}={value})")
        return dict(out, rope_scaling="llama3", rope_scaling_factor=float(src["factor"]))
    raise ConfigError(f"{where}: rope_type={rope_type!r} is not supported (default, linear, llama3 are)")


def _gpt2(hf, where):
    act = hf.get("activation_function", "gelu_new")
    if act not in _HF_ACT:
        raise ConfigError(f"{where}: activation_function={act!r} is not supported")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            raise ConfigError(f"{where}: {key}={hf[key]} is not supported (only {ok})")
    h = hf["n_embd"]
    return dict(num_layers=hf["n_layer"], hidden_size=h, num_attention_heads=hf["n_head"], num_query_groups=None,
                ffn_hidden_size=hf.get("n_inner") or 4 * h, position_embedding_type="learned_absolute",
                normalization="LayerNorm", activation=_HF_ACT[act], add_bias_linear=True, add_qkv_bias=False,
                layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5), rotary_base=10000.0, rotary_percent=1.0,
                rope_scaling=None, rope_scaling_factor=8.0,
                share_embeddings_and_output_weights=hf.get("tie_word_embeddings", True),
                vocab_size=hf["vocab_size"], max_position_embeddings=hf["n_positions"])


def _llama_like(hf, where):
    mt = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act not in _GATED:
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported for {mt} (silu, gelu are)")
    h, nh = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, h // nh):
        raise ConfigError(f"{where}: head_dim={hf['head_dim']} != hidden_size / num_attention_heads is not supported")
    if hf.get("pretraining_tp", 1) != 1:
        raise ConfigError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not supported (only 1)")
    window = hf.get("sliding_window")
    if mt == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window is not None and window < hf.get("max_position_embeddings", 0):
        raise ConfigError(f"{where}: sliding_window={window} is not supported (megatron's local attention has "
                          f"no sliding window); only a window >= max_position_embeddings or null")
    attention_bias = hf.get("attention_bias", False)
    mlp_bias = hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise ConfigError(f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
                          f"(megatron's add_bias_linear covers both)")
    return dict(num_layers=hf["num_hidden_layers"], hidden_size=h, num_attention_heads=nh,
                num_query_groups=hf.get("num_key_value_heads") or nh, ffn_hidden_size=hf["intermediate_size"],
                position_embedding_type="rope", normalization="RMSNorm", activation=_GATED[act],
                add_bias_linear=bool(attention_bias), add_qkv_bias=mt == "qwen2" or bool(attention_bias),
                layernorm_epsilon=hf.get("rms_norm_eps", 1e-6), rotary_percent=1.0,
                share_embeddings_and_output_weights=hf.get("tie_word_embeddings", False),
                vocab_size=hf["vocab_size"], max_position_embeddings=hf.get("max_position_embeddings"),
                **_rope(hf, where))


def _gpt_neox(hf, where):
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACT:
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported")
    if not hf.get("attention_bias", True):
        raise ConfigError(f"{where}: attention_bias=false is not supported for gpt_neox")
    rope = _rope(hf, where)
    pct = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("rotary_pct", 1.0))
    return dict(num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                num_attention_heads=hf["num_attention_heads"], num_query_groups=None,
                ffn_hidden_size=hf["intermediate_size"], position_embedding_type="rope", normalization="LayerNorm",
                activation=_HF_ACT[act], add_bias_linear=True, add_qkv_bias=False,
                layernorm_epsilon=hf.get("layer_norm_eps", 1e-5), rotary_percent=float(pct),
                share_embeddings_and_output_weights=hf.get("tie_word_embeddings", False),
                parallel_residual=bool(hf.get("use_parallel_residual", True)),
                vocab_size=hf["vocab_size"], max_position_embeddings=hf.get("max_position_embeddings"), **rope)


_FROM_HF = {"gpt2": _gpt2, "llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like,
            "gpt_neox": _gpt_neox}


def arch_fields_from_hf(hf: Dict[str, Any], where: str = "config.json") -> Dict[str, Any]:
    """The :data:`ARCH_FIELDS` values that reproduce the HF model."""
    mt = hf.get("model_type")
    if mt not in _FROM_HF:
        raise ConfigError(f"{where}: model_type={mt!r} is not supported for import "
                          f"(decoder-only types: {', '.join(SUPPORTED)}; T5 is an encoder-decoder)")
    try:
        return _FROM_HF[mt](hf, where)
    except KeyError as e:
        raise ConfigError(f"{where}: required field {e.args[0]!r} is missing for model_type={mt}") from None


def model_config_from_hf(path, base: Optional[ModelConfig] = None) -> ModelConfig:
    """``base`` (default: the schema defaults) with its architecture taken from ``path``/config.json.
    A field of ``base`` that is neither the schema default nor the HF value raises, naming both."""
    base = base or ModelConfig()
    where = str(Path(path) / "config.json")
    fields = arch_fields_from_hf(read_hf_config(path), where)
    defaults = ModelConfig()
    conflicts = []
    for key, value in fields.items():
        mine = getattr(base, key)
        if mine != getattr(defaults, key) and mine != value:
            conflicts.append(f"model.{key}={mine!r} (config.json says {value!r})")
    if conflicts:
        raise ConfigError(f"model.path={path} is a Hugging Face model whose config.json disagrees with "
                          f"{'; '.join(conflicts)}. Remove these settings (the architecture comes from "
                          f"config.json) or fix them")
    if fields.get("max_position_embeddings") is not None and fields["max_position_embeddings"] < base.seq_length:
        if fields["position_embedding_type"] == "learned_absolute":
            raise ConfigError(f"model.seq_length={base.seq_length} exceeds the {fields['max_position_embeddings']} "
                              f"learned positions of {where}")
        fields["max_position_embeddings"] = None   # RoPE extrapolates; the table size is only a hint
    return dataclasses.replace(base, **fields)


def hf_config_from_model(model: ModelConfig, vocab_size: int, template: Optional[Dict[str, Any]] = None,
                         **extra) -> Dict[str, Any]:
    """A ``config.json`` dict for ``model``. With ``template`` (the imported model's config.json)
    its model_type and unrelated fields are kept; otherwise the type is derived from the layout:
    learned positions + LayerNorm -> gpt2, RoPE + RMSNorm + swiglu -> llama (qwen2 with a QKV bias
    only), RoPE + LayerNorm + biases -> gpt_neox."""
    m = model
    if template is not None:
        mt = template.get("model_type")
    elif m.position_embedding_type == "learned_absolute" and m.normalization == "LayerNorm" and m.add_bias_linear:
        mt = "gpt2"
    elif m.position_embedding_type == "rope" and m.normalization == "RMSNorm" and m.activation in ("swiglu", "geglu"):
        mt = "qwen2" if (m.add_qkv_bias and not m.add_bias_linear) else "llama"
    elif m.position_embedding_type == "rope" and m.normalization == "LayerNorm" and m.add_bias_linear \
            and m.activation in ("gelu", "gelu_tanh", "relu"):
        mt = "gpt_neox"
    else:
        raise ConfigError(f"no Hugging Face architecture matches model.position_embedding_type="
                          f"{m.position_embedding_type}, model.normalization={m.normalization}, "
                          f"model.activation={m.activation}, model.add_bias_linear={m.add_bias_linear}")
    if mt not in SUPPORTED:
        raise ConfigError(f"export to model_type={mt!r} is not supported ({', '.join(SUPPORTED)} are)")
    if m.parallel_residual and mt != "gpt_neox":
        raise ConfigError(f"model.parallel_residual=true has no {mt} form in Hugging Face (gpt_neox has it)")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    positions = m.max_position_embeddings or m.seq_length
    rev_act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu", "swiglu": "silu",
               "geglu": "gelu"}
    cfg: Dict[str, Any] = {k: v for k, v in (template or {}).items()
                           if k not in ("architectures", "transformers_version", "dtype", "torch_dtype")}
    cfg.update(model_type=mt, vocab_size=vocab_size, tie_word_embeddings=m.share_embeddings_and_output_weights,
               dtype="float32")
    if mt == "gpt2":
        cfg.update(architectures=["GPT2LMHeadModel"], n_layer=m.num_layers, n_embd=m.hidden_size,
                   n_head=m.num_attention_heads, n_inner=ffn, n_positions=positions,
                   activation_function=rev_act[m.activation], layer_norm_epsilon=m.layernorm_epsilon,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        rope: Dict[str, Any] = {"rope_theta": m.rotary_base, "rope_type": "default"}
        if m.rope_scaling == "linear":
            rope.update(rope_type="linear", factor=m.rope_scaling_factor)
        elif m.rope_scaling == "llama3":
            rope.update(rope_type="llama3", factor=m.rope_scaling_factor, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192)
        # transformers 5 reads rope_parameters; 4.x reads rope_theta / rope_scaling (written too)
        cfg["rope_theta"] = m.rotary_base
        cfg["rope_scaling"] = None if rope["rope_type"] == "default" else \
            {k: v for k, v in rope.items() if k != "rope_theta"}
        cfg.update(hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                   num_attention_heads=m.num_attention_heads, intermediate_size=ffn,
                   max_position_embeddings=max(positions, cfg.get("max_position_embeddings") or 0),
                   hidden_act=rev_act[m.activation], attention_dropout=0.0, rope_parameters=rope)
        if mt == "gpt_neox":
            cfg.update(rotary_pct=m.rotary_percent, rotary_emb_base=m.rotary_base)
            cfg["rope_parameters"]["partial_rotary_factor"] = m.rotary_percent
            cfg.update(architectures=["GPTNeoXForCausalLM"], layer_norm_eps=m.layernorm_epsilon,
                       use_parallel_residual=m.parallel_residual, attention_bias=True, hidden_dropout=0.0)
        else:
            if m.rotary_percent != 1.0:
                raise ConfigError(f"model.rotary_percent={m.rotary_percent} cannot be exported as {mt}")
            cfg.update(architectures=[{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}[mt]],
                       num_key_value_heads=m.num_query_groups or m.num_attention_heads,
                       head_dim=m.hidden_size // m.num_attention_heads, rms_norm_eps=m.layernorm_epsilon)
            if mt == "llama":
                cfg.update(attention_bias=m.add_bias_linear, mlp_bias=m.add_bias_linear)
    cfg.update(extra)
    # what we export must import back to the same model: the round trip is the check
    back = arch_fields_from_hf(cfg, "exported config")
    for key, value in back.items():
        mine = getattr(m, key) if key != "vocab_size" else vocab_size
        if key == "max_position_embeddings" or key == "num_query_groups":
            continue
        if key == "ffn_hidden_size":
            mine = ffn
        if mine != value:
            raise ConfigError(f"model.{key}={mine!r} cannot be expressed in a {mt} config.json (it would read {value!r})")
    return cfg
