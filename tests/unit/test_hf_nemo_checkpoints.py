"""NeMo checkpoints: a NeMo 1.x ``.nemo`` tar (model_config.yaml + TP- or PP-split
model_weights.ckpt, Transformer Engine key names, NeMo's TP-padded vocabulary) and a NeMo 2 style
dist checkpoint (``weights/`` with ``module.``-prefixed keys). No NeMo files can be downloaded here,
so the test writes both layouts from a megatron model it builds, then loads them through
``model.path``'s loader into a fresh model and compares logits."""
import io
import tarfile

import pytest
import torch
import yaml

from nemo_rlhf.config.schema import ConfigError, ModelConfig, ParallelConfig

VOCAB = 100
LLAMA_LIKE = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                         seq_length=16, position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
                         add_bias_linear=False, share_embeddings_and_output_weights=False, transformer_impl="local")
NEMO_CONFIG = {"mcore_gpt": True, "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
               "num_query_groups": 2, "max_position_embeddings": 16, "encoder_seq_length": 16,
               "normalization": "rmsnorm", "activation": "fast-swiglu", "bias": False,
               "position_embedding_type": "rope", "rotary_percentage": 1.0, "rotary_base": 10000,
               "layernorm_epsilon": 1e-5, "share_embeddings_and_output_weights": False,
               "make_vocab_size_divisible_by": 128, "transformer_block_type": "pre_ln",
               "tokenizer": {"library": "sentencepiece", "model": "nemo:tokenizer.model"}}
_TE = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
       "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _build(model=LLAMA_LIKE, seed=0):
    from nemo_rlhf.models.gpt import build_gpt_chunks
    from nemo_rlhf.parallel import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=seed)
    torch.manual_seed(seed)
    return build_gpt_chunks(model, ParallelConfig(), VOCAB)[0].eval()


def _logits(gpt):
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return gpt(ids, torch.arange(16).expand_as(ids), None, runtime_gather_output=True)[..., :VOCAB]


def _nemo_state(gpt, rows=256):
    """The model's tensors as NeMo 1.x mcore keys: 'model.' prefix, TE fused norm names, vocab
    padded with zero rows to make_vocab_size_divisible_by * TP."""
    out = {}
    for k, v in gpt.state_dict().items():
        if k.endswith("_extra_state"):
            continue
        layer, _, rest = k.partition(".layers.")
        if rest:
            i, _, name = rest.partition(".")
            k = f"{layer}.layers.{i}.{_TE.get(name, name)}"
        if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
            v = torch.cat([v[:VOCAB], v.new_zeros(rows - VOCAB, v.shape[1])])
        out["model." + k] = v.clone()
    return out


def _write_nemo(path, config, members):
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("model_config.yaml", yaml.safe_dump(config).encode())
        for name, sd in members.items():
            buf = io.BytesIO()
            torch.save(sd, buf)
            add(name, buf.getvalue())


def test_nemo1_tp2_archive_loads_at_tp1(tmp_path, mp):
    from nemo_rlhf.weights import load_weights
    from nemo_rlhf.interop.formats import resolve_model_config
    from nemo_rlhf.interop.nemo import split_tp_shards

    src = _build(seed=0)
    shards = split_tp_shards(_nemo_state(src), 2, gated=True)
    path = tmp_path / "llama_like.nemo"
    _write_nemo(path, {**NEMO_CONFIG, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1},
                {f"mp_rank_{r:02d}/model_weights.ckpt": shards[r] for r in range(2)})
    model = resolve_model_config(ModelConfig(path=str(path), seq_length=16, transformer_impl="local"))
    assert (model.num_query_groups, model.activation, model.normalization, model.add_bias_linear) == \
        (2, "swiglu", "RMSNorm", False)
    dst = _build(model, seed=1)
    assert float((_logits(dst) - _logits(src)).abs().max()) > 1e-2      # different before loading
    load_weights(path, [dst])
    assert float((_logits(dst) - _logits(src)).abs().max()) == 0.0


def test_nemo1_pp2_layout_merges_the_stages(tmp_path, mp):
    from nemo_rlhf.weights import load_weights

    gpt2_like = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=16,
                            transformer_impl="local")
    src = _build(gpt2_like, seed=2)
    full = _nemo_state(src, rows=128)
    stage = [{}, {}]
    for k, v in full.items():   # stage 0: embeddings + layer 0; stage 1: layer 0 (global 1) + final norm + head
        if ".layers.1." in k:
            stage[1][k.replace(".layers.1.", ".layers.0.")] = v
        elif ".layers.0." in k or "embedding" in k:
            stage[0][k] = v
        else:
            stage[1][k] = v
    stage[1]["model.output_layer.weight"] = full["model.embedding.word_embeddings.weight"]  # tied copy
    cfg = {**NEMO_CONFIG, "num_query_groups": None, "ffn_hidden_size": 128, "normalization": "layernorm",
           "activation": "gelu", "bias": True, "position_embedding_type": "learned_absolute",
           "share_embeddings_and_output_weights": True, "tensor_model_parallel_size": 1,
           "pipeline_model_parallel_size": 2}
    path = tmp_path / "extracted"
    path.mkdir()
    (path / "model_config.yaml").write_text(yaml.safe_dump(cfg))         # an extracted .nemo directory
    for p in range(2):
        (path / f"tp_rank_00_pp_rank_{p:03d}").mkdir()
        torch.save(stage[p], path / f"tp_rank_00_pp_rank_{p:03d}" / "model_weights.ckpt")
    dst = _build(gpt2_like, seed=3)
    load_weights(path, [dst])
    assert float((_logits(dst) - _logits(src)).abs().max()) == 0.0


def test_nemo1_unsupported_layouts_are_named(tmp_path):
    from nemo_rlhf.interop.nemo import arch_fields_from_nemo1

    with pytest.raises(ConfigError, match="mcore_gpt"):
        arch_fields_from_nemo1({**NEMO_CONFIG, "mcore_gpt": False}, "x.nemo")
    with pytest.raises(ConfigError, match="activation='squared-relu'"):
        arch_fields_from_nemo1({**NEMO_CONFIG, "activation": "squared-relu"}, "x.nemo")
    with pytest.raises(ConfigError, match="transformer_block_type"):
        arch_fields_from_nemo1({**NEMO_CONFIG, "transformer_block_type": "post_ln"}, "x.nemo")


def test_nemo2_dist_checkpoint_with_module_prefix(tmp_path, mp):
    from megatron.core import dist_checkpointing

    from nemo_rlhf.weights import load_weights
    from nemo_rlhf.interop.formats import checkpoint_format

    src = _build(seed=4)
    (tmp_path / "nemo2" / "weights").mkdir(parents=True)
    (tmp_path / "nemo2" / "context").mkdir()
    dist_checkpointing.save(src.sharded_state_dict(prefix="module."), str(tmp_path / "nemo2" / "weights"))
    assert checkpoint_format(tmp_path / "nemo2") == "mcore"
    dst = _build(seed=5)
    assert float((_logits(dst) - _logits(src)).abs().max()) > 1e-2
    load_weights(tmp_path / "nemo2", [dst])
    assert float((_logits(dst) - _logits(src)).abs().max()) == 0.0
