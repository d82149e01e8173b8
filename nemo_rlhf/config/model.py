"""The model's schema: a megatron-core GPT or T5 (``model:`` in every config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nemo_rlhf.config.checks import _positive, _require


GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
"""model.activation values with a gated linear unit: linear_fc1 holds two stacked projections
(gate and up), which every weight map, TP split and parameter count must know."""


@dataclass
class ModelConfig:
    """A megatron-core GPT model (``megatron.core.models.gpt.GPTModel``)."""

    num_layers: int = 2
    """Transformer layers (split evenly over pipeline stages)."""
    hidden_size: int = 64
    num_attention_heads: int = 4
    """Must be divisible by parallel.tensor_model_parallel_size."""
    ffn_hidden_size: Optional[int] = None
    """MLP width; null means 4 * hidden_size."""
    seq_length: int = 16
    """Maximum sequence length (prompt + completion)."""
    position_embedding_type: str = "learned_absolute"
    """learned_absolute | rope | none"""
    normalization: str = "LayerNorm"
    """LayerNorm | RMSNorm"""
    num_query_groups: Optional[int] = None
    """Key/value heads (grouped-query attention); null = num_attention_heads (multi-head)."""
    activation: str = "gelu"
    """MLP activation: gelu (exact) | gelu_tanh (GPT-2's gelu_new) | relu | silu | swiglu (gated
    SiLU, Llama) | geglu (gated gelu) | geglu_tanh (gated tanh-gelu: T5 v1.1 / flan-T5 gated-gelu)."""
    add_bias_linear: bool = True
    """Biases in the attention and MLP linear layers (GPT-2, GPT-NeoX: true; Llama: false)."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection even when add_bias_linear=false (Qwen2)."""
    parallel_residual: bool = False
    """GPT-NeoX / Pythia layers: attention and MLP both read the layer input, x + attn(ln1(x)) +
    mlp(ln2(x)), instead of the MLP reading the attention's output."""
    layernorm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    """RoPE theta (HF rope_theta)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates (GPT-NeoX rotary_pct)."""
    rope_scaling: Optional[str] = None
    """null | llama3 (Llama 3.1 frequency scaling) | linear (position interpolation)."""
    rope_scaling_factor: float = 8.0
    vocab_size: Optional[int] = None
    """Embedding rows before padding (an imported checkpoint's vocabulary); null = the tokenizer's."""
    max_position_embeddings: Optional[int] = None
    """Rows of the learned position table (GPT-2 n_positions); null = seq_length. Must be >= seq_length."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    share_embeddings_and_output_weights: bool = True
    make_vocab_size_divisible_by: int = 64
    """Vocabulary is padded to a multiple of this (independent of TP, so checkpoints reshard);
    must be divisible by parallel.tensor_model_parallel_size."""
    logits_chunk_tokens: Optional[int] = None
    """Compute the output layer and the per-token log-likelihood this many tokens at a time (GPT):
    the full [tokens, vocabulary / TP] fp32 logits are never held, the backward recomputes each
    chunk's logits (one more output-layer GEMM). For long sequences and large vocabularies, where
    those logits dominate memory (a 16k-token row of a 128k vocabulary: 8 GiB). null = megatron's
    output layer and cross-entropy on all tokens at once. Results equal either way, to rounding."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16. bf16: parameters and activations in bf16, fp32 main weights and grads in
    megatron's mixed-precision optimizer (CPU too); fp16 is a GPU path."""
    transformer_impl: str = "auto"
    """auto (Transformer Engine when it imports and CUDA is present, else local) | local |
    transformer_engine"""
    recompute_granularity: Optional[str] = None
    """null | selective | full (activation recompute)"""
    path: Optional[str] = None
    """Initial weights: a nemo_rlhf checkpoint directory (dist_checkpointing), a Hugging Face model
    directory (config.json + safetensors/.bin; its architecture and tokenizer are used, see
    nemo_rlhf/interop), a NeMo .nemo file or a NeMo 2 / Megatron dist checkpoint. null = random init."""
    arch: str = "gpt"
    """gpt (megatron GPTModel, decoder-only) | t5 (megatron T5Model: the prompt goes to the encoder,
    the completion comes from the decoder; num_layers is the decoder depth)."""
    encoder_num_layers: Optional[int] = None
    """arch=t5: encoder layers; null = num_layers."""
    relative_attention_num_buckets: int = 32
    """arch=t5 with position_embedding_type=relative: T5's relative-position buckets."""
    relative_attention_max_distance: int = 128
    """arch=t5 with position_embedding_type=relative: distance beyond which all positions share a bucket."""
    kv_channels: Optional[int] = None
    """arch=t5: width of each attention head's q/k/v (T5's d_kv); null = hidden_size / num_attention_heads."""
    attention_softmax_scale: Optional[float] = None
    """arch=t5: multiplier of q.k before the softmax; null = 1/sqrt(kv_channels). Hugging Face T5
    uses 1.0 (the scale lives in its query weights)."""

    def __post_init__(self):
        for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            _positive(getattr(self, key), f"model.{key}")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"model.hidden_size={self.hidden_size} is not divisible by "
                 f"model.num_attention_heads={self.num_attention_heads}")
        _require(self.position_embedding_type in ("learned_absolute", "rope", "none", "relative"),
                 f"model.position_embedding_type must be learned_absolute|rope|none (or relative with "
                 f"model.arch=t5), got {self.position_embedding_type!r}")
        _require(self.arch in ("gpt", "t5"), f"model.arch must be gpt|t5, got {self.arch!r}")
        _require(self.logits_chunk_tokens is None or self.logits_chunk_tokens >= 1,
                 f"model.logits_chunk_tokens must be null or a positive number of tokens, got {self.logits_chunk_tokens}")
        _require(self.logits_chunk_tokens is None or self.arch == "gpt",
                 "model.logits_chunk_tokens is a GPT option (arch=gpt); T5 computes its logits at once")
        if self.arch == "t5":
            _require(self.position_embedding_type in ("learned_absolute", "rope", "relative"),
                     f"model.arch=t5 needs model.position_embedding_type learned_absolute|rope|relative, "
                     f"got {self.position_embedding_type!r}")
            if self.encoder_num_layers is not None:
                _positive(self.encoder_num_layers, "model.encoder_num_layers")
            _positive(self.relative_attention_num_buckets, "model.relative_attention_num_buckets")
            _positive(self.relative_attention_max_distance, "model.relative_attention_max_distance")
            if self.kv_channels is not None:
                _positive(self.kv_channels, "model.kv_channels")
            if self.attention_softmax_scale is not None:
                _positive(self.attention_softmax_scale, "model.attention_softmax_scale")
        else:
            _require(self.kv_channels is None and self.attention_softmax_scale is None,
                     "model.kv_channels / model.attention_softmax_scale are arch=t5 settings")
            _require(self.position_embedding_type != "relative",
                     "model.position_embedding_type=relative (T5's relative attention bias) needs model.arch=t5")
        _require(self.normalization in ("LayerNorm", "RMSNorm"),
                 f"model.normalization must be LayerNorm|RMSNorm, got {self.normalization!r}")
        _require(self.precision in ("fp32", "bf16", "fp16"),
                 f"model.precision must be fp32|bf16|fp16, got {self.precision!r}")
        _require(self.transformer_impl in ("auto", "local", "transformer_engine"),
                 f"model.transformer_impl must be auto|local|transformer_engine, "
                 f"got {self.transformer_impl!r}")
        _require(self.recompute_granularity in (None, "selective", "full"),
                 f"model.recompute_granularity must be null|selective|full, "
                 f"got {self.recompute_granularity!r}")
        _positive(self.make_vocab_size_divisible_by, "model.make_vocab_size_divisible_by")
        if self.num_query_groups is not None:
            _positive(self.num_query_groups, "model.num_query_groups")
            _require(self.num_attention_heads % self.num_query_groups == 0,
                     f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                     f"model.num_query_groups={self.num_query_groups}")
        _require(self.activation in ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu", "geglu_tanh"),
                 f"model.activation must be gelu|gelu_tanh|relu|silu|swiglu|geglu|geglu_tanh, got {self.activation!r}")
        _positive(self.layernorm_epsilon, "model.layernorm_epsilon")
        _positive(self.rotary_base, "model.rotary_base")
        _require(0.0 < self.rotary_percent <= 1.0,
                 f"model.rotary_percent must be in (0, 1], got {self.rotary_percent!r}")
        _require(self.rope_scaling in (None, "llama3", "linear"),
                 f"model.rope_scaling must be null|llama3|linear, got {self.rope_scaling!r}")
        _positive(self.rope_scaling_factor, "model.rope_scaling_factor")
        if self.vocab_size is not None:
            _positive(self.vocab_size, "model.vocab_size")
        _require(self.max_position_embeddings is None or self.max_position_embeddings >= self.seq_length,
                 f"model.max_position_embeddings={self.max_position_embeddings} is smaller than "
                 f"model.seq_length={self.seq_length}")
