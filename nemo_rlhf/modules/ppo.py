"""PPO as a LightningModule. One ``training_step`` is one PPO iteration and reads top to bottom:

    generate -> score -> old logprobs / values / reference logprobs -> KL-shaped rewards
    -> advantages -> ppo_epochs x num_minibatches updates of actor (and critic) -> KL controller

The math is in :mod:`nemo_rlhf.algorithms.ppo` and :mod:`nemo_rlhf.algorithms.advantages` (the
advantage estimator: one row of its table, by ppo.advantage_estimator); the critic is one row of
:data:`CRITICS` (by ppo.critic). This module wires megatron engines, data and logging.
``ppo`` arguments are the recipe's config block (``nemo_rlhf.recipes.ppo.PPOConfig``; modules sit
below recipes and do not import them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Callable, Dict, List, Optional

import torch

from nemo_rlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS, estimate_advantages, sequence_scores
from nemo_rlhf.algorithms.policy_losses import KL_ESTIMATORS, POLICY_LOSSES, aggregate, informative_groups, kl_k3
from nemo_rlhf.algorithms.ppo import kl_penalized_rewards, make_kl_controller, value_loss
from nemo_rlhf.algorithms.reductions import masked_mean
from nemo_rlhf.algorithms.reductions import INITIAL_MOMENTS, Moments, moments_std, update_moments
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.logging import get_logger
from nemo_rlhf.models.gpt import unwrap
from nemo_rlhf.models.heads import attach_value_head, has_head, value_head_output
from nemo_rlhf.modules.critics import CRITICS, stats_report  # noqa: F401  (CRITICS: the ppo.critic table)
from nemo_rlhf.modules.engine import MegatronEngine, build_chunks, lm_forward, lm_forward_with_states
from nemo_rlhf.modules.forward_only import lm_across_stages
from nemo_rlhf.modules.loop import dp_loader, end_of_step, record_eval, save_engine, TrainingSystem
from nemo_rlhf.modules.rollouts import (PromptDataset, concat_rollouts, sample_rollouts, score_rollouts,
                                        trim_left_padding)
from nemo_rlhf.modules.run_dir import RunDirectory
from nemo_rlhf.parallel.reductions import all_reduce_sum, data_parallel_group, dp_moments, dp_whiten


log = get_logger(__name__)


@dataclass
class Rollout:
    """A batch of experience. T = prompt + response length - 1 (label positions)."""

    tokens: torch.Tensor        # [B, T] sequence[:, :-1] (model inputs); rows start with pad[b] left-padding tokens
    labels: torch.Tensor        # [B, T] sequence[:, 1:]
    loss_mask: torch.Tensor     # [B, T] 1 where labels[:, t] is a generated token (through EOS)
    logprobs: torch.Tensor      # [B, T] log pi_old(labels[:, t])
    ref_logprobs: torch.Tensor  # [B, T] log pi_ref(labels[:, t])
    values: torch.Tensor        # [B, T] V_old(state before labels[:, t]); 0 without a critic
    rewards: torch.Tensor       # [B, T] KL penalty per token + score on the last token
    advantages: torch.Tensor    # [B, T]
    returns: torch.Tensor       # [B, T]
    scores: torch.Tensor        # [B]
    pad: torch.Tensor           # [B] left padding of each row's prompt (ragged prompts; masked out everywhere)
    groups: torch.Tensor        # [B] the prompt of each sample (ppo.num_generations samples share one)

    def as_dict(self) -> Dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def actor_forward(batch: Dict[str, torch.Tensor], model, ppo, with_value: bool, max_length: int = 0,
                  pack: bool = False):
    nll, states = lm_forward_with_states(model, batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("pad"),
                                         pack=pack)
    # (before the last pipeline stage, ``nll`` is the stage's hidden output and the loss is not called)
    values = value_head_output(unwrap(model), states) if with_value and has_head(unwrap(model)) else None
    return nll, partial(actor_loss, batch, ppo, values, max_length=max_length)


def actor_loss(batch, ppo, values, nll, max_length: int = 0):
    """The policy loss (ppo.policy_loss: per-token or GSPO's sequence ratio, clipped to
    [1 - cliprange, 1 + cliprange_high]), plus ppo.kl_loss_coef * KL(pi || pi_ref) by ppo.kl_estimator,
    aggregated by ppo.loss_aggregation (Dr. GRPO's constant: ``max_length``, the generation budget);
    plus vf_coef * the value loss with a value head."""
    mask = batch["loss_mask"]
    logprobs = -nll.float()
    high = ppo.cliprange if ppo.cliprange_high is None else ppo.cliprange_high
    token_losses, stats = POLICY_LOSSES[ppo.policy_loss](logprobs, batch["logprobs"], batch["advantages"], mask,
                                                          ppo.cliprange, high)
    with torch.no_grad():
        stats["approx_kl"] = masked_mean(kl_k3((batch["logprobs"] - logprobs) * mask), mask)   # KL(old || new)
        stats["policy_clipfrac"] = stats["clipfrac_low"] + stats["clipfrac_high"]
    if ppo.kl_loss_coef:
        kl = KL_ESTIMATORS[ppo.kl_estimator]((logprobs - batch["ref_logprobs"]) * mask) * mask
        token_losses = token_losses + ppo.kl_loss_coef * kl
        stats["kl_loss"] = masked_mean(kl.detach(), mask)
    total, count = aggregate(token_losses, mask, ppo.loss_aggregation, max_length or mask.shape[1])
    stats["policy_loss"] = total.detach() / count
    if values is not None:
        vloss, vstats = value_loss(values, batch["values"], batch["returns"], mask, ppo.cliprange_value)
        total = total + ppo.vf_coef * vloss * count
        stats.update(vstats)
    return stats_report(total, count, stats, mask)


class PPOModule(TrainingSystem):
    """Actor (megatron engine), critic (a row of :data:`CRITICS`: a separate engine, or a value
    head on the actor), frozen
    reference policy, reward function; prompts come from ``prompts`` (token-id lists of any lengths,
    or an [N, P] tensor), left-padded per batch: generation, the experience forwards and the updates
    all mask the padding out (see :func:`~nemo_rlhf.modules.engine.lm_forward`)."""

    def __init__(self, cfg: RunConfig, prompts: torch.Tensor, tokenizer, reward_fn: Callable,
                 run_dir: RunDirectory, evaluate_fn, dp_rank: int, dp_size: int, config_yaml: str = ""):
        super().__init__()
        self.cfg, self.ppo = cfg, cfg.ppo
        self.prompts = PromptDataset(prompts, tokenizer.pad_id)
        self.tokenizer, self.reward_fn = tokenizer, reward_fn
        self.run_dir, self.evaluate_fn = run_dir, evaluate_fn
        self.dp_rank, self.dp_size, self.config_yaml = dp_rank, dp_size, config_yaml
        prompts_per_step = self.ppo.num_rollouts // self.ppo.num_generations
        if prompts_per_step % dp_size:
            raise ValueError(f"ppo.num_rollouts / ppo.num_generations = {prompts_per_step} prompts per iteration are "
                             f"not divisible by the data-parallel size {dp_size} (a prompt's samples stay on one rank)")
        vocab, critic = tokenizer.vocab_size, CRITICS[self.ppo.critic]
        self.actor = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, vocab, cfg.trainer.max_steps,
                                    setup=(lambda gpt: attach_value_head(gpt, cfg.model.hidden_size))
                                    if critic.on_actor else None)
        self.critic = critic(cfg, vocab, self.actor)
        self.reference = [c.eval() for c in build_chunks(cfg.model, cfg.parallel, vocab)]   # this rank's chunks
        for chunk in self.reference:
            chunk.requires_grad_(False)
        self.models = torch.nn.ModuleList(self.actor.chunks + self.critic.chunks)
        self.pipelined = cfg.parallel.pipeline_model_parallel_size > 1
        self.measures_kl = self.ppo.init_kl_coef > 0 or self.ppo.kl_loss_coef > 0
        """With both KL coefficients 0 nothing reads the reference log-probs: their forward is skipped
        (kl is then logged as 0, not measured), as TRL does with beta=0."""
        if not self.measures_kl:
            log.info("ppo.init_kl_coef = ppo.kl_loss_coef = 0: the reference forward is skipped (kl not measured)")
        self.kl_ctl = make_kl_controller(self.ppo.init_kl_coef, self.ppo.target_kl, self.ppo.kl_horizon)
        self.reward_moments: Moments = INITIAL_MOMENTS   # running moments of the scores (scale_reward=running)

    # -- set-up -------------------------------------------------------------------------------
    def init_from(self, path) -> None:
        """Policy, critic trunk and reference all start from the policy weights in ``path``."""
        from nemo_rlhf.weights import load_weights

        load_weights(path, self.actor.chunks)
        self.actor.optimizer.reload_model_params()
        self.critic.load(path)
        load_weights(path, self.reference)

    def train_dataloader(self):
        return dp_loader(self.prompts, self, global_batch_size=self.ppo.num_rollouts // self.ppo.num_generations)

    # -- one PPO iteration ----------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        timings = {}

        def timed(name, fn, *args):
            t0 = time.perf_counter()
            out = fn(*args)
            timings[f"time/{name}_s"] = timings.get(f"time/{name}_s", 0.0) + time.perf_counter() - t0
            return out

        prompts, pad = trim_left_padding(*batch)                # [B, P], [B]
        tokens, mask, pad, scores, groups, sampling = self.sample_groups(prompts, pad, timed)
        rollout = timed("experience", self.make_experience, tokens, mask, scores, pad, groups)
        stats = timed("training", self.update, rollout)
        self.step += 1
        stats.update(self.rollout_stats(rollout), **self.reward_component_means(), **sampling, **timings)
        generated = self._dp_sum([float(mask.sum())])[0]
        stats["generation_tokens_per_s"] = generated / max(timings["time/generation_s"], 1e-9)
        stats["kl_coef"] = self.kl_ctl.value
        self.kl_ctl.update(stats["kl"], n_steps=self.ppo.num_rollouts)
        end_of_step(self, stats, prog_bar=("reward_mean", "kl"))

    def sample_groups(self, prompts: torch.Tensor, pad: torch.Tensor, timed):
        """ppo.num_generations scored samples of each prompt, a prompt's samples kept together on this
        rank: (tokens [B, P + N], generated mask [B, N], pad [B], scores [B], groups [B], stats).

        With ppo.dynamic_sampling (DAPO), groups whose scores are all equal (zero advantage, no
        gradient) are set aside and further prompts, drawn from the prompt set by a seeded generator
        (so a resumed run draws the same), are sampled in up to dynamic_sampling_max_rounds rounds
        until the batch is full; if it is still short, set-aside groups fill it (counted in
        ``dynamic_sampling/filled``)."""
        ppo, g = self.ppo, self.ppo.num_generations
        want = prompts.shape[0]
        kept, flat, rounds = [], [], 0
        while True:
            rows, row_pad = prompts.repeat_interleave(g, 0), pad.repeat_interleave(g)
            tokens, mask = timed("generation", self.generate_rollouts, rows, row_pad, rounds)
            scores = timed("scoring", self.score, tokens, rows.shape[1], row_pad)
            rounds += 1
            if not ppo.dynamic_sampling:
                groups = torch.arange(want, device=rows.device).repeat_interleave(g)
                return tokens, mask, row_pad, scores, groups, {}
            groups = torch.arange(prompts.shape[0], device=rows.device).repeat_interleave(g)
            informative = informative_groups(scores, groups)
            for j in range(prompts.shape[0]):
                part = slice(j * g, (j + 1) * g)
                (kept if bool(informative[j * g]) else flat).append(
                    (tokens[part], mask[part], row_pad[part], scores[part]))
            if len(kept) >= want or rounds >= ppo.dynamic_sampling_max_rounds:
                break
            prompts, pad = self.draw_prompts(want, rounds, prompts.device)
        chosen = (kept + flat)[:want]
        tokens, mask, pad = concat_rollouts([c[:3] for c in chosen], self.tokenizer.pad_id)
        scores = torch.cat([c[3] for c in chosen])
        rounds_sum, flat_sum, filled_sum = self._dp_sum([float(rounds), float(len(flat)),
                                                         float(max(want - len(kept), 0))])
        stats = {"dynamic_sampling/rounds": rounds_sum / self.dp_size,
                 "dynamic_sampling/flat_groups": flat_sum, "dynamic_sampling/filled": filled_sum}
        return tokens, mask, pad, scores, torch.arange(want, device=tokens.device).repeat_interleave(g), stats

    def draw_prompts(self, n: int, round_: int, device):
        """``n`` prompts drawn (with replacement) from the prompt set for dynamic sampling's round ``round_``."""
        gen = torch.Generator().manual_seed(self.cfg.trainer.seed * 1_000_003 + self.step * 1009 + self.dp_rank
                                            + 104_729 * round_)
        idx = torch.randint(len(self.prompts), (n,), generator=gen)
        return trim_left_padding(self.prompts.ids[idx].to(device), self.prompts.lengths[idx])

    def generate_rollouts(self, prompts: torch.Tensor, pad: Optional[torch.Tensor] = None, round_: int = 0):
        return sample_rollouts(self.actor.stages, prompts, pad, self.cfg, self.tokenizer,
                               seed=self.cfg.trainer.seed * 1_000_003 + self.step * 1009 + self.dp_rank
                               + 7_777_771 * round_)

    def score(self, tokens: torch.Tensor, prompt_length: int, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        return score_rollouts(self.reward_fn, self.tokenizer, tokens, prompt_length, pad)

    @torch.no_grad()
    def make_experience(self, tokens: torch.Tensor, gen_mask: torch.Tensor, scores: torch.Tensor,
                        pad: Optional[torch.Tensor] = None, groups: Optional[torch.Tensor] = None) -> Rollout:
        ppo = self.ppo
        b, s = tokens.shape
        pad = torch.zeros(b, dtype=torch.long, device=tokens.device) if pad is None else pad
        groups = torch.arange(b, device=tokens.device) if groups is None else groups
        p = s - gen_mask.shape[1]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        mask = torch.zeros_like(labels, dtype=torch.float32)   # the rollout's loss_mask
        mask[:, p - 1:] = gen_mask                     # label t is generated token t - (p - 1); prompts end at p
        if ppo.cliprange_reward:
            scores = scores.clamp(-ppo.cliprange_reward, ppo.cliprange_reward)
        if ppo.scale_reward == "running":
            self.reward_moments = update_moments(self.reward_moments, dp_moments(scores, self._dp_group()))
            scores = scores / moments_std(self.reward_moments)
        for chunk in self.actor.stages:
            chunk.eval()
        if self.pipelined:   # the stages run in turn, every rank gets the last stage's NLL and values
            mbs = self.cfg.trainer.micro_batch_size   # (micro-batches through the pipeline schedule)
            nll, head_values = lm_across_stages(self.actor.stages, inputs, labels, pad,
                                                value_head_output if self.critic.on_actor else None, mbs)
            logprobs = -nll
            values = self.critic.values_across_stages(head_values, inputs, pad, mbs)
            ref_logprobs = (-lm_across_stages(self.reference, inputs, labels, pad, micro_batch_size=mbs)[0]
                            if self.measures_kl else logprobs.clone())
        else:
            nll, states = lm_forward_with_states(self.actor.module, inputs, labels, mask, pad)
            logprobs = -nll.float()
            values = self.critic.values(states, inputs, mask, pad)
            ref_logprobs = (-lm_forward(self.reference[0], inputs, labels, mask, pad).float()
                            if self.measures_kl else logprobs.clone())
        logprobs, ref_logprobs = logprobs * mask, ref_logprobs * mask
        values = None if values is None else values * mask
        rewards, _ = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, self.kl_ctl.value)
        advantages, returns = estimate_advantages(ppo.advantage_estimator, rewards, values, mask, ppo, groups)
        row = ADVANTAGE_ESTIMATORS[ppo.advantage_estimator]
        if ppo.advantage_estimator == "grpo" and ppo.grpo_scale == "batch":   # group-centred / batch std
            advantages = advantages / (dp_moments(sequence_scores(rewards, mask), self._dp_group()).var ** 0.5 + 1e-6)
        if row.whiten if row.whiten is not None else ppo.whiten_advantages:
            advantages = dp_whiten(advantages, mask, self._dp_group())
        values = torch.zeros_like(logprobs) if values is None else values
        return Rollout(tokens=inputs, labels=labels, loss_mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
                       values=values, rewards=rewards, advantages=advantages, returns=returns, scores=scores, pad=pad,
                       groups=groups)

    def update(self, rollout: Rollout) -> Dict[str, float]:
        ppo = self.ppo
        data = rollout.as_dict()
        del data["scores"], data["groups"]
        n = rollout.tokens.shape[0]
        mb = n // ppo.num_minibatches
        mbs = min(self.cfg.trainer.micro_batch_size, mb)
        if mb == 0 or mb % mbs:
            raise ValueError(f"per-rank minibatch of {mb} samples is not divisible by trainer.micro_batch_size={mbs}")
        sums: Dict[str, float] = {}
        count = 0
        pack = self.cfg.data.packing   # each micro-batch's rollouts packed into fewer rows (modules/packing.py)
        for epoch in range(ppo.ppo_epochs):
            g = torch.Generator().manual_seed(self.cfg.trainer.seed + 7919 * self.step + epoch)
            order = torch.randperm(n, generator=g).to(rollout.tokens.device)
            for i in range(ppo.num_minibatches):
                idx = order[i * mb:(i + 1) * mb]
                batch = {k: v[idx] for k, v in data.items()}
                actor_stats = self.actor.train_step(
                    batch, mbs, partial(actor_forward, ppo=ppo, with_value=self.critic.on_actor, pack=pack,
                                        max_length=self.cfg.generation.max_new_tokens or self.cfg.task.max_length))
                stats = {f"actor/{k}": v for k, v in actor_stats.items()}
                stats.update(self.critic.train_step(batch, mbs, ppo, pack=pack))
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        # means over the minibatches; the token counts add up (throughput logs)
        return {k: v if k.endswith("model_tokens") else v / count for k, v in sums.items()}

    # -- distributed helpers ----------------------------------------------------------------------
    def _dp_group(self):
        return data_parallel_group() if self.dp_size > 1 else None

    def _dp_sum(self, values: List[float]) -> List[float]:
        return all_reduce_sum(torch.tensor(values, dtype=torch.float64), self._dp_group()).tolist()

    def reward_component_means(self) -> Dict[str, float]:
        """reward/<name>: the mean of each of several weighted reward functions (ppo.reward_fns)."""
        last = getattr(self.reward_fn, "last", None)
        if not last:
            return {}
        names = sorted(last)
        sums = self._dp_sum([float(sum(last[n])) for n in names] + [float(len(last[names[0]]))])
        return {f"reward/{n}": v / max(sums[-1], 1.0) for n, v in zip(names, sums[:-1])}

    def rollout_stats(self, r: Rollout) -> Dict[str, float]:
        """Rollout metrics averaged over all data-parallel ranks."""
        b = r.scores.numel()
        m = r.loss_mask
        kl_per_seq = ((r.logprobs - r.ref_logprobs) * m).sum(-1)
        lengths = m.sum(-1)
        sums = self._dp_sum([
            float(r.scores.sum()), float((r.scores ** 2).sum()), float(kl_per_seq.sum()),
            float(lengths.sum()), float(-(r.logprobs * m).sum()), float(m.sum()),
            float((r.values * m).sum()), float((r.returns * m).sum()), float(b),
            float((~informative_groups(r.scores, r.groups)).sum()) / self.ppo.num_generations,
            float(len(torch.unique(r.groups)))])
        score_sum, score_sq, kl, length, nll, tokens, v, ret, n, flat_groups, num_groups = sums
        mean = score_sum / n
        return {
            "reward_mean": mean, "reward_std": max(score_sq / n - mean ** 2, 0.0) ** 0.5,
            "kl": kl / n, "response_length": length / n,
            # entropy estimated as the mean negative log-probability of the sampled tokens
            "entropy": nll / max(tokens, 1.0),
            "values_mean": v / max(tokens, 1.0), "returns_mean": ret / max(tokens, 1.0),
            # groups whose samples all scored the same: zero advantage under GRPO / RLOO
            "zero_std_groups": flat_groups / max(num_groups, 1.0),
        }

    # -- evaluation & checkpoints ---------------------------------------------------------------
    def evaluate(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        return record_eval(self, self.evaluate_fn(self.actor, self.step), t0)

    def loop_state(self) -> Dict[str, Any]:
        return {"initial_eval": self.initial_eval, "kl_ctl": self.kl_ctl.state_dict(),
                "reward_moments": self.reward_moments._asdict()}

    def load_loop_state(self, state: Dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.initial_eval = state.get("initial_eval")
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_moments = self.reward_moments._replace(**state.get("reward_moments", {}))
        self._last_ckpt_step = self.step

    def engines_for_checkpoint(self):
        extra = self.critic.checkpoint_engines()
        extra["reference"] = (self.reference, None, None)
        return extra

    def save(self):
        save_engine(self, self.actor, loop_state=self.loop_state(), extra=self.engines_for_checkpoint())
