"""Tiny random-weight Hugging Face models (built locally with transformers, no downloads) and the
multi-rank interop checks run inside parallel_checks.py's single torchrun launch:

  hf_tp2   each architecture imported at TP=2: logits equal transformers' (computed from the
           in-memory HF model on rank 0); export gathered from TP=2 equals the original tensors
  hf_pp2   imported at PP=2 and exported again (gathered over the stages): equals the original
  nemo_*   NeMo checkpoints written the way NeMo writes them from real megatron TP=2 / PP=2
           models, imported at TP=1 and TP=2 (see nemo_checks)

The unit tests (tests/unit/test_hf_interop.py) use the same factory at TP=1.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict

import torch

SEQ = 24
VOCAB = 200   # padded to 256 inside megatron: the import pads, the export cuts


def hf_configs() -> Dict[str, object]:
    import transformers as T

    common = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                  vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    return {
        "gpt2": T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                             eos_token_id=1, activation_function="gelu_new"),
        # GQA, tied embeddings (as Llama 3.2), Llama 3.1 RoPE scaling
        "llama": T.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=16384, tie_word_embeddings=True,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                               rope_theta=500000.0),
        "mistral": T.MistralConfig(**common, num_key_value_heads=2, max_position_embeddings=128, sliding_window=None),
        # QKV bias, linear RoPE scaling
        "qwen2": T.Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=128,
                               rope_scaling={"rope_type": "linear", "factor": 2.0}),
        # partial rotary, untied embed_out, sequential residual
        "gpt_neox": T.GPTNeoXConfig(**common, max_position_embeddings=128, rotary_pct=0.25,
                                    use_parallel_residual=False),
        # Pythia / GPT-NeoX-20B: attention and MLP in parallel on the layer input
        "pythia": T.GPTNeoXConfig(**common, max_position_embeddings=128, rotary_pct=0.25,
                                  use_parallel_residual=True),
    }


def make_hf_model(name: str, directory, seed: int = 0):
    """Save a random-weight HF model to ``directory``; returns the in-memory model (eval, fp32).
    Norm weights and all biases are random too, so a mapping that mixes them up shows."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_configs()[name], dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if n.endswith("weight") else 0.0))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(directory))
    return model


def input_ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(0))


def megatron_logits(chunk, ids) -> torch.Tensor:
    with torch.no_grad():
        out = chunk(ids, torch.arange(ids.shape[1]).expand_as(ids), None, runtime_gather_output=True)
    return out[..., :VOCAB].float()


def build_imported(path, parallel):
    """(model config, chunks) for the HF directory ``path`` at layout ``parallel``."""
    from nemo_rlhf.config.schema import ModelConfig
    from nemo_rlhf.interop import import_hf, model_config_from_hf
    from nemo_rlhf.models.gpt import build_gpt_chunks
    from tests.distributed.parallel_checks import initialize_model_parallel

    initialize_model_parallel(parallel, seed=3)
    model = model_config_from_hf(path, ModelConfig(seq_length=SEQ, transformer_impl="local"))
    chunks = [c.eval() for c in build_gpt_chunks(model, parallel, model.vocab_size)]
    import_hf(path, chunks, model)
    return model, chunks


