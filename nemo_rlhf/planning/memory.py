"""Memory per GPU of a run, from its config alone (pure functions, no torch, no megatron).

Model: megatron-core GPTModel (or T5Model) with the local or Transformer Engine layer spec; the
parameter count is exact (tests compare it with the real models' numel); T5 activations are
approximate (encoder layers + 1.5 x decoder layers). Parallelism: tensor (TP=t),
pipeline (PP=p, virtual chunks v), data (DP=d) and sequence parallelism, as megatron shards them.

Terms (bytes per GPU, on the pipeline stage that needs the most):
  weights       P_rank * w, w = 2 (bf16/fp16) or 4 (fp32)
  gradients     P_rank * 4: megatron DDP accumulates main_grad in fp32 (grad_reduce_in_fp32)
  optimizer     P_rank * (8 Adam moments [+ 4 fp32 master copy when w = 2]) / (d with the
                distributed optimizer); SGD: 4 momentum [+ 4 master]
  activations   per micro-batch and layer, in elements of s*b*h (s = seq, b = rows per micro-batch,
                h = hidden, a = heads, f = ffn), after Korthikanti et al. 2022 "Reducing Activation
                Recomputation in Large Transformer Models" (Sec. 4), counted for megatron's code:
                  4 s*b*h        inputs and outputs of the two norms    (/t only with SP;
                                 +2 s*b*h for the local spec's composite RMSNorm)
                  s*b*(h + kv + h + mlp) / t   q, k+v (2h with the local spec, which repeats GQA
                                 heads; 2h*g/a with TE), attention context, MLP (2f; gated 5f
                                 local, 3f with TE's fused SwiGLU)
                  + 2 s*b*h / t  RoPE's rotated q, k (local spec with GQA: none, measured)
                  + a*s^2*b / t  softmax probabilities: local (unfused) attention only; flash /
                                 fused attention (TE) and selective recompute keep none
                "fused kernels" = Transformer Engine (flash attention, fused norms and activations),
                what NGC containers run; "local" = megatron's local spec, what runs on CPU here.
                full recompute keeps only each layer's input (s*b*h, /t with SP) plus one layer's
                activations while it is recomputed. The last stage adds the final norm (2 s*b*h) and
                the logits kept by the vocab-parallel cross entropy (s*b*V/t in fp32; chunked,
                model.logits_chunk_tokens=c: c*V/t + the fp32 output-weight grad V/t*h). 1F1B keeps
                min(p, M) micro-batches in flight on the first stage (interleaving: times
                1 + (p-1)/(p*v)), so the first stage holds L/p layers * p micro-batches.
  rollouts      PPO generation: KV cache 2 * L/p * B * S * (g*h/a)/t * w for the B = num_rollouts/d
                prompts generated at once; the experience pass's logits B * S (or c) * V/t * 4 * 2.
  extra models  PPO: frozen reference policy (weights), separate critic (full training state),
                reward model (weights); DPO/KTO with reference=model: a frozen copy; ILQL: Q heads
                (trained) and target Q heads (frozen), each V*h.
The peak adds the static terms (weights, grads, optimizer, extra models) to the largest of the
phases that do not overlap (training activations, rollout generation, experience pass), plus a
fixed runtime overhead (CUDA context, NCCL buffers, allocator fragmentation).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from nemo_rlhf.algorithms.dpo import DPO_LOSSES
from nemo_rlhf.config.schema import GATED_ACTIVATIONS, ModelConfig, RunConfig

GIB = 1024 ** 3
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def padded_vocab(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def ffn_size(m: ModelConfig) -> int:
    return m.ffn_hidden_size or 4 * m.hidden_size


def _gated(m: ModelConfig) -> bool:
    return m.activation in GATED_ACTIVATIONS


def kv_channels(m: ModelConfig) -> int:
    return getattr(m, "kv_channels", None) or m.hidden_size // m.num_attention_heads


def layer_params(m: ModelConfig) -> Dict[str, int]:
    """Parameters of one GPT transformer layer, split into what TP shards and what it replicates.

    qkv: [a*d + 2*g*d, h] (+ bias); proj: [h, a*d] (+ bias, replicated: row-parallel);
    fc1: [f (2f gated), h] (+ bias); fc2: [h, f] (+ bias, replicated); 2 norms (weight [+ bias])."""
    h, a, d = m.hidden_size, m.num_attention_heads, kv_channels(m)
    g = m.num_query_groups or a
    f, fc1 = ffn_size(m), ffn_size(m) * (2 if _gated(m) else 1)
    qkv_out = a * d + 2 * g * d
    norm = 2 * h if m.normalization == "LayerNorm" else h
    bias = m.add_bias_linear
    sharded = qkv_out * h + h * a * d + fc1 * h + h * f
    sharded += qkv_out if (bias or m.add_qkv_bias) else 0
    sharded += fc1 if bias else 0
    replicated = 2 * norm + (2 * h if bias else 0)
    return {"sharded": sharded, "replicated": replicated}


def cross_attention_params(m: ModelConfig) -> Dict[str, int]:
    """T5 decoder cross-attention: norm, q [a*d, h], kv [2*g*d, h], proj [h, a*d] (+ biases)."""
    h, a, d = m.hidden_size, m.num_attention_heads, kv_channels(m)
    g = m.num_query_groups or a
    bias = m.add_bias_linear
    sharded = a * d * h + 2 * g * d * h + h * a * d + ((a * d + 2 * g * d) if bias else 0)
    replicated = (2 * h if m.normalization == "LayerNorm" else h) + (h if bias else 0)
    return {"sharded": sharded, "replicated": replicated}


@dataclass(frozen=True)
class ParamCount:
    """Parameters of the whole model (TP=PP=1) and of one rank of the stage that holds the most."""

    total: int
    per_layer: int
    embedding: int
    """word embeddings (padded vocabulary x hidden) + learned position table"""
    output_layer: int
    """separate LM head; 0 when tied to the word embeddings"""
    rank_first_stage: int
    rank_last_stage: int

    @property
    def rank_max(self) -> int:
        return max(self.rank_first_stage, self.rank_last_stage)


def param_count(m: ModelConfig, vocab_size: int, tp: int = 1, pp: int = 1) -> ParamCount:
    """Exact parameter count of megatron's GPTModel for ``m`` (``vocab_size`` before padding), and
    per rank at TP=tp, PP=pp (first stage: embeddings; last stage: final norm, LM head, and with
    PP > 1 and tied embeddings a copy of the word embeddings)."""
    h = m.hidden_size
    v = padded_vocab(vocab_size, m.make_vocab_size_divisible_by)
    lp = layer_params(m)
    per_layer = lp["sharded"] + lp["replicated"]
    positions = (m.max_position_embeddings or m.seq_length) * h if m.position_embedding_type == "learned_absolute" else 0
    word = v * h
    final_norm = 2 * h if m.normalization == "LayerNorm" else h
    tied = m.share_embeddings_and_output_weights
    output = 0 if tied else v * h
    if m.arch == "t5":   # encoder + decoder (with cross-attention), two final norms, LM-head bias
        enc_layers = m.encoder_num_layers or m.num_layers
        cross = cross_attention_params(m)
        rel = 2 * m.relative_attention_num_buckets * m.num_attention_heads \
            if m.position_embedding_type == "relative" else 0
        total = ((enc_layers + m.num_layers) * per_layer + m.num_layers * (cross["sharded"] + cross["replicated"])
                 + word + positions + rel + 2 * final_norm + output + v)
        rank = ((enc_layers + m.num_layers) * (lp["sharded"] // tp + lp["replicated"])
                + m.num_layers * (cross["sharded"] // tp + cross["replicated"])
                + (word + output + v) // tp + positions + rel + 2 * final_norm)
        return ParamCount(total=total, per_layer=per_layer, embedding=word + positions, output_layer=output,
                          rank_first_stage=rank, rank_last_stage=rank)
    total = m.num_layers * per_layer + word + positions + final_norm + output
    layers_rank = (m.num_layers // pp) * (lp["sharded"] // tp + lp["replicated"])
    first = layers_rank + word // tp + positions
    last_head = (v * h) // tp if (not tied or pp > 1) else 0
    last = layers_rank + final_norm + last_head
    if pp == 1:
        first = last = layers_rank + word // tp + positions + final_norm + (0 if tied else (v * h) // tp)
    return ParamCount(total=total, per_layer=per_layer, embedding=word + positions, output_layer=output,
                      rank_first_stage=first, rank_last_stage=last)


def activation_elements_per_layer(m: ModelConfig, seq: int, rows: int, tp: int, sp: bool,
                                  fused_kernels: bool) -> float:
    """Activation elements one transformer layer keeps for backward for one micro-batch of
    ``rows`` sequences (no recompute; see the module docstring)."""
    s, b, h, a = seq, rows, m.hidden_size, m.num_attention_heads
    g = m.num_query_groups or a
    kv = 2 * h * g / a if fused_kernels else 2 * h
    # fc1 output and fc2 input (2f); gated: fc1 output 2f + act(x0) f + product f, and the local
    # path keeps one more f (measured); TE's fused bias-SwiGLU recomputes act(x0)
    mlp = (3 if fused_kernels else 5) * ffn_size(m) if _gated(m) else 2 * ffn_size(m)
    # RoPE's rotated q and k, next to the qkv output that v (a view of it) keeps alive; with GQA the
    # local spec's repeated k, v replace that output instead (measured: no extra)
    rope = 2 * h if m.position_embedding_type == "rope" and (fused_kernels or g == a) else 0
    split = s * b * (h + kv + h + mlp + rope)
    if not fused_kernels and m.recompute_granularity != "selective":
        split += a * s * s * b
    replicated = 4 * s * b * h
    if m.normalization == "RMSNorm" and not fused_kernels:
        replicated += 2 * s * b * h      # torch's composite RMSNorm keeps x * rsqrt(mean(x^2)) too
    return replicated / (tp if sp else 1) + split / tp


def dropout_mask_bytes_per_layer(m: ModelConfig, seq: int, rows: int, tp: int, sp: bool,
                                 fused_kernels: bool) -> float:
    s, b, h, a = seq, rows, m.hidden_size, m.num_attention_heads
    out = 2 * s * b * h / (tp if sp else 1) if m.hidden_dropout > 0 else 0.0
    if m.attention_dropout > 0 and not fused_kernels and m.recompute_granularity != "selective":
        out += a * s * s * b / tp
    return out


def act_bytes(m: ModelConfig) -> int:
    return WEIGHT_BYTES[m.precision]


def activation_bytes_one_microbatch(m: ModelConfig, layers: int, vocab_padded: int, seq: int, rows: int,
                                    tp: int, sp: bool, fused_kernels: bool, last_stage: bool) -> Dict[str, float]:
    """Bytes kept for backward by one micro-batch on ``layers`` layers:
    {"layers": ..., "recompute": transient of full recompute, "logits": last stage's head}."""
    w = act_bytes(m)
    full_layer = (activation_elements_per_layer(m, seq, rows, tp, sp, fused_kernels) * w
                  + dropout_mask_bytes_per_layer(m, seq, rows, tp, sp, fused_kernels))
    if m.recompute_granularity == "full":
        kept = layers * seq * rows * m.hidden_size / (tp if sp else 1) * w
        recompute = full_layer
    else:
        kept, recompute = layers * full_layer, 0.0
    logits = 0.0
    if last_stage:
        # final norm input + output, and the fp32 softmax of the vocab-parallel cross entropy
        # (plus the logits themselves in 16-bit before the fp32 cast)
        norm = 3 if (m.normalization == "RMSNorm" and not fused_kernels) else 2
        logits = norm * seq * rows * m.hidden_size / (tp if sp else 1) * w
        logits += logit_tokens(m, seq * rows) * vocab_padded / tp * (4 + (w if w < 4 else 0))
        logits += vocab_padded / tp * m.hidden_size * 4 if m.logits_chunk_tokens else 0   # chunked: fp32 weight grad
    return {"layers": kept, "recompute": recompute, "logits": logits}


def logit_tokens(m: ModelConfig, tokens: int) -> int:   # all at once, or a chunk (logits_chunk_tokens)
    return min(tokens, m.logits_chunk_tokens or tokens)


def in_flight_microbatches(pp: int, vpp: int, num_micro: int) -> float:
    """Micro-batches whose activations the first pipeline stage holds at once under 1F1B
    (Korthikanti et al. 2022, Sec. 4; interleaving adds 1 + (p-1)/(p*v))."""
    if pp == 1:
        return 1.0
    n = float(min(pp, num_micro))
    if vpp > 1:
        n *= 1 + (pp - 1) / (pp * vpp)
    return n


@dataclass
class Term:
    name: str
    bytes: float
    phase: str = "static"
    """static (held the whole run) | train | rollout | experience (phases do not overlap)"""
    note: str = ""


@dataclass
class Layout:
    world_size: int
    tp: int
    pp: int
    vpp: int
    dp: int
    num_micro: int
    """micro-batches per optimizer step and DP rank"""
    rows_per_micro: int
    """sequences one micro-batch feeds the model (DPO/KTO: 2 per pair)"""


@dataclass
class MemoryEstimate:
    layout: Layout
    params: ParamCount
    vocab_size: int
    terms: List[Term] = field(default_factory=list)
    overhead_bytes: float = 0.0
    gpu_bytes: float = 0.0

    def phase_bytes(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for t in self.terms:
            if t.phase != "static":
                out[t.phase] = out.get(t.phase, 0.0) + t.bytes
        return out

    @property
    def static_bytes(self) -> float:
        return sum(t.bytes for t in self.terms if t.phase == "static")

    @property
    def peak_phase(self) -> Optional[str]:
        phases = self.phase_bytes()
        return max(phases, key=phases.get) if phases else None

    @property
    def total_bytes(self) -> float:
        phases = self.phase_bytes()
        return self.static_bytes + (max(phases.values()) if phases else 0.0) + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_bytes

    def sorted_terms(self) -> List[Term]:
        return sorted(self.terms, key=lambda t: -t.bytes)


def optimizer_bytes_per_param(cfg: RunConfig) -> float:
    master = 4 if cfg.model.precision != "fp32" else 0
    states = 8 if cfg.optim.name == "adam" else 4
    return states + master


def rows_per_microbatch(cfg: RunConfig) -> int:
    """Sequences per micro-batch: a DPO / reward-model pair is 2; KTO runs its mismatched completions in a
    no-grad pass of their own (the reference point over the global batch), so 1 in each pass."""
    return cfg.trainer.micro_batch_size * (2 if cfg.algorithm.name in ("dpo", "rm") else 1)


def layout_of(cfg: RunConfig, world_size: int) -> Layout:
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    dp = max(1, world_size // (tp * pp))
    t = cfg.trainer
    if cfg.algorithm.name == "ppo":
        per_rank = cfg.ppo.num_rollouts // cfg.ppo.num_minibatches // dp
        mbs = max(1, min(t.micro_batch_size, per_rank))
        num_micro = max(1, per_rank // mbs)
        rows = mbs
    else:
        num_micro = max(1, t.global_batch_size // (t.micro_batch_size * dp))
        rows = rows_per_microbatch(cfg)
    return Layout(world_size=world_size, tp=tp, pp=pp, vpp=cfg.parallel.virtual_pipeline_model_parallel_size or 1,
                  dp=dp, num_micro=num_micro, rows_per_micro=rows)


def _training_state_terms(cfg: RunConfig, prefix: str, n_params: float, dp: int) -> List[Term]:
    w = WEIGHT_BYTES[cfg.model.precision]
    shard = dp if cfg.parallel.use_distributed_optimizer else 1
    opt = "Adam moments" if cfg.optim.name == "adam" else "SGD momentum"
    opt += " + fp32 master" if cfg.model.precision != "fp32" else ""
    return [
        Term(f"{prefix} weights", n_params * w, note=f"{cfg.model.precision}"),
        Term(f"{prefix} gradients", n_params * 4, note="fp32 main_grad"),
        Term(f"{prefix} optimizer states", n_params * optimizer_bytes_per_param(cfg) / shard,
             note=opt + (f", sharded over DP={dp}" if shard > 1 else ", not sharded")),
    ]


def estimate_memory(cfg: RunConfig, world_size: int, vocab_size: int, gpu_memory_gb: float = 80.0,
                    overhead_gb: float = 4.0, fused_kernels: Optional[bool] = None) -> MemoryEstimate:
    """Memory per GPU of ``cfg`` on ``world_size`` GPUs. ``fused_kernels`` (fused attention that
    keeps no s^2 probabilities) defaults to Transformer Engine: model.transformer_impl=transformer_engine,
    or auto with bf16/fp16 (a GPU recipe; fp32 recipes run the local spec on CPU)."""
    m, par = cfg.model, cfg.parallel
    lay = layout_of(cfg, world_size)
    if fused_kernels is None:
        fused_kernels = m.transformer_impl == "transformer_engine" or (
            m.transformer_impl == "auto" and m.precision != "fp32")
    pc = param_count(m, vocab_size, lay.tp, lay.pp)
    v = padded_vocab(vocab_size, m.make_vocab_size_divisible_by)
    w = WEIGHT_BYTES[m.precision]
    algo = cfg.algorithm.name
    est = MemoryEstimate(layout=lay, params=pc, vocab_size=vocab_size, overhead_bytes=overhead_gb * GIB,
                         gpu_bytes=gpu_memory_gb * GIB)
    trained = float(pc.rank_max)
    if algo == "ilql":   # Q heads [V, h] sharded like the LM head, trained; target copies frozen
        n_q = 2 if cfg.ilql.two_qs else 1
        q = n_q * (v * m.hidden_size + v) / lay.tp
        trained += q + m.hidden_size + 1
        est.terms.append(Term("ILQL target Q heads", q * w, note=f"{n_q} frozen [V, h] heads"))
    est.terms += _training_state_terms(cfg, "policy", trained, lay.dp)

    # training activations (first stage holds the in-flight micro-batches, the last the logits)
    layers_stage = m.num_layers // lay.pp
    if m.arch == "t5":   # approximate: encoder layers + decoder layers (cross-attention as ~half a layer)
        layers_stage = (m.encoder_num_layers or m.num_layers) + (3 * m.num_layers) // 2
    seq = m.seq_length
    first = activation_bytes_one_microbatch(m, layers_stage, v, seq, lay.rows_per_micro, lay.tp,
                                            par.sequence_parallel, fused_kernels, last_stage=lay.pp == 1)
    inflight = in_flight_microbatches(lay.pp, lay.vpp, lay.num_micro)
    acts = first["layers"] * inflight + first["recompute"] + first["logits"]
    if lay.pp > 1:
        last = activation_bytes_one_microbatch(m, layers_stage, v, seq, lay.rows_per_micro, lay.tp,
                                               par.sequence_parallel, fused_kernels, last_stage=True)
        acts = max(acts, last["layers"] + last["recompute"] + last["logits"])
    if algo == "ilql":   # Q/V head outputs over the vocabulary, fp32
        acts += (2 if cfg.ilql.two_qs else 1) * 2 * seq * lay.rows_per_micro * v / lay.tp * 4
    recompute = m.recompute_granularity or "none"
    est.terms.append(Term("activations (training)", acts, phase="train",
                          note=f"micro-batch of {lay.rows_per_micro} x seq {seq}, recompute={recompute}, "
                               f"SP={'on' if par.sequence_parallel else 'off'}, "
                               f"{'TE fused' if fused_kernels else 'local'} kernels, "
                               f"{inflight:g} micro-batch(es) in flight"))

    frozen = pc.rank_max * w
    if algo == "ppo":
        est.terms.append(Term("reference policy (frozen)", frozen, note=f"{m.precision} weights"))
        if cfg.ppo.critic == "separate":
            est.terms += _training_state_terms(cfg, "critic", pc.rank_max, lay.dp)
        if cfg.ppo.reward_model is not None:
            est.terms.append(Term("reward model (frozen)", frozen, note=f"{m.precision} weights"))
        b_roll = max(1, cfg.ppo.num_rollouts // lay.dp)
        g = m.num_query_groups or m.num_attention_heads
        kv = 2 * layers_stage * b_roll * seq * g * kv_channels(m) / lay.tp * w
        gen_logits = b_roll * v / lay.tp * 4 * 2
        est.terms.append(Term("rollout KV cache", kv + gen_logits, phase="rollout",
                              note=f"{b_roll} prompts per DP rank x up to {seq} tokens"))
        est.terms.append(Term("experience-pass logits", logit_tokens(m, b_roll * seq) * v / lay.tp * 4 * 2,
                              phase="experience", note=f"{b_roll} rollouts x {seq} x V/TP, fp32 (policy/reference "
                              f"log-probs{'; in chunks of %d tokens' % m.logits_chunk_tokens if m.logits_chunk_tokens else ''})"))
    elif algo in ("dpo", "kto"):
        block = cfg.dpo if algo == "dpo" else cfg.kto
        reference_free = algo == "dpo" and not DPO_LOSSES[cfg.dpo.loss_type].needs_reference   # SimPO, ORPO
        if block.reference == "model" and not reference_free:
            est.terms.append(Term("reference policy (frozen)", frozen, note=f"{m.precision} weights"))
    return est


def with_overrides(cfg: RunConfig, **changes) -> RunConfig:
    """``cfg`` with dotted-group changes, e.g. with_overrides(cfg, parallel={"tensor_model_parallel_size": 8});
    the schema re-validates it (ConfigError on an impossible layout)."""
    groups = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in changes.items()}
    return dataclasses.replace(cfg, **groups)
