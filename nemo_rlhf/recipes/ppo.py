"""PPO recipe (algorithm=ppo): actor, critic (a separate GPT or a value head on the policy trunk)
and frozen reference on megatron engines; one trainer step is one PPO iteration (read it top to
bottom in nemo_rlhf/modules/ppo.py). Prompts come from Python, data.train_file's prompt column, or
the task (the start node of each walk, as trlX); rewards from a function or a reward model."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional

import torch

from nemo_rlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS
from nemo_rlhf.algorithms.policy_losses import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from nemo_rlhf.config.checks import _positive, _require
from nemo_rlhf.config.schema import RunConfig, SFTWarmupConfig
from nemo_rlhf.generation.sampling import SamplingParams, generate, left_pad
from nemo_rlhf.modules.ppo import CRITICS, PPOModule
from nemo_rlhf.recipes.common import Job, RunContext, encode_prompts, file_examples
from nemo_rlhf.rewards import RewardModelScorer, resolve_reward_fn, score, weighted_rewards


@dataclass
class PPOConfig:
    """PPO (``ppo:`` block). One trainer step = one PPO iteration:
    generate num_rollouts samples -> score -> logprobs/values/ref -> advantages -> ppo_epochs of
    num_minibatches updates."""

    num_rollouts: int = 64
    """Samples per iteration, over all data-parallel ranks (num_rollouts / num_generations prompts)."""
    num_generations: int = 1
    """Samples per prompt (a group; GRPO / RLOO need > 1). A prompt's samples stay on one
    data-parallel rank, so group statistics need no communication."""
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
    advantage_estimator: str = "gae"
    """gae (Schulman et al. 2016, with gamma and lam; needs a critic) | grpo | rloo (group baselines,
    num_generations > 1) | reinforce++ (discounted KL-shaped returns, batch-normalised): one row of
    nemo_rlhf.algorithms.advantages.ADVANTAGE_ESTIMATORS."""
    critic: str = "separate"
    """separate (own GPT trunk + value head, own optimizer) | value_head (on the policy trunk) | none
    (critic-free estimators): one row of nemo_rlhf.modules.critics.CRITICS."""
    critic_lr: Optional[float] = None
    """Learning rate of the separate critic; null = optim.lr."""
    grpo_scale: str = "group"
    """advantage_estimator=grpo: divide the group-centred rewards by the group's std (group, GRPO),
    by the std of the whole batch's rewards (batch), or not at all (none, Dr. GRPO)."""
    policy_loss: str = "token"
    """token (per-token ratio: PPO, GRPO, DAPO) | gspo (one length-normalised ratio per sequence)."""
    cliprange_high: Optional[float] = None
    """Upper clip range, 1 + cliprange_high (DAPO's clip-higher, e.g. 0.28); null = cliprange."""
    kl_loss_coef: float = 0.0
    """Weight of KL(pi || pi_ref) as a loss term (GRPO's beta; 0 = none); init_kl_coef puts a KL
    penalty into the reward instead (PPO, REINFORCE++)."""
    kl_estimator: str = "k3"
    """k1 | k2 | k3: the per-token KL estimate of the loss term (nemo_rlhf.algorithms.policy_losses)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose rewards are all equal are replaced by groups of further
    prompts (up to dynamic_sampling_max_rounds generation rounds per iteration; still short, the
    batch is filled with such groups). Logged: dynamic_sampling/rounds, /flat_groups, /filled."""
    dynamic_sampling_max_rounds: int = 3
    loss_aggregation: str = "token_mean"
    """token_mean (PPO, DAPO) | seq_mean_token_mean (GRPO, GSPO) | seq_mean_token_sum (Dr. GRPO)."""
    reward_fn: str = "task"
    """task (the built-in task's reward: randomwalks' optimality, arithmetic's exact match; its
    name works too) | 'package.module:function' called as
    fn(samples, prompts=..., completions=...) -> list of floats."""
    reward_fns: List[str] = field(default_factory=list)
    """Several reward functions (each as reward_fn takes it), summed with reward_weights; each
    one's mean is logged as reward/<function name>. Non-empty: replaces reward_fn."""
    reward_weights: List[float] = field(default_factory=list)
    """One weight per reward_fns entry; empty = 1 each."""
    reward_model: Optional[str] = None
    """A checkpoint of a GPT with a scalar head (value_head) to score samples instead of reward_fn
    (score = the head's output at the last token)."""
    sft_warmup: SFTWarmupConfig = field(default_factory=SFTWarmupConfig)
    """When model.path is null: SFT warm-up on the task's data before PPO (steps=0: from random init)."""

    def __post_init__(self):
        for key in ("num_rollouts", "ppo_epochs", "num_minibatches", "kl_horizon"):
            _positive(getattr(self, key), f"ppo.{key}")
        _require(self.num_rollouts % self.num_minibatches == 0,
                 f"ppo.num_rollouts={self.num_rollouts} is not divisible by ppo.num_minibatches={self.num_minibatches}")
        _require(self.critic in CRITICS, f"ppo.critic must be {'|'.join(CRITICS)}, got {self.critic!r}")
        _require(self.advantage_estimator in ADVANTAGE_ESTIMATORS,
                 f"ppo.advantage_estimator must be {'|'.join(ADVANTAGE_ESTIMATORS)}, got {self.advantage_estimator!r}")
        row = ADVANTAGE_ESTIMATORS[self.advantage_estimator]
        _require(row.needs_values == (self.critic != "none"),
                 f"ppo.advantage_estimator={self.advantage_estimator} "
                 + ("needs a critic (ppo.critic=separate|value_head)" if row.needs_values else
                    "is critic-free: set ppo.critic=none"))
        _positive(self.num_generations, "ppo.num_generations")
        _require(not row.needs_groups or self.num_generations > 1,
                 f"ppo.advantage_estimator={self.advantage_estimator} compares the samples of one prompt: "
                 f"ppo.num_generations must be > 1")
        _require(self.num_rollouts % self.num_generations == 0,
                 f"ppo.num_rollouts={self.num_rollouts} is not divisible by ppo.num_generations={self.num_generations}")
        _require(self.grpo_scale in ("group", "batch", "none"),
                 f"ppo.grpo_scale must be group|batch|none, got {self.grpo_scale!r}")
        _require(self.policy_loss in POLICY_LOSSES,
                 f"ppo.policy_loss must be {'|'.join(POLICY_LOSSES)}, got {self.policy_loss!r}")
        _require(self.kl_estimator in KL_ESTIMATORS,
                 f"ppo.kl_estimator must be {'|'.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        _require(self.loss_aggregation in LOSS_AGGREGATIONS,
                 f"ppo.loss_aggregation must be {'|'.join(LOSS_AGGREGATIONS)}, got {self.loss_aggregation!r}")
        _positive(self.dynamic_sampling_max_rounds, "ppo.dynamic_sampling_max_rounds")
        _require(not self.dynamic_sampling or self.num_generations > 1,
                 "ppo.dynamic_sampling compares the samples of one prompt: ppo.num_generations must be > 1")
        _require(self.kl_loss_coef >= 0, f"ppo.kl_loss_coef must be >= 0, got {self.kl_loss_coef}")
        _require(not self.reward_weights or len(self.reward_weights) == len(self.reward_fns),
                 f"ppo.reward_weights has {len(self.reward_weights)} weights for {len(self.reward_fns)} ppo.reward_fns")
        _require(self.cliprange_high is None or self.cliprange_high > 0, "ppo.cliprange_high must be null or > 0")
        _require(self.scale_reward in ("none", "running"),
                 f"ppo.scale_reward must be none|running, got {self.scale_reward!r}")
        _require(self.init_kl_coef >= 0, f"ppo.init_kl_coef must be >= 0, got {self.init_kl_coef}")
        _require(self.target_kl is None or self.target_kl > 0, "ppo.target_kl must be null or > 0")
        _require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")