def max_tensor_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        raise AssertionError(f"different tensors: only in one {sorted(set(a) ^ set(b))[:10]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def hf_checks(work_dir):
    """(name, fn) pairs for parallel_checks.py; every rank calls them in the same order."""
    import torch.distributed as dist

    from nemo_rlhf.config.schema import ParallelConfig
    from nemo_rlhf.interop import export_hf, read_hf_weights

    work = Path(work_dir)
    refs: Dict[str, torch.Tensor] = {}

    def prepare():
        try:
            if dist.get_rank() == 0:
                for name in hf_configs():
                    refs[name] = make_hf_model(name, work / name)(input_ids()).logits.detach()
        finally:
            dist.barrier()   # rank 1 must not wait forever if rank 0 failed

    def layout(parallel, tag, logits: bool):
        out = {}
        for name in hf_configs():
            model, chunks = build_imported(work / name, parallel)
            r = {}
            if logits:
                r["logits_max_abs_diff"] = -1.0
                got = megatron_logits(chunks[0], input_ids())
                if dist.get_rank() == 0:
                    r["logits_max_abs_diff"] = float((got - refs[name]).abs().max())
            exported = export_hf(work / f"{name}_{tag}", chunks, model, VOCAB, source_dir=work / name)
            if dist.get_rank() == 0:
                r["export_max_abs_diff"] = max_tensor_diff(read_hf_weights(exported), read_hf_weights(work / name))
            out[name] = r
        return out

    return [("hf_prepare", lambda: (prepare(), {})[1]),
            ("hf_tp2", lambda: layout(ParallelConfig(tensor_model_parallel_size=2), "tp2", logits=True)),
            ("hf_pp2", lambda: layout(ParallelConfig(pipeline_model_parallel_size=2), "pp2", logits=False))] \
        + nemo_checks(work / "nemo")


# ---------------------------------------------------------------------------------------------
# NeMo checkpoints, written as NeMo writes them from real megatron-core models at TP=2 / PP=2
#
# Where the layout comes from (NVIDIA/NeMo unless said otherwise):
#  * nemo/core/connectors/save_restore_connector.py: `self._model_config_yaml = "model_config.yaml"`,
#    `self._model_weights_ckpt = "model_weights.ckpt"`; `_save_state_dict_to_disk`: `torch.save(state_dict,
#    filepath)`; `_make_nemo_file_from_folder`: `tarfile.open(filename, "w:")` + `tar.add(source_dir, arcname=".")`.
#  * nemo/collections/nlp/parts/nlp_overrides.py, NLPSaveRestoreConnector.save_to: without dist
#    checkpointing every TP rank runs `self._save_state_dict_to_disk(model.state_dict(), mp_model_weights)`,
#    moved into the tar as `os.path.join(tmpdir, f'mp_rank_{tp_rank:02d}', self.model_weights_ckpt)`
#    (PP=1) or `f'tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}'` (PP>1); with it (mcore models),
#    `dist_ckpt_dir = ckpt_to_dir(os.path.join(dir_name, self.model_weights_ckpt))` (model_weights/),
#    `sharded_state_dict = model.sharded_state_dict()`, `checkpoint_io.save_checkpoint(sharded_state_dict,
#    dist_ckpt_dir)`; restore_from reads `tmp_model_weights_dir = os.path.splitext(tmp_model_weights_ckpt)[0]`.
#  * nemo/collections/nlp/models/language_modeling/megatron_gpt_model.py: `self.model` is the mcore
#    GPTModel, so `model.state_dict()` keys are 'model.' + GPTModel's (on_load_checkpoint: "checkpoint_state_dict
#    has "model." but module does not"); sharded_state_dict: `module_prefix = f'{prefix}model.'`,
#    `module.sharded_state_dict(prefix=module_prefix)`; its skip_fp8_load names TE's extra states
#    (`'fused_attention' in x.key and '_extra_state' in x.key`).
#  * scripts/checkpoint_converters/convert_llama_hf_to_nemo.py (mcore_gpt): `model.embedding.word_embeddings.weight`,
#    `model.decoder.layers.{l}.self_attention.linear_qkv.weight`, `...self_attention.linear_proj.weight`,
#    `...mlp.linear_fc1.weight` (= cat(gate_proj, up_proj)), `...mlp.linear_fc2.weight`,
#    `...self_attention.linear_qkv.layer_norm_weight`, `...mlp.linear_fc1.layer_norm_weight`,
#    `model.decoder.final_layernorm.weight`, `model.output_layer.weight`; convert_gpt_nemo_to_mcore.py
#    maps `linear_qkv.layer_norm_{wb}` / `linear_fc1.layer_norm_{wb}` to input_layernorm /
#    post_attention_layernorm and leaves `k.endswith('_extra_state')` entries in the mcore state dict.
#  * nemo/collections/nlp/models/language_modeling/megatron_base_model.py, _vocab_size_with_padding:
#    `multiple = make_vocab_size_divisible_by * tensor_model_parallel_size` (the padded rows are
#    initialised like the others).
#  * examples/nlp/language_modeling/conf/megatron_llama_config.yaml / megatron_gpt_config.yaml: the
#    `model:` fields NeMo writes to model_config.yaml (apply_query_key_layer_scaling: True, ...).
#  * NeMo 2: nemo/lightning/ckpt_utils.py `WEIGHTS_PATH: str = "weights"`, `CONTEXT_PATH: str = "context"`;
#    nemo/lightning/megatron_parallel.py _module_sharded_state_dict: `prefix = "".join([kwargs.pop("prefix",
#    ""), "module."])`.
#  * NVIDIA/TransformerEngine transformer_engine/pytorch/module/base.py (TE 1.x) get_extra_state:
#    `state_serialized = io.BytesIO()`, `torch.save(state, state_serialized)` (state None without fp8).
# The layer tensors come from megatron itself: the TP=2 and PP=2 models are loaded from one TP=1
# model's dist checkpoint by megatron's dist_checkpointing (megatron's own resharding), their
# `state_dict()` / `sharded_state_dict()` written as they are (local-spec `_extra_state` None
# entries included); the Transformer Engine names are megatron's own map of the local spec
# (TransformerLayerSubmodules.sharded_state_dict_keys_map) with TE 1.x's BytesIO extra states.

NEMO_VOCAB = 100      # the tokenizer's; NeMo at TP=2 pads it to 256 rows, we to 128
NEMO_SEQ = 24


def nemo_sources():
    """(our ModelConfig, the model: section NeMo writes) of the two architectures."""
    from nemo_rlhf.config.schema import ModelConfig

    llama = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                        seq_length=NEMO_SEQ, max_position_embeddings=64, position_embedding_type="rope",
                        normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                        share_embeddings_and_output_weights=False, layernorm_epsilon=1e-6, transformer_impl="local")
    gpt = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=NEMO_SEQ,
                      max_position_embeddings=64, position_embedding_type="learned_absolute", normalization="LayerNorm",
                      activation="gelu", add_bias_linear=True, share_embeddings_and_output_weights=True,
                      layernorm_epsilon=1e-5, transformer_impl="local")
    common = dict(mcore_gpt=True, micro_batch_size=4, global_batch_size=8, tensor_model_parallel_size=2,
                  pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None, encoder_seq_length=64,
                  max_position_embeddings=64, num_layers=2, hidden_size=64, num_attention_heads=4,
                  init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0, kv_channels=None,
                  apply_query_key_layer_scaling=True, make_vocab_size_divisible_by=128, pre_process=True,
                  post_process=True, persist_layer_norm=True, transformer_block_type="pre_ln", precision=32,
                  megatron_amp_O2=False, transformer_engine=True, sequence_parallel=False,
                  tokenizer={"library": "sentencepiece", "type": None, "model": "nemo:tokenizer.model",
                             "vocab_file": None, "merge_file": None})
    llama_cfg = dict(common, ffn_hidden_size=96, normalization="rmsnorm", layernorm_epsilon=1e-6, bias=False,
                     activation="fast-swiglu", position_embedding_type="rope", rotary_percentage=1.0,
                     rotary_base=10000.0, share_embeddings_and_output_weights=False, num_query_groups=2)
    gpt_cfg = dict(common, ffn_hidden_size=128, normalization="layernorm", layernorm_epsilon=1e-5, bias=True,
                   activation="gelu", position_embedding_type="learned_absolute",
                   share_embeddings_and_output_weights=True)
    return {"llama": (llama, llama_cfg), "gpt": (gpt, gpt_cfg)}


