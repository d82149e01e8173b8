"""Tiny random-weight Hugging Face models (built locally with transformers, no downloads) and the
multi-rank interop checks run inside parallel_checks.py's single torchrun launch:

  hf_tp2   each architecture imported at TP=2: logits equal transformers' (computed from the
           in-memory HF model on rank 0); export gathered from TP=2 equals the original tensors
  hf_pp2   imported at PP=2 and exported again (gathered over the stages): equals the original

The unit tests (tests/unit/test_hf_interop.py) use the same factory at TP=1.
"""
from __future__ import annotations

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
            ("hf_pp2", lambda: layout(ParallelConfig(pipeline_model_parallel_size=2), "pp2", logits=False))]
