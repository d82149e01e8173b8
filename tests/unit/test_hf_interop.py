"""Hugging Face decoder-only interop at TP=1 (TP=2 / PP=2: tests/distributed/hf_checks.py).

Random-weight GPT-2, Llama (GQA, tied, llama3 RoPE scaling), Mistral, Qwen2 (QKV bias, linear
RoPE scaling), GPT-NeoX (partial rotary) and Pythia (GPT-NeoX with the parallel attention + MLP
residual) models are built locally with transformers; the
imported megatron GPTModel must give the same logits, and the exported directory must reload in
transformers (``AutoModelForCausalLM.from_pretrained``, in a fresh process) with the same logits.
"""
import json
import subprocess
import sys

import pytest
import torch

from nemo_rlhf.errors import CheckpointError
from nemo_rlhf.config.schema import ConfigError, ModelConfig, ParallelConfig
from tests.distributed.hf_checks import (VOCAB, build_imported, hf_configs, input_ids, make_hf_model,
                                         max_tensor_diff, megatron_logits)

import transformers  # noqa: E402  (a test dependency: an import error fails, never skips)

ARCHS = list(hf_configs())
FP32 = 5e-6   # max |logit difference|; measured 1.2e-6 (pythia) to 2.5e-6 (llama), logits of magnitude ~3


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in ARCHS:
        model = make_hf_model(name, root / name)
        with torch.no_grad():
            out[name] = (root / name, model(input_ids()).logits)
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_imported_logits_equal_transformers(hf_models, mp, name):
    path, ref = hf_models[name]
    _, chunks = build_imported(path, ParallelConfig())
    diff = float((megatron_logits(chunks[0], input_ids()) - ref).abs().max())
    print(f"\n{name}: TP=1 max|logits - transformers| = {diff:.2e}")
    assert diff < FP32
    assert float(ref.abs().max()) > 1.0        # logits large enough for the tolerance to mean something


_RELOAD = r"""
import json, sys, torch, transformers
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        out[name] = model(ids).logits
    if (__import__("pathlib").Path(path) / "tokenizer.json").is_file():
        tok = transformers.AutoTokenizer.from_pretrained(path)
        out[name + "/tokens"] = torch.tensor(tok("b d c a", add_special_tokens=False)["input_ids"])
torch.save(out, sys.argv[3])
"""


def test_export_reloads_in_transformers_with_the_same_logits(hf_models, mp, tmp_path):
    """Import each model through load_weights (model.path's loader), export it with the tokenizer
    files, reload all exports in one fresh transformers process."""
    from nemo_rlhf.weights import load_weights
    from nemo_rlhf.data.tokenizers import load_tokenizer
    from nemo_rlhf.interop import export_hf, model_config_from_hf, read_hf_weights
    from nemo_rlhf.models.gpt import build_gpt_chunks
    from tests.unit.test_hf_tokenizers import train_bpe

    gpt2_dir = hf_models["gpt2"][0]
    train_bpe(VOCAB).save(str(gpt2_dir / "tokenizer.json"))
    (gpt2_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                "eos_token": "<eos>", "pad_token": "<pad>"}))
    ours, exported = {}, {}
    for name in ARCHS:
        src = hf_models[name][0]
        model = model_config_from_hf(src, ModelConfig(seq_length=24, transformer_impl="local"))
        chunk = build_gpt_chunks(model, ParallelConfig(), VOCAB)[0].eval()
        load_weights(src, [chunk])
        ours[name] = megatron_logits(chunk, input_ids())
        exported[name] = str(export_hf(tmp_path / name, [chunk], model, VOCAB, source_dir=src))
        assert max_tensor_diff(read_hf_weights(exported[name]), read_hf_weights(src)) == 0.0
    torch.save(input_ids(), tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", _RELOAD, json.dumps(exported), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    back = torch.load(tmp_path / "out.pt")
    for name in ARCHS:
        diff = float((back[name] - ours[name]).abs().max())
        print(f"\n{name}: exported, reloaded by transformers: max|logits diff| = {diff:.2e}")
        assert diff < FP32
    # the tokenizer files came along and mean the same ids to transformers and to us
    assert back["gpt2/tokens"].tolist() == load_tokenizer(gpt2_dir).encode("b d c a")


# --- nothing unsupported passes silently ------------------------------------------------------------

def _write_config(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def _hf_dict(name):
    return hf_configs()[name].to_dict()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bloom"}, "model_type='bloom'"),
    ({"model_type": "t5"}, "model_type='t5'"),
])
def test_unsupported_model_type_is_named(tmp_path, change, message):
    from nemo_rlhf.interop import model_config_from_hf

    with pytest.raises(ConfigError, match=message):
        model_config_from_hf(_write_config(tmp_path, {**_hf_dict("llama"), **change}))


