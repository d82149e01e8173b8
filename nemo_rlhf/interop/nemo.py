"""NeMo checkpoints: NeMo 1.x ``.nemo`` archives and NeMo 2 / Megatron-LM distributed checkpoints.

NeMo 1.x ``.nemo`` (a tar, uncompressed since NeMo 1.7, gzipped before; NeMo's
``SaveRestoreConnector`` / ``NLPSaveRestoreConnector.save_to`` layout)::

    model_config.yaml                   the model's config (num_layers, hidden_size, ...)
    model_weights.ckpt                  TP=PP=1: torch state dict
    mp_rank_00/model_weights.ckpt ...   TP>1, PP=1: one shard per tensor-parallel rank
    tp_rank_00_pp_rank_000/...          PP>1: one per (TP, PP) rank, layer numbers local to the stage
    model_weights/                      or: a megatron-core dist checkpoint (torch_dist) of the
                                        model's sharded state dict, keys ``model.``-prefixed
    *.model / tokenizer files           referenced from model_config.yaml as ``nemo:<file>``

The ``.ckpt`` files are ``torch.save(model.state_dict())`` of NeMo's MegatronGPTModel: keys
``model.`` + megatron-core GPTModel's (local or Transformer Engine names) with every
``_extra_state`` entry (None from megatron's local layers, an ``io.BytesIO`` from Transformer
Engine < 2.0, a uint8 tensor from TE >= 2.0); they are read with ``weights_only=True`` allowing
``io.BytesIO`` and the extra states are dropped. Only megatron-core GPT models (``mcore_gpt: true``)
are read; the pre-mcore ``language_model.encoder`` layout raises naming ``mcore_gpt``. Shards are
merged to full tensors (column-parallel on dim 0, row-parallel on dim 1, SwiGLU ``linear_fc1`` per
half) and resharded to the current layout by :func:`nemo_rlhf.interop.hf_gpt.load_full_state`.
A ``model_weights/`` folder is loaded by :func:`load_mcore_dist` (each rank reads its shards);
:func:`read_nemo1_weights` reads it whole with megatron's ``load_plain_tensors`` (layer tensors
stacked on a leading layer axis, SwiGLU ``linear_fc1`` stored as [gate; up]).

NeMo pads the vocabulary to ``make_vocab_size_divisible_by * tensor_model_parallel_size`` rows,
initialised like the others; of the merged shards, rows beyond the model's (padded) vocabulary are
cut when they are fewer than that multiple (or all zero), otherwise the checkpoint's vocabulary is
larger than the model's and loading raises.

NeMo 2 (``<ckpt>/weights`` + ``<ckpt>/context``) and Megatron-LM save megatron-core
``dist_checkpointing`` directories like ours, with the sharded keys prefixed ``module.`` /
``model.`` (or not at all): :func:`load_mcore_dist` loads them through our model's own sharded
state dict under that prefix, resharding to any TP/PP (megatron's vocabulary tensors allow another
row count: the model's rows are read). It also loads a .nemo's ``model_weights/`` folder (prefix
``model.``) unless the model has virtual pipeline stages. NeMo 2 checkpoints carry no architecture
we read: the run config must describe the model (dist_checkpointing names any tensor whose shape
differs). Only the torch_dist backend is read: megatron-core no longer reads zarr checkpoints
(NeMo's scripts/checkpoint_converters/convert_zarr_to_torch_dist.py converts them).
"""
from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from nemo_rlhf.config.schema import GATED_ACTIVATIONS, ModelConfig
from nemo_rlhf.errors import CheckpointError, ConfigError
from nemo_rlhf.interop.hf_gpt import load_full_state
from nemo_rlhf.interop.nemo_archive import NemoArchive
from nemo_rlhf.models.gpt import unwrap

StateDict = Dict[str, torch.Tensor]

# megatron-core GPT tensors split over TP ranks, and along which dim (the rest are replicated)
_TP_DIM = [(re.compile(r"(linear_qkv|linear_fc1)\.(weight|bias)$"), 0),
           (re.compile(r"(word_embeddings|output_layer)\.weight$"), 0),
           (re.compile(r"(linear_proj|linear_fc2)\.weight$"), 1)]
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
             "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}