Config = PPOConfig


@dataclass
class PPOData:
    prompt_ids: list
    reward_fn: object
    eval_prompt_ids: Optional[list]
    summary: dict


def prepare(ctx: RunContext, rcfg: RunConfig, block: PPOConfig, reward_fn=None, prompts=None,
            eval_prompts=None) -> PPOData:
    """Prompts (strings of any token lengths) and the reward function, checked before any training."""
    if block.reward_model is not None and reward_fn is None:
        reward_fn = RewardModelScorer(block.reward_model, rcfg.model, rcfg.parallel, ctx.tokenizer)
    if reward_fn is None and block.reward_fns:
        reward_fn = weighted_rewards(block.reward_fns, block.reward_weights, ctx.task)
    reward_fn = resolve_reward_fn(reward_fn if reward_fn is not None else block.reward_fn, ctx.task)
    room = rcfg.model.seq_length - (rcfg.generation.max_new_tokens or rcfg.task.max_length)
    prompt_ids, extra = (None, {}) if prompts is not None else file_examples(
        ctx, rcfg, "prompt", rcfg.generation.max_new_tokens or rcfg.task.max_length)
    if prompts is not None:
        prompt_ids = encode_prompts(ctx.tokenizer, prompts, room)
    elif prompt_ids is None:  # the task's prompts (randomwalks: the start node of each walk, as trlX)
        prompt_ids = encode_prompts(ctx.tokenizer, ctx.task.prompts(), room, f"task {ctx.task.name}'s prompts")
    eval_ids = None if eval_prompts is None else encode_prompts(ctx.tokenizer, eval_prompts, room, "eval_prompts")
    # which row of the online-RL loop ran (GRPO / RLOO / ... are presets of the ppo: block)
    rows = {k: getattr(block, k) for k in ("advantage_estimator", "critic", "policy_loss") if hasattr(block, k)}
    return PPOData(prompt_ids, reward_fn, eval_ids, {"num_prompts": len(prompt_ids), **rows, **extra})