@pytest.mark.parametrize("name, change, field", [
    ("mistral", {"sliding_window": 16}, "sliding_window"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                   "rope_theta": 1e4}}, "low_freq_factor"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type='yarn'"),
    ("llama", {"head_dim": 32}, "head_dim"),
    ("llama", {"hidden_act": "tanh"}, "hidden_act"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_field_is_named(tmp_path, name, change, field):
    from nemo_rlhf.interop import model_config_from_hf

    with pytest.raises(ConfigError, match=field):
        model_config_from_hf(_write_config(tmp_path, {**_hf_dict(name), **change}))


def test_config_fields_come_from_config_json_and_conflicts_are_named(tmp_path):
    from nemo_rlhf.interop import model_config_from_hf

    path = _write_config(tmp_path, _hf_dict("qwen2"))
    m = model_config_from_hf(path, ModelConfig(seq_length=32, hidden_dropout=0.1))
    assert (m.num_query_groups, m.activation, m.add_bias_linear, m.add_qkv_bias, m.normalization) == \
        (2, "swiglu", False, True, "RMSNorm")
    assert (m.rope_scaling, m.rope_scaling_factor, m.ffn_hidden_size, m.vocab_size) == ("linear", 2.0, 96, VOCAB)
    assert (m.seq_length, m.hidden_dropout) == (32, 0.1)            # training fields stay the config's
    with pytest.raises(ConfigError, match=r"model.ffn_hidden_size=256 \(config.json says 96\)"):
        model_config_from_hf(path, ModelConfig(ffn_hidden_size=256))
    gpt2 = _write_config(tmp_path, _hf_dict("gpt2"))
    with pytest.raises(ConfigError, match="exceeds the 64 learned positions"):
        model_config_from_hf(gpt2, ModelConfig(seq_length=100))


def test_every_hf_tensor_is_used_and_every_one_needed_is_there(hf_models):
    from nemo_rlhf.interop import hf_to_megatron, model_config_from_hf, read_hf_weights

    path = hf_models["gpt2"][0]
    model, sd = model_config_from_hf(path), read_hf_weights(path)
    assert len(hf_to_megatron(sd, "gpt2", model, 256)) == 4 + 12 * 2
    with pytest.raises(CheckpointError, match=r"not used .*transformer.h.0.attn.q_norm.weight"):
        hf_to_megatron({**sd, "transformer.h.0.attn.q_norm.weight": torch.ones(64)}, "gpt2", model, 256)
    with pytest.raises(CheckpointError, match="'transformer.ln_f.bias' is missing"):
        hf_to_megatron({k: v for k, v in sd.items() if k != "transformer.ln_f.bias"}, "gpt2", model, 256)
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        hf_to_megatron({**sd, "lm_head.weight": torch.zeros(VOCAB, 64)}, "gpt2", model, 256)


def test_qkv_packing_round_trips_and_groups_heads():
    from nemo_rlhf.interop.hf_gpt import pack_qkv, unpack_qkv

    q, k, v = torch.arange(8 * 3).view(8, 3), 100 + torch.arange(4 * 3).view(4, 3), 200 + torch.arange(4 * 3).view(4, 3)
    qkv = pack_qkv(q, k, v, heads=4, groups=2)          # head_dim 2: [q0 q1 k0 v0 | q2 q3 k1 v1]
    assert qkv[:, 0].tolist() == [0, 3, 6, 9, 100, 103, 200, 203, 12, 15, 18, 21, 106, 109, 206, 209]
    assert all(torch.equal(a, b) for a, b in zip(unpack_qkv(qkv, 4, 2), (q, k, v)))


def test_model_path_resolution_takes_the_architecture(tmp_path):
    from nemo_rlhf.interop.formats import checkpoint_format, resolve_model_config

    path = _write_config(tmp_path, _hf_dict("gpt_neox"))
    assert checkpoint_format(path) == "hf"
    m = resolve_model_config(ModelConfig(path=str(path), seq_length=32))
    assert (m.position_embedding_type, m.rotary_percent, m.share_embeddings_and_output_weights) == ("rope", 0.25, False)
    assert resolve_model_config(ModelConfig()) == ModelConfig()      # no path: untouched


def test_from_pretrained_in_the_same_process_after_megatron_init(hf_models, mp):
    """The CPU compatibility layer wraps torch factories; `with torch.device("meta")` (used by
    from_pretrained) must still see them, or non-persistent RoPE buffers come out uninitialised."""
    import torch.utils._device

    original = getattr(torch.arange, "__wrapped__", torch.arange)
    assert original in torch.utils._device._device_constructors()
    path, ref = hf_models["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        assert float((model(input_ids()).logits - ref).abs().max()) < 1e-5


def test_model_hf_config_group_takes_everything_from_config_json(hf_models):
    from nemo_rlhf.api import _compose
    from nemo_rlhf.interop.formats import resolve_run_config

    path = hf_models["mistral"][0]
    with pytest.raises(ConfigError, match=r"model.ffn_hidden_size=256 \(config.json says 96\)"):
        resolve_run_config(_compose("sft_tiny", [f"model.path={path}"]))    # gpt_tiny's own ffn size
    rcfg = resolve_run_config(_compose("sft_tiny", ["model=hf", f"model.path={path}", "model.seq_length=24"]))
    assert (rcfg.model.ffn_hidden_size, rcfg.model.num_query_groups, rcfg.model.seq_length) == (96, 2, 24)


def test_sharded_safetensors_and_pytorch_bin_files(hf_models, tmp_path):
    """The same weights from a sharded safetensors checkpoint (with its index), a pytorch_model.bin,
    and GPT-2's hub layout without the 'transformer.' prefix."""
    from safetensors.torch import load_file

    from nemo_rlhf.interop import hf_to_megatron, model_config_from_hf, read_hf_weights

    path, _ = hf_models["qwen2"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    want = load_file(str(path / "model.safetensors"))
    got = read_hf_weights(tmp_path / "sharded")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    (tmp_path / "bin").mkdir()
    torch.save(want, tmp_path / "bin" / "pytorch_model.bin")
    got = read_hf_weights(tmp_path / "bin")
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_hf_weights(tmp_path)
    gpt2_dir = hf_models["gpt2"][0]
    sd, cfg = read_hf_weights(gpt2_dir), model_config_from_hf(gpt2_dir)
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}   # GPT2Model.save_pretrained
    a, b = hf_to_megatron(sd, "gpt2", cfg, 256), hf_to_megatron(bare, "gpt2", cfg, 256)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_python_api_model_path_takes_the_checkpoint_architecture(hf_models, tmp_path):
    from nemo_rlhf.api import checkpoint_model_config, default_sft_config
    from nemo_rlhf.interop.formats import resolve_model_config

    base = default_sft_config().model                       # gpt_tiny: ffn_hidden_size 256
    m = resolve_model_config(checkpoint_model_config(base, hf_models["mistral"][0]))
    assert (m.ffn_hidden_size, m.activation, m.seq_length) == (96, "swiglu", base.seq_length)
    ours = checkpoint_model_config(base, tmp_path)           # not an HF / .nemo checkpoint: untouched
    assert ours.ffn_hidden_size == 256 and ours.path == str(tmp_path)


def test_gated_activations_are_one_list():
    """Every gated activation the model builder knows is split as gate + up by the weight maps
    (a missed one shards linear_fc1 wrongly at TP > 1) and counted twice by the planner."""
    from nemo_rlhf.config.schema import GATED_ACTIVATIONS, ModelConfig
    from nemo_rlhf.interop.hf_gpt import _is_gated_fc1
    from nemo_rlhf.models.gpt import _activation

    for name in ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu", "geglu_tanh"):
        gated = _activation(name)[1]
        assert gated == (name in GATED_ACTIVATIONS), name
        m = ModelConfig(activation=name)
        assert _is_gated_fc1("decoder.layers.0.mlp.linear_fc1.weight", m) == gated, name