def tp_dim(name: str) -> Optional[int]:
    for pattern, dim in _TP_DIM:
        if pattern.search(name):
            return dim
    return None


def merge_tp_shards(shards: List[StateDict], gated: bool) -> StateDict:
    """Full tensors from the TP ranks' state dicts (same keys), pure."""
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        dim = tp_dim(name)
        if dim is None or len(parts) == 1:
            out[name] = parts[0]
        elif gated and "linear_fc1" in name:   # each rank holds [gate_r; up_r]
            halves = [p.chunk(2, dim=0) for p in parts]
            out[name] = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        else:
            out[name] = torch.cat(parts, dim=dim)
    return out


def split_tp_shards(full: StateDict, tp: int, gated: bool) -> List[StateDict]:
    """The inverse of :func:`merge_tp_shards` (what NeMo writes per TP rank), pure."""
    shards: List[StateDict] = [{} for _ in range(tp)]
    for name, t in full.items():
        dim = tp_dim(name)
        for r in range(tp):
            if dim is None:
                shards[r][name] = t
            elif gated and "linear_fc1" in name:
                shards[r][name] = torch.cat([h.chunk(tp, dim=0)[r] for h in t.chunk(2, dim=0)])
            else:
                shards[r][name] = t.chunk(tp, dim=dim)[r]
    return shards


# ---------------------------------------------------------------------------------------------
# NeMo 1.x

_NORM = {"layernorm": "LayerNorm", "LayerNorm": "LayerNorm", "rmsnorm": "RMSNorm", "RMSNorm": "RMSNorm"}
_ACT = {"gelu": "gelu", "fast-gelu": "gelu_tanh", "openai-gelu": "gelu_tanh", "relu": "relu", "swiglu": "swiglu",
        "fast-swiglu": "swiglu", "geglu": "geglu", "fast-geglu": "geglu", "silu": "silu"}


def read_nemo1_config(path) -> Dict[str, Any]:
    import yaml

    cfg = yaml.safe_load(NemoArchive(path).read("model_config.yaml"))
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: model_config.yaml is not a mapping")
    return cfg


def arch_fields_from_nemo1(cfg: Dict[str, Any], where: str) -> Dict[str, Any]:
    if not cfg.get("mcore_gpt", False):
        raise ConfigError(f"{where}: mcore_gpt={cfg.get('mcore_gpt')} (a pre-megatron-core NeMo GPT layout) is not "
                          f"supported; only mcore_gpt: true .nemo files are")
    def get(key, default=None):
        value = cfg.get(key, default)
        if value is None and default is None:
            raise ConfigError(f"{where}: model_config.yaml has no {key}")
        return value

    norm, act = get("normalization", "layernorm"), get("activation", "gelu")
    if norm not in _NORM:
        raise ConfigError(f"{where}: normalization={norm!r} is not supported ({', '.join(_NORM)})")
    if act not in _ACT:
        raise ConfigError(f"{where}: activation={act!r} is not supported ({', '.join(_ACT)})")
    pos = get("position_embedding_type", "learned_absolute")
    if pos not in ("learned_absolute", "rope"):
        raise ConfigError(f"{where}: position_embedding_type={pos!r} is not supported")
    if cfg.get("transformer_block_type", "pre_ln") not in ("pre_ln", None):
        raise ConfigError(f"{where}: transformer_block_type={cfg['transformer_block_type']} is not supported "
                          f"(only pre_ln)")
    # apply_query_key_layer_scaling (True in NeMo's megatron_gpt_config.yaml / megatron_llama_config.yaml)
    # changes no result: megatron-core's DotProductAttention divides the softmax scale by the layer
    # number and FusedScaleMaskSoftmax multiplies the scores by it again, in fp32
    bias = bool(get("bias", True))
    interp = cfg.get("seq_len_interpolation_factor")
    return dict(num_layers=get("num_layers"), hidden_size=get("hidden_size"),
                num_attention_heads=get("num_attention_heads"), num_query_groups=cfg.get("num_query_groups"),
                ffn_hidden_size=get("ffn_hidden_size"), position_embedding_type=pos, normalization=_NORM[norm],
                activation=_ACT[act], add_bias_linear=bias, add_qkv_bias=bool(cfg.get("qkv_bias", False)),
                layernorm_epsilon=float(get("layernorm_epsilon", 1e-5)), rotary_base=float(get("rotary_base", 10000)),
                rotary_percent=float(get("rotary_percentage", 1.0)),
                rope_scaling="linear" if interp else ("llama3" if cfg.get("scale_positional_embedding") else None),
                rope_scaling_factor=float(interp or cfg.get("scale_factor", 8.0)),
                share_embeddings_and_output_weights=bool(get("share_embeddings_and_output_weights", True)),
                max_position_embeddings=get("max_position_embeddings"))


