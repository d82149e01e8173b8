"""Convert checkpoints ahead of time (for large models; small ones load directly with model.path=).

Import (Hugging Face directory / NeMo file -> nemo_rlhf megatron dist checkpoint):

    python scripts/convert_checkpoint.py --from-hf path/to/hf_model --to ckpt/llama
    python scripts/convert_checkpoint.py --from-nemo model.nemo --to ckpt/nemo_model
    torchrun --nproc-per-node 4 scripts/convert_checkpoint.py --from-hf DIR --to OUT --tp 2 --pp 2

  writes OUT/step_0000000/ (dist_checkpointing, plus the tokenizer files) and OUT/model.yaml (the
  architecture as a conf/model/ group file). The checkpoint reshards on load, so a conversion at
  TP=PP=1 loads at any layout; --tp/--pp (with as many torchrun processes) only split the work
  and memory of the conversion itself. Train from it with

    python -m nemo_rlhf.train --config-name sft_tiny model.path=OUT/step_0000000 <model.* from OUT/model.yaml>

Export (nemo_rlhf checkpoint -> Hugging Face directory that AutoModelForCausalLM loads):

    python scripts/convert_checkpoint.py --from-ckpt runs/x/checkpoints/step_0000100 --to-hf out/hf \\
        [--source-hf path/to/original_hf_model]

  the architecture comes from the checkpoint's saved config; --source-hf (the model it was
  imported from) keeps that model's config.json fields and tokenizer files.

Architectures: gpt2, llama, mistral, qwen2, gpt_neox (decoder-only, nemo_rlhf.interop.hf_gpt).
Encoder-decoder T5 models belong to nemo_rlhf.interop.hf_t5 (the branch for them is marked in
import_checkpoint below). Unsupported architectures or config fields stop with a message naming them.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path


def _fail(msg: str) -> None:
    print(f"convert_checkpoint: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _model_yaml(model) -> str:
    from omegaconf import OmegaConf

    fields = {k: v for k, v in dataclasses.asdict(model).items() if k != "path"}
    return "# written by scripts/convert_checkpoint.py: the imported architecture\n" + OmegaConf.to_yaml(fields)


def import_checkpoint(args) -> Path:
    from nemo_rlhf.checkpoint import save_checkpoint
    from nemo_rlhf.config.schema import ModelConfig, ParallelConfig
    from nemo_rlhf.interop import TOKENIZER_FILES
    from nemo_rlhf.interop.formats import checkpoint_format, resolve_model_config
    from nemo_rlhf.models.gpt import build_gpt_chunks
    from nemo_rlhf.parallel import init_distributed, initialize_model_parallel
    from nemo_rlhf.weights import load_weights

    src = Path(args.from_hf or args.from_nemo)
    fmt = checkpoint_format(src)
    if fmt not in ("hf", "nemo1"):
        _fail(f"{src} is not a Hugging Face directory (config.json) or a .nemo file")
    if fmt == "hf":
        from nemo_rlhf.interop.hf_config import read_hf_config

        if read_hf_config(src).get("model_type") in ("t5", "mt5", "umt5"):
            # T5 (encoder-decoder): converted by nemo_rlhf.interop.hf_t5 when that module is present
            _fail(f"{src} is an encoder-decoder (T5) model: convert it with model.arch=t5 support "
                  f"(nemo_rlhf.interop.hf_t5)")
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    env = init_distributed()
    initialize_model_parallel(parallel, seed=0)
    model = resolve_model_config(ModelConfig(path=str(src), seq_length=args.seq_length, transformer_impl="local"))
    if model.vocab_size is None:   # .nemo: the embedding rows of the checkpoint
        from nemo_rlhf.interop.nemo import read_nemo1_weights

        model = dataclasses.replace(model, vocab_size=read_nemo1_weights(src)[1]["embedding.word_embeddings.weight"].shape[0])
    chunks = build_gpt_chunks(model, parallel, model.vocab_size)
    load_weights(src, chunks, skip_prefixes=())
    out = Path(args.to)
    from omegaconf import OmegaConf

    from nemo_rlhf.config.schema import RunConfig

    run_yaml = OmegaConf.to_yaml(OmegaConf.structured(dataclasses.replace(RunConfig(), model=model, parallel=parallel)))
    path = save_checkpoint(out, 0, chunks, config_yaml=run_yaml)
    if env.rank == 0:
        (out / "model.yaml").write_text(_model_yaml(model))
        if src.is_dir():
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, path / name)
        print(f"converted {src} ({fmt}) -> {path}\n  architecture: {out / 'model.yaml'}\n"
              f"  use: model.path={path} with the model.* values of model.yaml")
    return path


def export_checkpoint(args) -> Path:
    from omegaconf import OmegaConf

    from nemo_rlhf.checkpoint import load_own_weights, read_meta
    from nemo_rlhf.config.schema import ParallelConfig
    from nemo_rlhf.data.tokenizers import has_tokenizer, load_tokenizer, tokenizer_for
    from nemo_rlhf.interop import export_hf
    from nemo_rlhf.models.gpt import build_gpt_chunks
    from nemo_rlhf.parallel import init_distributed, initialize_model_parallel
    from nemo_rlhf.recipes.registry import to_run_config
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    ckpt = Path(args.from_ckpt)
    meta = read_meta(ckpt)
    if not meta.get("config"):
        _fail(f"{ckpt} has no saved config in nemo_rlhf_meta.json: cannot tell its architecture")
    rcfg = to_run_config(OmegaConf.create(meta["config"]))
    model = dataclasses.replace(rcfg.model, transformer_impl="local", path=None)
    # the tokenizer the run used: the checkpoint's own files, the source model's, or the task's
    if has_tokenizer(ckpt):
        tok = load_tokenizer(ckpt)
    elif args.source_hf:
        tok = load_tokenizer(args.source_hf)
    else:
        t = rcfg.task
        tok = tokenizer_for(None, RandomWalks(t.num_nodes, t.edge_prob, t.max_length, t.num_walks, t.seed).vocab)
    init_distributed()
    initialize_model_parallel(ParallelConfig(), seed=0)
    vocab = model.vocab_size or tok.vocab_size
    chunks = build_gpt_chunks(model, ParallelConfig(), vocab)
    load_own_weights(ckpt, chunks)
    out = export_hf(args.to_hf, chunks, model, vocab, source_dir=args.source_hf, tokenizer=tok)
    print(f"exported {ckpt} -> {out} (transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face model directory (config.json + weights)")
    src.add_argument("--from-nemo", metavar="FILE", help="NeMo 1.x .nemo file (or its extracted directory)")
    src.add_argument("--from-ckpt", metavar="DIR", help="nemo_rlhf checkpoint (.../checkpoints/step_X) to export")
    ap.add_argument("--to", metavar="DIR", help="output checkpoint root for --from-hf / --from-nemo")
    ap.add_argument("--to-hf", metavar="DIR", help="output Hugging Face directory for --from-ckpt")
    ap.add_argument("--source-hf", metavar="DIR", help="with --from-ckpt: the HF model it was imported from")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the conversion (torchrun ranks)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the conversion")
    ap.add_argument("--seq-length", type=int, default=16, help="model.seq_length recorded with the import")
    args = ap.parse_args(argv)
    from nemo_rlhf.errors import CheckpointError, ConfigError
    from nemo_rlhf.parallel import destroy

    try:
        if args.from_ckpt:
            if not args.to_hf:
                _fail("--from-ckpt needs --to-hf DIR")
            export_checkpoint(args)
        else:
            if not args.to:
                _fail("--from-hf / --from-nemo need --to DIR")
            import_checkpoint(args)
    except (ConfigError, CheckpointError) as e:
        _fail(f"{type(e).__name__}: {e}")
    finally:
        destroy()


if __name__ == "__main__":
    main()