def nemo_input_ids() -> torch.Tensor:
    return torch.randint(0, NEMO_VOCAB, (2, NEMO_SEQ), generator=torch.Generator().manual_seed(4))


def nemo_logits(chunk) -> torch.Tensor:
    ids = nemo_input_ids()
    with torch.no_grad():
        out = chunk(ids, torch.arange(NEMO_SEQ).expand_as(ids), None, runtime_gather_output=True)
    return out[..., :NEMO_VOCAB].float()


def te_state_dict(sd, keys_map):
    """A local-spec ``model.``-prefixed state dict as NeMo's Transformer Engine spec writes it:
    the norms under megatron's own local->TE names (``keys_map``: TransformerLayerSubmodules.
    sharded_state_dict_keys_map of the local spec), every TE layer's ``_extra_state`` a BytesIO of
    ``torch.save(None)`` (TE 1.x without fp8), plus the fused attention's."""
    import io
    import re

    def te_extra_state():
        buf = io.BytesIO()
        torch.save(None, buf)
        return buf

    out, layers = {}, set()
    for k, v in sd.items():
        m = re.match(r"(model\.decoder\.layers\.\d+\.)(.*)", k)
        if m:
            layers.add(m.group(1))
            rest = m.group(2)
            for old, new in keys_map.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
            k = m.group(1) + rest
            if k.endswith("._extra_state"):
                v = te_extra_state()
        out[k] = v
    for layer in sorted(layers):
        out[layer + "self_attention.core_attention.fused_attention._extra_state"] = te_extra_state()
    return out


