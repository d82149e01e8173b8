"""Typed configuration schemas.

Every YAML under ``conf/`` is merged into these dataclasses (registered in Hydra's ConfigStore),
so an unknown key or a value of the wrong type fails at start with Hydra's message naming the
key. ``__post_init__`` checks values and cross-field constraints (run when the config is turned
into objects with :func:`nemo_rlhf.config.to_run_config`); errors raise :class:`ConfigError` with
the dotted key in the message. Layout checks that need the world size live in
:func:`nemo_rlhf.parallel.validate_layout`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


from nemo_rlhf.errors import ConfigError  # noqa: F401  (re-exported)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(value, key: str) -> None:
    _require(value is not None and value > 0, f"{key} must be > 0, got {value!r}")


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
    precision: str = "fp32"
    """fp32 | bf16 | fp16. bf16/fp16 are GPU paths."""
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


@dataclass
class ParallelConfig:
    """Megatron parallel layout. world size = TP * PP * DP (DP is derived)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage (interleaved 1F1B; null = plain 1F1B). Needs PP > 1, num_layers
    divisible by PP * this, and micro-batches per step and DP rank a multiple of PP."""
    sequence_parallel: bool = False
    """Shard layernorm/dropout activations along the sequence over the TP group (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, else gloo) | nccl | gloo"""

    def __post_init__(self):
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            _positive(getattr(self, key), f"parallel.{key}")
        if self.virtual_pipeline_model_parallel_size is not None:
            _positive(self.virtual_pipeline_model_parallel_size,
                      "parallel.virtual_pipeline_model_parallel_size")
            _require(self.pipeline_model_parallel_size > 1,
                     "parallel.virtual_pipeline_model_parallel_size needs "
                     "parallel.pipeline_model_parallel_size > 1")
        _require(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
                 "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
        _require(self.backend in ("auto", "nccl", "gloo"),
                 f"parallel.backend must be auto|nccl|gloo, got {self.backend!r}")


@dataclass
class TaskConfig:
    """The built-in randomwalks task (after trlX examples/randomwalks)."""

    name: str = "randomwalks"
    num_nodes: int = 21
    """Graph nodes, named a, b, c, ...; node 'a' is the absorbing goal."""
    edge_prob: float = 0.1
    """Probability of each directed edge (graphs are redrawn until every node has an out-edge)."""
    max_length: int = 10
    """Maximum walk length in nodes (prompt node included)."""
    num_walks: int = 1000
    """Random walks generated as training data."""
    seed: int = 1000
    """Seed of the graph and of the walks."""
    eval_samples_per_start: int = 8
    """Temperature-1 samples drawn per evaluation start node."""

    def __post_init__(self):
        _require(self.name == "randomwalks", f"task.name: unknown task {self.name!r} (known: randomwalks)")
        _require(2 <= self.num_nodes <= 26, f"task.num_nodes must be in [2, 26], got {self.num_nodes}")
        _require(0.0 < self.edge_prob <= 1.0, f"task.edge_prob must be in (0, 1], got {self.edge_prob}")
        _require(self.max_length >= 2, f"task.max_length must be >= 2, got {self.max_length}")
        _positive(self.num_walks, "task.num_walks")
        _positive(self.eval_samples_per_start, "task.eval_samples_per_start")


@dataclass
class OptimConfig:
    """megatron-core optimizer (``get_megatron_optimizer``)."""

    name: str = "adam"
    """adam (AdamW-style decoupled weight decay) | sgd (megatron-core cannot checkpoint SGD
    momentum: checkpoints then hold weights only)"""
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    warmup_steps: int = 0
    scheduler: str = "constant"
    """constant | cosine (from lr to min_lr over trainer.max_steps, after warmup)"""

    def __post_init__(self):
        _require(self.name in ("adam", "sgd"), f"optim.name must be adam|sgd, got {self.name!r}")
        _positive(self.lr, "optim.lr")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.scheduler in ("constant", "cosine"),
                 f"optim.scheduler must be constant|cosine, got {self.scheduler!r}")
        _require(self.clip_grad >= 0, f"optim.clip_grad must be >= 0, got {self.clip_grad}")


@dataclass
class TrainerConfig:
    """The training loop (a Lightning Trainer with the Megatron strategy)."""

    max_steps: int = 300
    """Optimizer steps (each one global batch)."""
    micro_batch_size: int = 16
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 32
    """Samples per optimizer step over all data-parallel ranks and micro-batches."""
    log_every_n_steps: int = 10
    eval_every_n_steps: int = 100
    """Sampling evaluation interval (also run before the first and after the last step). 0 = only those two."""
    checkpoint_every_n_steps: int = 100
    """0 = only at the end of training."""
    keep_last_n_checkpoints: int = 2
    seed: int = 1234
    num_nodes: int = 1
    """Nodes in the job; must match the launcher's (torchrun --nnodes / Slurm --nodes)."""
    devices: Optional[int] = None
    """Processes per node; null = taken from the launcher (LOCAL_WORLD_SIZE / SLURM_NTASKS_PER_NODE)."""
    progress_bar: bool = True

    def __post_init__(self):
        for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_every_n_steps",
                    "num_nodes", "keep_last_n_checkpoints"):
            _positive(getattr(self, key), f"trainer.{key}")
        for key in ("eval_every_n_steps", "checkpoint_every_n_steps"):
            _require(getattr(self, key) >= 0, f"trainer.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    """TensorBoard event files under <run dir>/tensorboard."""
    csv: bool = True
    """metrics.csv under <run dir>/csv (metrics.jsonl is always written)."""


ALGORITHMS = ("sft", "ppo", "ilql", "dpo", "kto", "rm")


@dataclass
class AlgorithmConfig:
    name: str = "sft"
    """sft | ppo | ilql | dpo (and its variants ipo, hinge, robust, simpo, orpo) | kto | rm (reward model)"""

    def __post_init__(self):
        _require(self.name in ALGORITHMS,
                 f"algorithm.name: unknown algorithm {self.name!r} (known: {', '.join(ALGORITHMS)})")


@dataclass
class PPOConfig:
    """PPO (used when algorithm.name=ppo). One trainer step = one PPO iteration:
    generate num_rollouts samples -> score -> logprobs/values/ref -> advantages -> ppo_epochs of
    num_minibatches updates."""

    num_rollouts: int = 64
    """Prompts (= samples) per iteration, over all data-parallel ranks."""
    ppo_epochs: int = 4
    num_minibatches: int = 4
    """Minibatches per epoch; minibatch size = num_rollouts / num_minibatches."""
    init_kl_coef: float = 0.05
    """beta of the per-token KL penalty against the reference (initial) policy."""
    target_kl: Optional[float] = None
    """null = fixed KL coefficient; a number = adaptive controller (Ziegler et al. 2019) aiming at it."""
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 1.0
    """Weight of the value loss (used with critic=value_head, where both share one backward)."""
    cliprange_reward: float = 10.0
    """Scores are clipped to [-c, c] (0 disables)."""
    scale_reward: str = "none"
    """none | running (divide scores by a running std)"""
    whiten_advantages: bool = True
    critic: str = "separate"
    """separate (own GPT trunk + value head, own optimizer) | value_head (on the policy trunk)"""
    critic_lr: Optional[float] = None
    """Learning rate of the separate critic; null = optim.lr."""
    reward_fn: str = "randomwalks"
    """randomwalks (the task's optimality) | 'package.module:function' called as
    fn(samples, prompts=..., completions=...) -> list of floats."""
    reward_model: Optional[str] = None
    """A checkpoint of a GPT with a scalar head (value_head) to score samples instead of reward_fn
    (score = the head's output at the last token)."""
    sft_steps: int = 1000
    """When model.path is null: SFT warm-up steps on the task's data before PPO (0 = start from random init)."""
    sft_lr: float = 3e-3
    sft_global_batch_size: int = 64
    sft_micro_batch_size: int = 32

    def __post_init__(self):
        for key in ("num_rollouts", "ppo_epochs", "num_minibatches", "kl_horizon"):
            _positive(getattr(self, key), f"ppo.{key}")
        _require(self.num_rollouts % self.num_minibatches == 0,
                 f"ppo.num_rollouts={self.num_rollouts} is not divisible by ppo.num_minibatches={self.num_minibatches}")
        _require(self.critic in ("separate", "value_head"),
                 f"ppo.critic must be separate|value_head, got {self.critic!r}")
        _require(self.scale_reward in ("none", "running"),
                 f"ppo.scale_reward must be none|running, got {self.scale_reward!r}")
        _require(self.init_kl_coef >= 0, f"ppo.init_kl_coef must be >= 0, got {self.init_kl_coef}")
        _require(self.target_kl is None or self.target_kl > 0, "ppo.target_kl must be null or > 0")
        _require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
        _require(self.sft_steps >= 0, f"ppo.sft_steps must be >= 0, got {self.sft_steps}")


@dataclass
class GenerationConfig:
    """Sampling used for evaluation."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None
    """null = task.max_length (max_length - 1 nodes + EOS)."""

    def __post_init__(self):
        _require(self.temperature > 0, f"generation.temperature must be > 0, got {self.temperature}")
        _require(self.top_k >= 0, f"generation.top_k must be >= 0, got {self.top_k}")
        _require(0 < self.top_p <= 1, f"generation.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class ILQLConfig:
    """ILQL (used when algorithm.name=ilql): offline RL on (sample, reward) pairs."""

    tau: float = 0.7
    """Expectile of the V regression."""
    gamma: float = 0.99
    alpha: float = 1.0
    """Weight of the V loss."""
    cql_scale: float = 0.1
    awac_scale: float = 1.0
    awac_beta: float = 0.0
    """AWAC advantage temperature (0 = plain behaviour cloning weight 1, as trlX's default)."""
    two_qs: bool = True
    steps_for_target_q_sync: int = 5
    target_sync_rate: float = 1.0
    """Polyak rate of the target-Q update every steps_for_target_q_sync steps (1 = copy)."""
    reward_normalization: str = "standard"
    """standard ((r - mean) / std over the dataset, as trlX) | none"""
    beta: float = 1.0
    """Sampling: logits = log pi + beta * (min target Q - V)."""
    gen_top_k: int = 20
    samples_path: Optional[str] = None
    """JSONL with {"sample": str | [prompt, completion], "reward": float} per line; null = the task's
    walks labeled with their optimality."""

    def __post_init__(self):
        _require(0 < self.tau < 1, f"ilql.tau must be in (0, 1), got {self.tau}")
        _require(0 <= self.gamma <= 1, f"ilql.gamma must be in [0, 1], got {self.gamma}")
        _positive(self.steps_for_target_q_sync, "ilql.steps_for_target_q_sync")
        _require(0 < self.target_sync_rate <= 1, f"ilql.target_sync_rate must be in (0, 1], got {self.target_sync_rate}")
        _require(self.reward_normalization in ("standard", "none"),
                 f"ilql.reward_normalization must be standard|none, got {self.reward_normalization!r}")
        _require(self.beta >= 0, f"ilql.beta must be >= 0, got {self.beta}")


@dataclass
class DPOConfig:
    """DPO (used when algorithm.name=dpo) on preference pairs."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    """sigmoid | ipo | hinge | robust (DPO variants, nemo_rlhf.algorithms.dpo.DPO_LOSSES) |
    simpo | orpo (reference-free: no reference pass or model)"""
    simpo_gamma: float = 0.5
    """SimPO target margin gamma (SimPO uses length-normalised log-probs)."""
    orpo_lambda: float = 0.1
    """ORPO weight of the odds-ratio term next to the chosen completion's NLL."""
    label_smoothing: float = 0.0
    """Conservative DPO / robust DPO label-noise rate."""
    length_normalize: bool = False
    """Use mean instead of summed token log-probs (IPO's option)."""
    reference: str = "precomputed"
    """precomputed (one pass with the initial policy before training, saved with the run) | model
    (a frozen copy in memory)"""
    num_pairs: int = 4000
    """Pairs built from the task's walks (two walks from one start, the more optimal one chosen)."""
    sft_steps: int = 1000
    """When model.path is null: SFT warm-up steps before DPO (the reference is that SFT policy)."""
    sft_lr: float = 3e-3
    sft_global_batch_size: int = 64
    sft_micro_batch_size: int = 32

    def __post_init__(self):
        _require(self.loss_type in ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"),
                 f"dpo.loss_type must be sigmoid|ipo|hinge|robust|simpo|orpo, got {self.loss_type!r}")
        _require(self.beta > 0, f"dpo.beta must be > 0, got {self.beta}")
        _require(0 <= self.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _require(self.reference in ("precomputed", "model"),
                 f"dpo.reference must be precomputed|model, got {self.reference!r}")
        _positive(self.num_pairs, "dpo.num_pairs")
        _require(self.sft_steps >= 0, f"dpo.sft_steps must be >= 0, got {self.sft_steps}")


@dataclass
class KTOConfig:
    """KTO (algorithm.name=kto; Ethayarajh et al. 2024) on unpaired completions labelled desirable
    or undesirable. The reference point z0 is KL(policy || reference) estimated per micro-batch from
    mismatched prompt/completion pairs (each prompt with another example's completion), detached."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    """lambda_D; the paper keeps lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]."""
    undesirable_weight: float = 1.0
    """lambda_U."""
    reference: str = "precomputed"
    """precomputed (one pass before training, saved as reference_logps.pt) | model (frozen copy)"""
    num_pairs: int = 4000
    """Without data.train_file: preference pairs built from the task's walks, then unpaired (each
    pair gives one desirable and one undesirable example, as TRL's unpair_preference_dataset)."""
    sft_steps: int = 1000
    """When model.path is null: SFT warm-up steps before KTO (the reference is that SFT policy)."""
    sft_lr: float = 3e-3
    sft_global_batch_size: int = 64
    sft_micro_batch_size: int = 32

    def __post_init__(self):
        _require(self.beta > 0, f"kto.beta must be > 0, got {self.beta}")
        _require(self.desirable_weight > 0 and self.undesirable_weight > 0,
                 f"kto.desirable_weight and kto.undesirable_weight must be > 0, got "
                 f"{self.desirable_weight} and {self.undesirable_weight}")
        _require(self.reference in ("precomputed", "model"),
                 f"kto.reference must be precomputed|model, got {self.reference!r}")
        _positive(self.num_pairs, "kto.num_pairs")
        _require(self.sft_steps >= 0, f"kto.sft_steps must be >= 0, got {self.sft_steps}")


@dataclass
class DataConfig:
    """Training data from a file instead of the task (JSONL or parquet, read with Hugging Face
    ``datasets``). Schemas by algorithm: sft prompt/completion; dpo and rm prompt/chosen/rejected;
    kto prompt/completion/label (label true = desirable); ppo prompt (any token lengths). Evaluation
    still uses the task."""

    train_file: Optional[str] = None
    """null = the task builds the data (randomwalks walks or pairs)."""
    format: str = "auto"
    """auto (from the extension: .jsonl/.json -> json, .parquet -> parquet) | json | parquet"""
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    label_key: str = "label"
    overlong: str = "error"
    """An example longer than model.seq_length (prompt + completion + EOS): error (name it) |
    truncate (cut the completion, then the prompt's start; counted and reported) | drop (counted)."""
    max_examples: Optional[int] = None
    """Use only the first N examples."""

    def __post_init__(self):
        _require(self.format in ("auto", "json", "parquet"),
                 f"data.format must be auto|json|parquet, got {self.format!r}")
        _require(self.overlong in ("error", "truncate", "drop"),
                 f"data.overlong must be error|truncate|drop, got {self.overlong!r}")
        if self.max_examples is not None:
            _positive(self.max_examples, "data.max_examples")


@dataclass
class RMConfig:
    """Reward-model training (algorithm.name=rm): Bradley-Terry on preference pairs, a scalar
    head on a megatron GPT read at the last completion token. PPO takes the result as
    ppo.reward_model=<run dir>/checkpoints/step_X."""

    num_pairs: int = 4000
    heldout_fraction: float = 0.1
    """Pairs kept out of training to measure pairwise accuracy."""
    margin: float = 0.0

    def __post_init__(self):
        _positive(self.num_pairs, "rm.num_pairs")
        _require(0 < self.heldout_fraction < 1, f"rm.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass
class RunConfig:
    """Top-level configuration of one run (``python -m nemo_rlhf.train --config-name ...``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ilql: ILQLConfig = field(default_factory=ILQLConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    resume: Optional[str] = None
    """null (fresh run) | auto (latest complete checkpoint in this run dir, fresh if none) |
    a checkpoint directory path."""
    verbosity: str = "INFO"
    """Python logging level of nemo_rlhf (the NEMO_RLHF_VERBOSITY env var overrides it)."""
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        tp = self.parallel.tensor_model_parallel_size
        pp = self.parallel.pipeline_model_parallel_size
        _require(self.model.num_attention_heads % tp == 0,
                 f"model.num_attention_heads={self.model.num_attention_heads} is not divisible by "
                 f"parallel.tensor_model_parallel_size={tp}")
        _require(self.model.make_vocab_size_divisible_by % tp == 0,
                 f"model.make_vocab_size_divisible_by={self.model.make_vocab_size_divisible_by} is not "
                 f"divisible by parallel.tensor_model_parallel_size={tp}")
        chunks = pp * (self.parallel.virtual_pipeline_model_parallel_size or 1)
        _require(self.model.num_layers % chunks == 0,
                 f"model.num_layers={self.model.num_layers} is not divisible by "
                 f"parallel.pipeline_model_parallel_size * virtual_pipeline_model_parallel_size={chunks}")
        _require(self.model.seq_length >= self.task.max_length + 1,
                 f"model.seq_length={self.model.seq_length} is shorter than a walk plus EOS "
                 f"(task.max_length + 1 = {self.task.max_length + 1})")
        if self.parallel.sequence_parallel:
            _require(self.model.seq_length % tp == 0,
                     f"model.seq_length={self.model.seq_length} is not divisible by "
                     f"parallel.tensor_model_parallel_size={tp} (needed with sequence_parallel)")
        _require(self.trainer.global_batch_size % self.trainer.micro_batch_size == 0,
                 f"trainer.global_batch_size={self.trainer.global_batch_size} is not divisible by "
                 f"trainer.micro_batch_size={self.trainer.micro_batch_size}")
        if self.algorithm.name == "ilql":
            _require(pp == 1 and not self.parallel.sequence_parallel,
                     "algorithm.name=ilql needs parallel.pipeline_model_parallel_size=1 and "
                     "parallel.sequence_parallel=false (its heads sit on the last stage's full hidden states)")
        if self.algorithm.name == "ppo":
            _require(pp == 1, "algorithm.name=ppo needs parallel.pipeline_model_parallel_size=1 (rollout "
                              "generation and value heads run on a single pipeline stage)")
        if self.model.arch == "t5":
            _require(pp == 1, "model.arch=t5 needs parallel.pipeline_model_parallel_size=1 (pipeline "
                              "parallelism is not supported for T5 policies)")
            _require(not self.parallel.sequence_parallel,
                     "model.arch=t5 does not support parallel.sequence_parallel=true yet")
            _require(self.algorithm.name in ("sft", "dpo", "kto", "ppo", "ilql"),
                     f"model.arch=t5 supports algorithm.name sft|dpo|kto|ppo|ilql, got {self.algorithm.name!r}")
            _require(self.algorithm.name != "ppo" or self.ppo.reward_model is None,
                     "model.arch=t5 with ppo.reward_model is not supported (reward models are GPT)")
        _require(self.verbosity.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                 f"verbosity must be DEBUG|INFO|WARNING|ERROR|CRITICAL, got {self.verbosity!r}")
        if self.resume not in (None, "auto"):
            _require(isinstance(self.resume, str) and len(self.resume) > 0, "resume must be null, auto or a path")
