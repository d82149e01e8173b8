"""megatron-core GPT builders: TransformerConfig from our config, layer specs (Transformer Engine
when usable, local otherwise), model chunks per (virtual) pipeline stage, megatron DDP wrapping."""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from nemo_rlhf.algorithms.chunked_nll import chunked_nll
from nemo_rlhf.config.schema import ConfigError, ModelConfig, ParallelConfig
from nemo_rlhf.logging import get_logger

log = get_logger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_engine_available() -> bool:
    """TE layer specs need both the package and a CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def _activation(name: str):
    """(activation_func, gated_linear_unit) for ModelConfig.activation."""
    import torch.nn.functional as F
    from functools import partial

    table = {
        "gelu": (F.gelu, False),
        "gelu_tanh": (partial(F.gelu, approximate="tanh"), False),
        "relu": (F.relu, False),
        "silu": (F.silu, False),
        "swiglu": (F.silu, True),
        "geglu": (F.gelu, True),
        "geglu_tanh": (partial(F.gelu, approximate="tanh"), True),
    }
    return table[name]


def padded_vocab_size(vocab_size: int, model: ModelConfig) -> int:
    multiple = model.make_vocab_size_divisible_by
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_config(model: ModelConfig, parallel: ParallelConfig):
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = _DTYPES[model.precision]
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise ConfigError("model.precision=fp16 is a GPU path (CPU kernels lack fp16): use bf16 or fp32 on CPU")
    pp = parallel.pipeline_model_parallel_size
    vpp = (parallel.virtual_pipeline_model_parallel_size or 1) > 1
    activation_func, gated = _activation(model.activation)
    config = TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization=model.normalization,
        num_query_groups=model.num_query_groups,
        activation_func=activation_func,
        gated_linear_unit=gated,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        layernorm_epsilon=model.layernorm_epsilon,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=model.precision == "bf16",
        fp16=model.precision == "fp16",
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity=model.recompute_granularity,
        recompute_method="uniform" if model.recompute_granularity == "full" else None,
        recompute_num_layers=1 if model.recompute_granularity == "full" else None,
        # Loss = sum over tokens / global token count: the schedule leaves the loss unscaled and
        # finalize_model_grads divides the grads by the tokens of the whole global batch, so the
        # result is the same for any micro-batch / DP / PP split.
        calculate_per_token_loss=True,
        # PP with variable sequence lengths needs the alltoall dispatcher even for dense models.
        moe_token_dispatcher_type="alltoall",
        # Interleaved PP (VPP) also sends activations from the last stage back to the first (the
        # next model chunk), so with PP=2 both directions run between the same two ranks. There,
        # batched p2p ops and the shape handshake of variable_seq_lengths pair a send with the
        # wrong receive on gloo (measured: loss off by 0.0074 with 4 micro-batches, or a hang).
        # With VPP: fixed shapes per schedule call (the engine passes each call's activation
        # shape) and unbatched p2p, which puts the two directions on different process groups --
        # as Megatron-LM runs VPP (batch_p2p_comm = not overlap_p2p_comm).
        variable_seq_lengths=pp > 1 and not vpp,
        batch_p2p_comm=not vpp,
    )
    config.finalize_model_grads_func = finalize_model_grads
    return config


@functools.lru_cache(maxsize=None)
def _parallel_residual_layer():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    class ParallelResidualLayer(TransformerLayer):
        """GPT-NeoX's layer (Pythia, GPT-NeoX-20B): attention and MLP both read the layer input,
        out = x + attn(ln1(x)) + mlp(ln2(x)). Built from megatron's own halves: _forward_attention
        gives x + attn(ln1(x)) and _forward_mlp(x) gives x + mlp(ln2(x)); one x is taken back out."""

        def forward(self, *args, **kwargs):
            kwargs.pop("dynamic_inference_decode_only", None)
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            after_attention, context = self._forward_attention(*args, **kwargs)
            after_mlp = self._forward_mlp(x, kwargs.get("inference_context", None),
                                          padding_mask=kwargs.get("padding_mask", None))
            return after_attention + after_mlp - x, context

    return ParallelResidualLayer


def layer_spec(model: ModelConfig):
    """The decoder layer's megatron spec (Transformer Engine or local modules), with GPT-NeoX's
    parallel residual when model.parallel_residual."""
    spec = _layer_spec(model)
    if model.parallel_residual:
        from megatron.core.transformer.spec_utils import ModuleSpec

        spec = ModuleSpec(module=_parallel_residual_layer(), params=spec.params, submodules=spec.submodules,
                          metainfo=spec.metainfo)
    return spec


def resolved_transformer_impl(model: ModelConfig) -> str:
    """transformer_engine | local: what model.transformer_impl (auto: TE when usable) builds."""
    if model.transformer_impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    return model.transformer_impl


def _layer_spec(model: ModelConfig):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    impl = resolved_transformer_impl(model)
    if impl == "transformer_engine":
        if not transformer_engine_available():
            raise ConfigError("model.transformer_impl=transformer_engine needs transformer_engine and CUDA; "
                              "use model.transformer_impl=local (or auto)")
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization=model.normalization)


def build_gpt_chunks(model: ModelConfig, parallel: ParallelConfig, vocab_size: int) -> List[torch.nn.Module]:
    """GPTModel chunks owned by this rank (one, or virtual_pipeline_model_parallel_size with
    interleaving), in fp32/bf16 on the current device. Call after parallel_state is initialised.
    ``vocab_size`` is the tokenizer's; ``model.vocab_size`` (an imported checkpoint's embedding
    rows) takes precedence and must hold it."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if model.vocab_size is not None:
        if vocab_size > model.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens but model.vocab_size={model.vocab_size}")
        vocab_size = model.vocab_size
    config = transformer_config(model, parallel)
    spec = layer_spec(model)
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        vp = vp_stage if vpp > 1 else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(vocab_size, model),
            max_sequence_length=model.max_position_embeddings or model.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type,
            rotary_percent=model.rotary_percent,
            rotary_base=model.rotary_base,
            rope_scaling=model.rope_scaling == "llama3",
            rope_scaling_factor=model.rope_scaling_factor,
            seq_len_interpolation_factor=model.rope_scaling_factor if model.rope_scaling == "linear" else None,
            vp_stage=vp,
        )
        chunk.logits_chunk_tokens = model.logits_chunk_tokens      # read by gpt_forward
        if config.params_dtype != torch.float32:
            # what megatron's Float16Module does to the module it wraps: layers not built with
            # params_dtype (learned position embeddings: a torch.nn.Embedding) follow the others
            chunk.to(config.params_dtype)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