def nemo_checks(work_dir):
    """(name, fn) pairs: for each architecture, the NeMo layouts written from megatron models at
    TP=2 / PP=2 (one TP=1 model's weights) and imported at TP=1 and TP=2 through model.path's
    loader; the logits equal the TP=1 model's."""
    import json
    import shutil
    import tarfile

    import torch.distributed as dist
    import yaml

    from nemo_rlhf.config.schema import ModelConfig, ParallelConfig
    from nemo_rlhf.errors import CheckpointError

    work = Path(work_dir)

    def barrier_after(fn):
        try:
            return fn()
        finally:
            dist.barrier()

    def mkdirs(*dirs):
        if dist.get_rank() == 0:
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)

    def write_nemo(folder: Path, cfg, nemo_file: Path):
        (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
        with tarfile.open(nemo_file, "w:") as tar:      # NeMo's _make_nemo_file_from_folder
            tar.add(folder, arcname=".")

    def check(arch):
        from megatron.core import dist_checkpointing
        from megatron.core import parallel_state as ps

        from nemo_rlhf.interop.formats import resolve_model_config
        from nemo_rlhf.models.gpt import build_gpt_chunks
        from nemo_rlhf.weights import load_weights
        from tests.distributed.parallel_checks import initialize_model_parallel

        model, nemo_cfg = nemo_sources()[arch]
        src_model = dataclasses.replace(model, make_vocab_size_divisible_by=128 * 2)   # NeMo's rows at TP=2
        root = work / arch
        folders = {name: root / name for name in ("src", "local", "te", "dist", "pp", "nemo2")}
        res = {}

        # the TP=1 model: every tensor random (norms, biases and NeMo's padded vocabulary rows too)
        tp1, tp2, pp2 = (ParallelConfig(), ParallelConfig(tensor_model_parallel_size=2),
                         ParallelConfig(pipeline_model_parallel_size=2))
        initialize_model_parallel(tp1, seed=21)
        src = build_gpt_chunks(src_model, tp1, NEMO_VOCAB)[0].eval()
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in src.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1.0 + 0.1 * noise if n.endswith("norm.weight") or "layer_norm_weight" in n
                        else 0.1 * noise)
        ref = nemo_logits(src)
        mkdirs(folders["src"], folders["dist"] / "model_weights", folders["nemo2"] / "weights",
               folders["nemo2"] / "context", *[folders["local"] / f"mp_rank_{r:02d}" for r in range(2)],
               *[folders["te"] / f"mp_rank_{r:02d}" for r in range(2)],
               *[folders["pp"] / f"tp_rank_00_pp_rank_{p:03d}" for p in range(2)])
        dist.barrier()
        dist_checkpointing.save(src.sharded_state_dict(), str(folders["src"]))

        def resharded(parallel):
            """The TP=1 weights at ``parallel``, resharded by megatron's dist_checkpointing."""
            initialize_model_parallel(parallel, seed=22)
            gpt = build_gpt_chunks(src_model, parallel, NEMO_VOCAB)[0].eval()
            gpt.load_state_dict(dist_checkpointing.load(gpt.sharded_state_dict(), str(folders["src"])), strict=True)
            return gpt

        # TP=2: what each tensor-parallel rank of NeMo saves
        gpt = resharded(tp2)
        res["source_tp2_logits_max_abs_diff"] = float((nemo_logits(gpt) - ref).abs().max())
        r = ps.get_tensor_model_parallel_rank()
        sd = gpt.state_dict(prefix="model.")           # MegatronGPTModel.state_dict(): self.model's keys
        assert any(k.endswith("_extra_state") for k in sd) and "model.embedding.word_embeddings.weight" in sd
        torch.save(sd, folders["local"] / f"mp_rank_{r:02d}" / "model_weights.ckpt")
        keys_map = gpt.decoder.layers[0].submodules_config.sharded_state_dict_keys_map
        torch.save(te_state_dict(sd, keys_map), folders["te"] / f"mp_rank_{r:02d}" / "model_weights.ckpt")
        dist_checkpointing.save(gpt.sharded_state_dict(prefix="model."), str(folders["dist"] / "model_weights"))
        dist_checkpointing.save(gpt.sharded_state_dict(prefix="module."), str(folders["nemo2"] / "weights"))
        # PP=2: each pipeline stage's state dict (layer numbers local to the stage)
        gpt = resharded(pp2)
        p = ps.get_pipeline_model_parallel_rank()
        torch.save(gpt.state_dict(prefix="model."), folders["pp"] / f"tp_rank_00_pp_rank_{p:03d}" / "model_weights.ckpt")
        dist.barrier()

        archives = {"local_mp_rank.nemo": dict(nemo_cfg, transformer_engine=False),
                    "te_mp_rank.nemo": nemo_cfg,
                    "dist_model_weights.nemo": nemo_cfg,
                    "pp_tp_rank_pp_rank.nemo": dict(nemo_cfg, transformer_engine=False, tensor_model_parallel_size=1,
                                                    make_vocab_size_divisible_by=256,  # 256 rows at TP=1
                                                    pipeline_model_parallel_size=2)}
        folder_of = {"local_mp_rank.nemo": "local", "te_mp_rank.nemo": "te", "dist_model_weights.nemo": "dist",
                     "pp_tp_rank_pp_rank.nemo": "pp"}
        if dist.get_rank() == 0:
            for name, cfg in archives.items():
                write_nemo(folders[folder_of[name]], cfg, root / name)
        dist.barrier()
        paths = {name: root / name for name in archives}
        paths["dist_model_weights(extracted)"] = folders["dist"]
        paths["nemo2_module_prefix"] = folders["nemo2"]

        # read whole (convert_checkpoint.py's path): every layout gives the tensors of the TP=2 shards
        # merged; the model_weights/ folder through megatron's load_plain_tensors
        from nemo_rlhf.interop.nemo import read_nemo1_weights

        merged = read_nemo1_weights(paths["local_mp_rank.nemo"])[1]
        res["full_tensors"] = len(merged)
        for name in ("te_mp_rank.nemo", "dist_model_weights.nemo", "pp_tp_rank_pp_rank.nemo"):
            res[f"{name}_read_whole_vs_local_max_abs_diff"] = max_tensor_diff(read_nemo1_weights(paths[name])[1], merged)

        fields = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                  "position_embedding_type", "normalization", "activation", "add_bias_linear",
                  "share_embeddings_and_output_weights", "layernorm_epsilon")
        for layout, parallel in (("tp1", tp1), ("tp2", tp2)):
            for name, path in paths.items():
                initialize_model_parallel(parallel, seed=23)
                if name.startswith("nemo2"):        # no architecture we read: the run config gives it
                    m = dataclasses.replace(model, path=str(path))
                else:
                    m = resolve_model_config(ModelConfig(path=str(path), seq_length=NEMO_SEQ,
                                                         transformer_impl="local"))
                    res[f"{name}_arch_matches"] = all(getattr(m, f) == getattr(model, f) for f in fields)
                torch.manual_seed(23)
                dst = build_gpt_chunks(m, parallel, NEMO_VOCAB)[0].eval()
                res[f"{name}@{layout}_before_load_max_abs_diff"] = float((nemo_logits(dst) - ref).abs().max())
                load_weights(path, [dst])
                res[f"{name}@{layout}_logits_max_abs_diff"] = float((nemo_logits(dst) - ref).abs().max())

        # refused: 256 rows where NeMo's padding (16 * TP=2) explains at most 31 beyond our 128, i.e. a
        # tokenizer smaller than the checkpoint's vocabulary; a zarr model_weights/ folder
        if dist.get_rank() == 0:
            write_nemo(folders["local"], dict(archives["local_mp_rank.nemo"], make_vocab_size_divisible_by=16),
                       root / "vocab16.nemo")
            shutil.copytree(folders["dist"], root / "zarr")
            meta = json.loads((root / "zarr" / "model_weights" / "metadata.json").read_text())
            (root / "zarr" / "model_weights" / "metadata.json").write_text(json.dumps(dict(meta, sharded_backend="zarr")))
        dist.barrier()
        for name, expected in (("vocab16.nemo", "fewer tokens than the checkpoint"), ("zarr", "convert_zarr_to_torch_dist")):
            initialize_model_parallel(tp1, seed=23)
            m = resolve_model_config(ModelConfig(path=str(root / name), seq_length=NEMO_SEQ, transformer_impl="local"))
            try:
                load_weights(root / name, build_gpt_chunks(m, tp1, NEMO_VOCAB))
                res[f"{name}_refused"] = False
            except CheckpointError as e:
                res[f"{name}_refused"] = expected in str(e)
        return res

    return [(f"nemo_{arch}_tp2_pp2", lambda arch=arch: barrier_after(lambda: check(arch))) for arch in ("llama", "gpt")]
