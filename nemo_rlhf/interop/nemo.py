"""NeMo checkpoints: NeMo 1.x ``.nemo`` archives and NeMo 2 / Megatron-LM distributed checkpoints.

NeMo 1.x ``.nemo`` (a tar, optionally gzipped; NeMo's ``SaveRestoreConnector`` layout)::

    model_config.yaml                   the model's config (num_layers, hidden_size, ...)
    model_weights.ckpt                  TP=PP=1: torch state dict
    mp_rank_00/model_weights.ckpt ...   TP>1, PP=1: one shard per tensor-parallel rank
    tp_rank_00_pp_rank_000/...          PP>1: one per (TP, PP) rank, layer numbers local to the stage
    *.model / tokenizer files           referenced from model_config.yaml as ``nemo:<file>``

Only megatron-core GPT models (``mcore_gpt: true``: keys ``model.embedding...``,
``model.decoder.layers.N...``, local or Transformer Engine names) are read; the pre-mcore
``language_model.encoder`` layout raises naming ``mcore_gpt``. Shards are merged to full tensors
(column-parallel on dim 0, row-parallel on dim 1, SwiGLU ``linear_fc1`` per half) and then
resharded to the current layout by :func:`nemo_rlhf.interop.hf_gpt.load_full_state`.

NeMo 2 (``<ckpt>/weights`` + ``<ckpt>/context``) and Megatron-LM save megatron-core
``dist_checkpointing`` directories like ours, with the sharded keys prefixed ``module.`` /
``model.`` (or not at all): :func:`load_mcore_dist` loads them through our model's own sharded
state dict under that prefix, resharding to any TP/PP. They carry no architecture we read: the run
config must describe the model (dist_checkpointing names any tensor whose shape differs).
"""
from __future__ import annotations

import dataclasses
import io
import re
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from nemo_rlhf.config.schema import GATED_ACTIVATIONS, ModelConfig
from nemo_rlhf.errors import CheckpointError, ConfigError
from nemo_rlhf.interop.hf_gpt import load_full_state
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


class _Archive:
    """Read members of a .nemo tar or of its extracted directory."""

    def __init__(self, path):
        self.path = Path(path)
        self._tar = None
        if self.path.is_file():
            try:
                self._tar = tarfile.open(self.path, "r:*")
            except tarfile.TarError as e:
                raise CheckpointError(f"{self.path}: not a .nemo archive ({e})") from None
            self._names = {m.name.lstrip("./"): m for m in self._tar.getmembers() if m.isfile()}
        else:
            self._names = {str(p.relative_to(self.path)): p for p in self.path.rglob("*") if p.is_file()}

    def names(self):
        return sorted(self._names)

    def read(self, name: str) -> bytes:
        if name not in self._names:
            raise CheckpointError(f"{self.path}: no {name} inside (has {self.names()[:10]})")
        if self._tar is None:
            return self._names[name].read_bytes()
        return self._tar.extractfile(self._names[name]).read()


def read_nemo1_config(path) -> Dict[str, Any]:
    import yaml

    cfg = yaml.safe_load(_Archive(path).read("model_config.yaml"))
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
    for key, ok in (("transformer_block_type", "pre_ln"), ("apply_query_key_layer_scaling", False)):
        if cfg.get(key, ok) not in (ok, None):
            raise ConfigError(f"{where}: {key}={cfg[key]} is not supported (only {ok})")
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


def _strip(sd: Dict[str, Any], where: str) -> StateDict:
    """``model.``-prefixed mcore keys -> our local-spec names (TE fused norm names unfused)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("_extra_state") or not isinstance(v, torch.Tensor):
            continue
        if not k.startswith("model."):
            raise CheckpointError(f"{where}: unexpected key {k!r} (NeMo GPT keys start with 'model.')")
        k = k[len("model."):]
        if k.startswith("language_model."):
            raise CheckpointError(f"{where}: pre-megatron-core key {k!r} (mcore_gpt: false) is not supported")
        m = re.match(r"(decoder\.layers\.\d+\.)(.*)", k)
        if m and m.group(2) in _TE_NORMS:
            k = m.group(1) + _TE_NORMS[m.group(2)]
        out[k] = v
    return out


def read_nemo1_weights(path) -> Tuple[Dict[str, Any], StateDict]:
    """(model_config.yaml, full tensors with our names) of a .nemo file or directory."""
    arc = _Archive(path)
    cfg = read_nemo1_config(path)
    tp, pp = int(cfg.get("tensor_model_parallel_size", 1)), int(cfg.get("pipeline_model_parallel_size", 1))
    gated = _ACT.get(cfg.get("activation", "gelu")) in GATED_ACTIVATIONS

    def load(name):
        obj = torch.load(io.BytesIO(arc.read(name)), map_location="cpu", weights_only=True)
        return _strip(obj.get("state_dict", obj), f"{path}:{name}")

    def stage(pp_rank):
        if tp == 1 and pp == 1:
            return load("model_weights.ckpt")
        if pp == 1:
            return merge_tp_shards([load(f"mp_rank_{r:02d}/model_weights.ckpt") for r in range(tp)], gated)
        return merge_tp_shards([load(f"tp_rank_{r:02d}_pp_rank_{pp_rank:03d}/model_weights.ckpt")
                                for r in range(tp)], gated)

    full: StateDict = {}
    offset = 0
    for p in range(pp):
        part = stage(p)
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


def load_nemo1(path, chunks, skip_prefixes=()):
    from megatron.core import parallel_state as ps

    cfg, full = read_nemo1_weights(path)
    model = dataclasses.replace(ModelConfig(seq_length=1), **arch_fields_from_nemo1(cfg, str(path)))
    # NeMo pads the vocabulary to make_vocab_size_divisible_by * TP; ours may be padded differently:
    # zero-pad, or cut rows that are all zero (padding), to the model's rows
    tp = ps.get_tensor_model_parallel_world_size()
    rows = {name: p.shape[0] * tp for chunk in chunks for name, p in unwrap(chunk).named_parameters()
            if name in ("embedding.word_embeddings.weight", "output_layer.weight")}
    target = next(iter(rows.values()), None)
    for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if k in full and target is not None and full[k].shape[0] != target:
            t = full[k]
            if t.shape[0] < target:
                full[k] = torch.cat([t, t.new_zeros(target - t.shape[0], *t.shape[1:])])
            elif bool(t[target:].abs().sum() == 0):
                full[k] = t[:target]
            else:
                raise CheckpointError(f"{path}: {k} has {t.shape[0]} rows, more than the model's {target}")
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


def load_mcore_dist(path, chunks, skip_prefixes=()):
    """Weights of a NeMo 2 / Megatron-LM dist checkpoint into ``chunks`` (any TP/PP)."""
    from megatron.core import dist_checkpointing

    wdir = _weights_dir(path)
    available = set(dist_checkpointing.load_tensors_metadata(str(wdir)))
    prefix = detect_prefix(available)
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