def build(ctx: RunContext, rcfg: RunConfig, block: PPOConfig, data: PPOData, rd, config_yaml: str) -> Job:
    evaluate_fn = ctx.evaluate_fn
    if data.eval_prompt_ids is not None:
        evaluate_fn = partial(evaluate_with_prompts, ctx, data.eval_prompt_ids, data.reward_fn)
    module = PPOModule(rcfg, data.prompt_ids, ctx.tokenizer, data.reward_fn, rd, evaluate_fn, ctx.dp_rank,
                       ctx.dp_size, config_yaml=config_yaml)
    return Job(module, load_initial=module.init_from, engine=module.actor,
               extra_engines=module.engines_for_checkpoint(),
               after_resume=lambda loop, rd: module.load_loop_state(loop), summary=data.summary)


def evaluate_with_prompts(ctx: RunContext, prompt_ids, reward_fn, engine, step):
    """Task metrics plus the mean reward of temperature-1 samples from user-given eval prompts."""
    metrics = ctx.evaluate_fn(engine, step)
    tok, g = ctx.tokenizer, ctx.rcfg.generation
    ids, lengths = left_pad(prompt_ids, tok.pad_id)
    out = generate(engine.stages, ids, SamplingParams(
        max_new_tokens=g.max_new_tokens or ctx.rcfg.task.max_length, temperature=g.temperature, top_k=g.top_k,
        top_p=g.top_p, eos_id=tok.eos_id, pad_id=tok.pad_id),
        generator=torch.Generator().manual_seed(ctx.rcfg.trainer.seed + step), vocab_size=tok.vocab_size,
        prompt_lengths=lengths)
    prompts = [tok.decode(p) for p in prompt_ids]
    completions = [tok.decode(c.tolist()) for c in out.completions]
    scores = score(reward_fn, [p + c for p, c in zip(prompts, completions)], prompts, completions)
    metrics["eval_reward_mean"] = sum(scores) / len(scores)
    return metrics