def wrap_ddp(chunks: List[torch.nn.Module], parallel: ParallelConfig) -> List[torch.nn.Module]:
    """Wrap each chunk in megatron's DistributedDataParallel (grad buffers, DP reduce)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            chunk.config, ddp_config, chunk,
            # only the first chunk's buckets can be overlapped with compute of the others
            disable_bucketing=i > 0,
        ))
    return wrapped


def gpt_forward(gpt: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None,
                inference_context=None, runtime_gather_output: Optional[bool] = None):
    """``GPTModel.forward`` that also returns the decoder's output: ``(output, hidden)``.

    ``output`` is what ``gpt(input_ids, position_ids, attention_mask, labels=labels, ...)`` returns
    (per-token NLL [B, S] with ``labels``, else logits [B, S, V]; the hidden states themselves on a
    pipeline stage without the output layer). ``hidden`` [S, B, H] is the decoder block's output
    (after the final layernorm on the last stage; sequence-sharded with sequence parallel), which
    the heads of :mod:`nemo_rlhf.models.heads` read. It runs the stages GPTModel.forward runs,
    in the same order -- ``_preprocess`` (embedding, rotary tables), ``decoder``, ``_postprocess``
    (output layer, loss) -- the split megatron-core itself drives for its fine-grained schedules
    (models/gpt/fine_grained_callables.py), so the numbers are those of ``gpt(...)`` exactly
    (tests/unit/test_reward_model.py pins that against megatron's own call)."""
    if getattr(gpt.config, "fine_grained_activation_offloading", False):
        gpt.preprocess_for_fine_grained_offloading()
    pre = gpt._preprocess(input_ids=input_ids, position_ids=position_ids, inference_context=inference_context)
    decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset, padding_mask = pre[:6]
    hidden = gpt.decoder(
        hidden_states=decoder_input, attention_mask=attention_mask, inference_context=inference_context,
        rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
        rotary_pos_cos_sin=pre[6] if len(pre) == 7 else None, sequence_len_offset=sequence_len_offset,
        padding_mask=padding_mask)
    chunk = getattr(gpt, "logits_chunk_tokens", None)
    if chunk and labels is not None and gpt.post_process and inference_context is None and not gpt.mtp_process:
        return _chunked_language_model_loss(gpt, hidden, labels, chunk), hidden
    output = gpt._postprocess(
        hidden_states=hidden, input_ids=input_ids, position_ids=position_ids, labels=labels,
        rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
        mtp_in_postprocess=gpt.mtp_process, decoder_input=decoder_input, attention_mask=attention_mask,
        sequence_len_offset=sequence_len_offset, runtime_gather_output=runtime_gather_output,
        inference_context=inference_context)
    return output, hidden


def _chunked_language_model_loss(gpt, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """What ``_postprocess`` returns with labels (per-token NLL [B, S]), from the output layer and
    megatron's vocab-parallel cross-entropy computed ``chunk`` tokens at a time
    (:mod:`nemo_rlhf.algorithms.chunked_nll`): the [S, B, V/TP] fp32 logits are never held."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    layer = gpt.output_layer
    group = layer.tp_group
    if layer.sequence_parallel:      # the output layer's own input handling, its backward included
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    s, b, h = hidden.shape
    nll = chunked_nll(hidden.reshape(s * b, h), output_weight(gpt), labels.t().reshape(-1), chunk, group)
    return nll.view(s, b).t().contiguous()


def output_weight(gpt) -> torch.Tensor:
    """The weight of the GPT's output layer: the word embeddings when tied (on the last stage,
    megatron's copy of them), else the output layer's own."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module