def model_config_from_nemo1(path, base: ModelConfig) -> ModelConfig:
    """``base`` with the architecture of a .nemo's model_config.yaml (conflicts raise, as for HF)."""
    where = str(path)
    fields = arch_fields_from_nemo1(read_nemo1_config(path), where)
    defaults = ModelConfig()
    bad = [f"model.{k}={getattr(base, k)!r} (model_config.yaml says {v!r})" for k, v in fields.items()
           if getattr(base, k) != getattr(defaults, k) and getattr(base, k) != v]
    if bad:
        raise ConfigError(f"model.path={path} is a NeMo model whose model_config.yaml disagrees with {'; '.join(bad)}")
    if fields["max_position_embeddings"] < base.seq_length:
        raise ConfigError(f"model.seq_length={base.seq_length} exceeds max_position_embeddings="
                          f"{fields['max_position_embeddings']} of {where}")
    return dataclasses.replace(base, **fields)


def _strip(sd: Dict[str, Any], where: str, prefix: str = "model.") -> StateDict:
    """``model.``-prefixed mcore keys -> our local-spec names (TE fused norm names unfused)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("_extra_state") or not isinstance(v, torch.Tensor):
            continue
        if not k.startswith(prefix):
            raise CheckpointError(f"{where}: unexpected key {k!r} (NeMo GPT keys start with {prefix!r})")
        k = k[len(prefix):]
        if k.startswith("language_model."):
            raise CheckpointError(f"{where}: pre-megatron-core key {k!r} (mcore_gpt: false) is not supported")
        m = re.match(r"(decoder\.layers\.\d+\.)(.*)", k)
        if m and m.group(2) in _TE_NORMS:
            k = m.group(1) + _TE_NORMS[m.group(2)]
        out[k] = v
    return out


def _load_torch_file(data: bytes) -> Dict[str, Any]:
    """A NeMo ``model_weights.ckpt``: tensors, and ``_extra_state`` values that are None, uint8
    tensors or (Transformer Engine < 2.0) ``io.BytesIO`` buffers, which weights_only loading
    allows here (a byte buffer; its contents are never unpickled)."""
    with torch.serialization.safe_globals([io.BytesIO]):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def dist_backend(wdir: Path, where: str) -> None:
    """Raise unless ``wdir`` is a torch_dist megatron-core dist checkpoint (the backend megatron-core
    reads; older NeMo versions also wrote zarr)."""
    import json

    try:
        backend = json.loads((Path(wdir) / "metadata.json").read_text()).get("sharded_backend")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: unreadable dist checkpoint metadata.json ({e})") from None
    if backend != "torch_dist":
        raise CheckpointError(f"{where}: a {backend!r} dist checkpoint; megatron-core reads torch_dist only "
                              f"(convert zarr checkpoints with NeMo's "
                              f"scripts/checkpoint_converters/convert_zarr_to_torch_dist.py)")


def _plain_to_mcore(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Whole tensors of a megatron-core dist checkpoint (``load_plain_tensors``) keyed as a
    GPTModel's state dict: the layers' tensors (stacked on a leading global-layer axis under
    ``...decoder.layers.<name>``) split per layer, and SwiGLU halves saved with
    ``singleton_local_shards`` (``linear_fc1.weight_w`` / ``_v``) joined as [gate; up]."""
    out = {}
    for key, t in tensors.items():
        m = re.match(r"(.*decoder\.layers\.)(?!\d+\.)(.+)$", key)
        if m and isinstance(t, torch.Tensor):
            for i in range(t.shape[0]):
                out[f"{m.group(1)}{i}.{m.group(2)}"] = t[i]
        else:
            out[key] = t
    for key in [k for k in out if k.endswith("_w") and k[:-2] + "_v" in out]:
        out[key[:-2]] = torch.cat([out.pop(key), out.pop(key[:-2] + "_v")])
    return out


