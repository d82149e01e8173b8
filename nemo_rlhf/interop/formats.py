"""Which checkpoint format a ``model.path`` is, and how its architecture enters the run config.

    nemo_rlhf dist checkpoint   a directory with nemo_rlhf_meta.json (checkpoint/dist_ckpt.py)
    Hugging Face model          a directory with config.json (+ safetensors / .bin) -> hf_gpt.py
    NeMo 1.x archive            a ``.nemo`` file (tar), or its extracted directory with
                                model_config.yaml                                   -> nemo.py
    NeMo 2 / Megatron-LM        a dist_checkpointing directory (metadata.json), or a NeMo 2
                                checkpoint whose weights/ holds one; keys prefixed ``module.`` or
                                ``model.`` are matched to ours                      -> nemo.py

:func:`resolve_model_config` is called once per run (train.run): for an HF directory or a
``.nemo`` file the architecture fields come from the checkpoint's own config, and a field the
user set differently raises (see :mod:`nemo_rlhf.interop.hf_config`). Which loader fills a model
from each format is the table in :mod:`nemo_rlhf.weights` (above both checkpoint/ and interop/).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from nemo_rlhf.config.schema import ModelConfig
from nemo_rlhf.errors import ConfigError
from nemo_rlhf.interop import import_hf
from nemo_rlhf.interop.hf_config import model_config_from_hf, read_hf_config
from nemo_rlhf.interop.hf_t5 import import_hf_t5, model_config_from_hf_t5_dir
from nemo_rlhf.interop.nemo import model_config_from_nemo1

# encoder-decoder HF types are imported by the T5 interop (nemo_rlhf/interop/hf_t5.py)
SEQ2SEQ_TYPES = ("t5", "mt5", "umt5")


def checkpoint_format(path) -> str:
    """nemo_rlhf | hf | nemo1 | mcore (NeMo 2 / Megatron dist checkpoint) | unknown."""
    p = Path(path)
    if p.is_file() and p.suffix == ".nemo":
        return "nemo1"
    if not p.is_dir():
        return "unknown"
    if (p / "nemo_rlhf_meta.json").is_file():
        return "nemo_rlhf"
    if (p / "config.json").is_file():
        return "hf"
    if (p / "model_config.yaml").is_file():
        return "nemo1"
    if (p / "metadata.json").is_file() or (p / "weights" / "metadata.json").is_file():
        return "mcore"
    return "unknown"


def load_hf(path, chunks, skip_prefixes=()):
    """Fill ``chunks`` (GPT or T5) from the Hugging Face directory ``path``: the loader of the
    "hf" format in :data:`nemo_rlhf.weights.LOADERS`."""
    hf = read_hf_config(path)
    mt = hf.get("model_type")
    if mt == "t5":
        import_hf_t5(path, chunks, model_config_from_hf_t5_dir(path, ModelConfig(seq_length=1)),
                     skip_prefixes=tuple(skip_prefixes))
        return
    if mt in SEQ2SEQ_TYPES:
        raise ConfigError(f"{path} is a {mt} (encoder-decoder) model: only t5 is supported")
    # the chunks were built from the resolved run config; the defaults + config.json describe the
    # same architecture (training fields do not matter for the weights)
    model = model_config_from_hf(path, ModelConfig(seq_length=1))
    import_hf(path, chunks, model, skip_prefixes=tuple(skip_prefixes))


def resolve_model_config(model: ModelConfig) -> ModelConfig:
    """``model`` with the architecture of the checkpoint at ``model.path`` when that is a Hugging
    Face directory or a NeMo 1.x archive (other formats carry no architecture we read)."""
    if model.path is not None and getattr(model, "arch", "gpt") == "t5" and checkpoint_format(model.path) == "hf":
        return model_config_from_hf_t5_dir(model.path, model)
    if model.path is None or getattr(model, "arch", "gpt") != "gpt":
        return model
    fmt = checkpoint_format(model.path)
    if fmt == "hf":
        mt = read_hf_config(model.path).get("model_type")
        if mt in SEQ2SEQ_TYPES:
            raise ConfigError(f"model.path={model.path} is a {mt} (encoder-decoder) model: set model.arch=t5")
        return model_config_from_hf(model.path, model)
    if fmt == "nemo1":
        return model_config_from_nemo1(model.path, model)
    return model


def resolve_run_config(rcfg):
    """The run config with :func:`resolve_model_config` applied to ``rcfg.model``."""
    model = resolve_model_config(rcfg.model)
    return rcfg if model is rcfg.model else dataclasses.replace(rcfg, model=model)
