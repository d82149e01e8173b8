"""Checkpoint interop: Hugging Face model directories (decoder-only: gpt2, llama, mistral, qwen2,
gpt_neox), NeMo 1.x ``.nemo`` archives and NeMo 2 / Megatron distributed checkpoints, and the
tokenizers that come with them.

    from nemo_rlhf.interop import import_hf, export_hf, model_config_from_hf, load_tokenizer
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Optional

import torch

from nemo_rlhf.config.schema import ModelConfig
from nemo_rlhf.interop.hf_config import (ARCH_FIELDS, SUPPORTED, hf_config_from_model, is_hf_dir,
                                         model_config_from_hf, read_hf_config)
from nemo_rlhf.interop.hf_gpt import (gather_full_state, hf_to_megatron, load_full_state, megatron_to_hf,
                                      read_hf_weights)
from nemo_rlhf.interop.hf_t5 import export_hf_t5
from nemo_rlhf.logging import get_logger
from nemo_rlhf.models.gpt import padded_vocab_size

log = get_logger(__name__)

__all__ = ["ARCH_FIELDS", "SUPPORTED", "is_hf_dir", "model_config_from_hf", "read_hf_config", "import_hf",
           "export_hf", "hf_config_from_model", "gather_full_state", "load_full_state", "hf_to_megatron",
           "megatron_to_hf", "read_hf_weights", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "spiece.model", "vocab.json", "merges.txt", "generation_config.json")


def import_hf(path, chunks: List[torch.nn.Module], model: ModelConfig,
              skip_prefixes=("value_head.", "ilql_heads.", "reward_head.")) -> None:
    """Fill ``chunks`` (this rank's GPTModel chunks, any TP/PP) from the HF directory ``path``.
    ``model`` must describe the same architecture (see :func:`model_config_from_hf`)."""
    hf_cfg = read_hf_config(path)
    model_config_from_hf(path, model)   # raises if ``model`` disagrees with config.json
    full = hf_to_megatron(read_hf_weights(path), hf_cfg["model_type"], model,
                          padded_vocab_size(hf_cfg["vocab_size"], model), where=str(path))
    load_full_state(full, chunks, model, skip_prefixes=skip_prefixes, where=str(path))
    log.info("initialised weights from the Hugging Face %s model %s", hf_cfg["model_type"], path)


def export_hf(directory, chunks: List[torch.nn.Module], model: ModelConfig, vocab_size: int,
              source_dir=None, tokenizer=None, extra_config: Optional[dict] = None) -> Optional[Path]:
    """Collective: write ``directory`` as a Hugging Face model (config.json + model.safetensors +
    tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` loads. ``source_dir`` is the
    HF directory the model was imported from (its config fields and tokenizer files are kept);
    otherwise ``tokenizer.save_hf(directory)`` writes the tokenizer when it can. Rank 0 writes;
    returns the directory there, None on other ranks."""
    from safetensors.torch import save_file

    if getattr(model, "arch", "gpt") == "t5":   # encoder-decoder: AutoModelForSeq2SeqLM (interop/hf_t5.py)
        out = export_hf_t5(directory, chunks, model, vocab_size, tokenizer=tokenizer)
        if out is not None:
            _write_tokenizer(out, source_dir if source_dir is not None and is_hf_dir(source_dir) else None,
                             tokenizer, tokenizer_class="T5Tokenizer")
        return out
    full = gather_full_state(chunks, model)
    if full is None:
        return None
    template = read_hf_config(source_dir) if source_dir is not None and is_hf_dir(source_dir) else None
    extra = dict(extra_config or {})
    if tokenizer is not None:
        extra.setdefault("eos_token_id", tokenizer.eos_id)
        extra.setdefault("pad_token_id", tokenizer.pad_id)
        bos = getattr(tokenizer, "bos_id", None)
        extra.setdefault("bos_token_id", bos if bos is not None else tokenizer.eos_id)
    cfg = hf_config_from_model(model, vocab_size, template, **extra)
    tensors = megatron_to_hf(full, cfg["model_type"], model, vocab_size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(tensors.values())).dtype
    cfg["dtype"] = str(dtype).replace("torch.", "")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(directory, source_dir if template is not None else None, tokenizer)
    log.info("exported the policy as a Hugging Face %s model to %s", cfg["model_type"], directory)
    return directory


def _write_tokenizer(directory: Path, source_dir, tokenizer, tokenizer_class: str = "LlamaTokenizer") -> None:
    """The tokenizer files of an exported model: the source HF directory's when there is one, else
    the run's tokenizer's (a SentencePiece model file is copied with a tokenizer_config.json naming
    ``tokenizer_class`` and its special tokens; the character vocabulary is written as tokenizer.json)."""
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).is_file() and name != "generation_config.json":
                shutil.copy2(Path(source_dir) / name, directory / name)
    elif tokenizer is not None and hasattr(tokenizer, "save_hf"):
        tokenizer.save_hf(directory)
    elif tokenizer is not None and getattr(tokenizer, "directory", None) is not None:   # HFTokenizer
        _write_tokenizer(directory, tokenizer.directory, None)
    elif tokenizer is not None and getattr(tokenizer, "path", None) is not None:   # SentencePiece
        shutil.copy2(tokenizer.path, directory / tokenizer.path.name)
        specials = {"eos_token": tokenizer.tokens[tokenizer.eos_id], "pad_token": tokenizer.tokens[tokenizer.pad_id]}
        if tokenizer_class == "T5Tokenizer":
            specials["extra_ids"] = 0
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": tokenizer_class, **specials}, indent=2) + "\n")