def _nemo1_shards(arc: NemoArchive, cfg: Dict[str, Any], where: str) -> List[StateDict]:
    """Per pipeline stage, the stage's tensors (TP shards merged), our names, local layer numbers."""
    tp, pp = int(cfg.get("tensor_model_parallel_size", 1)), int(cfg.get("pipeline_model_parallel_size", 1))
    gated = _ACT.get(cfg.get("activation", "gelu")) in GATED_ACTIVATIONS

    def load(name):
        obj = _load_torch_file(arc.read(name))
        return _strip(obj.get("state_dict", obj), f"{where}:{name}")

    if arc.has("model_weights/metadata.json"):      # NLPSaveRestoreConnector's dist checkpoint
        from megatron.core import dist_checkpointing

        with arc.folder("model_weights") as wdir:
            dist_backend(wdir, f"{where}:model_weights/")
            tensors = dist_checkpointing.load_plain_tensors(str(wdir))
        return [_strip(_plain_to_mcore(tensors), f"{where}:model_weights/")]
    if tp == 1 and pp == 1:
        return [load("model_weights.ckpt")]
    if pp == 1:
        return [merge_tp_shards([load(f"mp_rank_{r:02d}/model_weights.ckpt") for r in range(tp)], gated)]
    return [merge_tp_shards([load(f"tp_rank_{r:02d}_pp_rank_{p:03d}/model_weights.ckpt") for r in range(tp)], gated)
            for p in range(pp)]


def read_nemo1_weights(path) -> Tuple[Dict[str, Any], StateDict]:
    """(model_config.yaml, full tensors with our names) of a .nemo file or directory."""
    arc = NemoArchive(path)
    cfg = read_nemo1_config(path)
    full: StateDict = {}
    offset = 0
    for part in _nemo1_shards(arc, cfg, str(path)):
        layers = {int(m.group(1)) for k in part for m in [re.match(r"decoder\.layers\.(\d+)\.", k)] if m}
        for k, v in part.items():
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)", k)
            if m:
                k = f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}"
            if k == "output_layer.weight" and cfg.get("share_embeddings_and_output_weights", True):
                continue   # the last stage's copy of the tied embedding
            full[k] = v
        offset += len(layers)
    if offset != cfg.get("num_layers"):
        raise CheckpointError(f"{path}: the shards hold {offset} layers, model_config.yaml says {cfg.get('num_layers')}")
    return cfg, full


VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def fit_vocab_rows(t: torch.Tensor, rows: int, pad_multiple: int, where: str) -> torch.Tensor:
    """``t`` (a vocabulary tensor) with ``rows`` rows, the model's padded vocabulary: zero rows
    appended, or the checkpoint's padding cut. NeMo pads to make_vocab_size_divisible_by * TP
    (``pad_multiple``) rows, initialised like the others: fewer extra rows than that (or all zero)
    are padding; more mean the checkpoint's vocabulary is larger than the model's."""
    n = t.shape[0]
    if n <= rows:
        return t if n == rows else torch.cat([t, t.new_zeros(rows - n, *t.shape[1:])])
    if n - rows < pad_multiple or bool(t[rows:].abs().sum() == 0):
        return t[:rows]
    raise CheckpointError(f"{where} has {n} rows, the model {rows}: more than NeMo's vocabulary padding "
                          f"(make_vocab_size_divisible_by * tensor_model_parallel_size = {pad_multiple}) "
                          f"explains; the tokenizer has fewer tokens than the checkpoint")


def load_nemo1(path, chunks, skip_prefixes=()):
    from megatron.core import parallel_state as ps

    arc = NemoArchive(path)
    if arc.has("model_weights/metadata.json") and len(chunks) == 1:
        # NLPSaveRestoreConnector's dist checkpoint: each rank reads its own shards (megatron reshards)
        arch_fields_from_nemo1(read_nemo1_config(path), str(path))      # an mcore GPT we read
        with arc.folder("model_weights") as wdir:
            load_mcore_dist(wdir, chunks, skip_prefixes, prefix="model.")
        return
    cfg, full = read_nemo1_weights(path)
    model = dataclasses.replace(ModelConfig(seq_length=1), **arch_fields_from_nemo1(cfg, str(path)))
    # NeMo pads the vocabulary to make_vocab_size_divisible_by * TP (MegatronBaseModel._vocab_size_with_padding);
    # ours may be padded differently
    pad_multiple = int(cfg.get("make_vocab_size_divisible_by", 128)) * int(cfg.get("tensor_model_parallel_size", 1))
    tp = ps.get_tensor_model_parallel_world_size()
    rows = {name: p.shape[0] * tp for chunk in chunks for name, p in unwrap(chunk).named_parameters()
            if name in VOCAB_TENSORS}
    target = next(iter(rows.values()), None)
    for k in VOCAB_TENSORS:
        if k in full and target is not None:
            full[k] = fit_vocab_rows(full[k], target, pad_multiple, f"{path}: {k}")
    load_full_state(full, chunks, model, skip_prefixes=tuple(skip_prefixes), where=str(path))


# ---------------------------------------------------------------------------------------------
# NeMo 2 / Megatron-LM dist checkpoints

def _weights_dir(path) -> Path:
    p = Path(path)
    return p / "weights" if (p / "weights" / "metadata.json").is_file() else p


def detect_prefix(keys) -> str:
    """'' | 'module.' | 'model.' (| 'model.module.'): the prefix in front of megatron's own keys."""
    for prefix in ("module.", "model.module.", "model.", ""):
        if any(k.startswith(prefix + "embedding.") or k.startswith(prefix + "decoder.") for k in keys):
            return prefix
    raise CheckpointError(f"no megatron GPT keys (embedding.*, decoder.*) found; keys start {sorted(keys)[:5]}")


def load_mcore_dist(path, chunks, skip_prefixes=(), prefix: Optional[str] = None):
    """Weights of a NeMo 2 / Megatron-LM dist checkpoint into ``chunks`` (any TP/PP). The keys'
    prefix is detected unless given. megatron marks the vocabulary tensors ``allow_shape_mismatch``:
    a checkpoint padded to more rows (NeMo pads to make_vocab_size_divisible_by * TP of the saving
    run) loads the model's rows, one padded to fewer leaves the model's extra rows as they are."""
    from megatron.core import dist_checkpointing

    wdir = _weights_dir(path)
    dist_backend(wdir, str(path))
    available = set(dist_checkpointing.load_tensors_metadata(str(wdir)))
    prefix = detect_prefix(available) if prefix is None else prefix
    if len(chunks) != 1:
        raise CheckpointError(f"{path}: NeMo 2 / Megatron checkpoints load without virtual pipeline stages only")
    gpt = unwrap(chunks[0])
    sharded = {k: v for k, v in gpt.sharded_state_dict(prefix=prefix).items()
               if not k.startswith(tuple(skip_prefixes))}
    wanted = {sh.key for sh in sharded.values() if hasattr(sh, "key")}
    absent = sorted(k for k in wanted - available if not k.endswith("_extra_state"))
    if absent:
        raise CheckpointError(f"{path} does not match the model: missing {absent[:20]}")
    sharded = {k: v for k, v in sharded.items() if not (hasattr(v, "key") and v.key.endswith("_extra_state")
                                                        and v.key not in available)}
    loaded = dist_checkpointing.load(sharded, str(wdir))
    sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in loaded.items()}
    result = gpt.load_state_dict(sd, strict=False)
    bad = [k for k in result.missing_keys if not k.startswith(tuple(skip_prefixes)) and not k.endswith("_extra_state")]
    if bad or result.unexpected_keys:
        raise CheckpointError(f"{path} does not match the model: missing {bad}, unexpected {result.unexpected_keys}")
