"""The critics of the online-RL loop, one row each of :data:`CRITICS` (by ppo.critic): a separate
value model, a value head on the actor, or none (critic-free: GRPO, RLOO, REINFORCE++)."""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional

import torch

from nemo_rlhf.algorithms.ppo import value_loss
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.models.gpt import unwrap
from nemo_rlhf.models.heads import attach_value_head, has_head, value_head_output
from nemo_rlhf.modules.engine import MegatronEngine, lm_forward_with_states
from nemo_rlhf.modules.forward_only import lm_across_stages


def stats_report(total: torch.Tensor, count: torch.Tensor, stats: Dict[str, torch.Tensor], mask: torch.Tensor):
    """Megatron loss-closure output: (loss sum, its count, {name: [sum, count]}). The engine divides
    the gradients by the count summed over all micro-batches and ranks (calculate_per_token_loss),
    so ``count`` is the loss's normaliser (tokens, sequences, ...); stats are per-token means."""
    n = mask.sum()
    report = {"loss": torch.stack([total.detach(), count.to(total.dtype)]).double()}
    for k, v in stats.items():
        report[k] = torch.stack([v.detach() * n, n]).double()
    return total, count.to(torch.int), report


def critic_forward(batch: Dict[str, torch.Tensor], model, ppo, pack: bool = False):
    _, states = lm_forward_with_states(model, batch["tokens"], None, batch["loss_mask"], batch.get("pad"), pack=pack)
    if not has_head(unwrap(model)):   # a pipeline stage before the last: its hidden states go on
        return states.hidden, None
    values = value_head_output(unwrap(model), states)
    return values, partial(critic_loss, batch, ppo)


def critic_loss(batch, ppo, values):
    mask = batch["loss_mask"]
    loss, stats = value_loss(values, batch["values"], batch["returns"], mask, ppo.cliprange_value)
    return stats_report(loss * mask.sum(), mask.sum(), stats, mask)


class SeparateCritic:
    """ppo.critic=separate: its own GPT trunk + value head and optimizer (lr ppo.critic_lr),
    trained after the actor on each minibatch; checkpointed as the extra engine "critic"."""

    on_actor = False   # the actor has no value head; its loss has no value term

    def __init__(self, cfg: RunConfig, vocab: int, actor: MegatronEngine):
        lr = cfg.ppo.critic_lr
        optim = cfg.optim if lr is None else type(cfg.optim)(**{**cfg.optim.__dict__, "lr": lr})
        self.engine = MegatronEngine(cfg.model, cfg.parallel, optim, vocab, cfg.trainer.max_steps,
                                     setup=lambda gpt: attach_value_head(gpt, cfg.model.hidden_size))
        self.chunks = self.engine.chunks

    def load(self, path) -> None:
        from nemo_rlhf.weights import load_weights

        load_weights(path, self.engine.chunks)
        self.engine.optimizer.reload_model_params()

    def values(self, policy_states, tokens, loss_mask, pad) -> torch.Tensor:
        critic = self.engine.module
        critic.eval()
        _, states = lm_forward_with_states(critic, tokens, None, loss_mask, pad)
        return value_head_output(critic, states)

    def values_across_stages(self, policy_values, tokens, pad, micro_batch_size=None) -> torch.Tensor:
        for chunk in self.engine.stages:
            chunk.eval()
        return lm_across_stages(self.engine.stages, tokens, None, pad, value_head_output, micro_batch_size)[1]

    def train_step(self, batch, micro_batch_size: int, ppo, pack: bool = False) -> Dict[str, float]:
        stats = self.engine.train_step(batch, micro_batch_size, partial(critic_forward, ppo=ppo, pack=pack))
        return {f"critic/{k}": v for k, v in stats.items()}

    def checkpoint_engines(self):
        return {"critic": (self.engine.chunks, self.engine.optimizer, self.engine.scheduler)}


class ValueHeadCritic:
    """ppo.critic=value_head: a value head on the policy trunk; the actor's loss carries the value
    loss (weight ppo.vf_coef), so the critic has no engine, step or checkpoint of its own."""

    on_actor = True
    chunks: List[torch.nn.Module] = []

    def __init__(self, cfg: RunConfig, vocab: int, actor: MegatronEngine):
        self.actor = actor

    def load(self, path) -> None:
        pass   # the head is part of the actor's weights

    def values(self, policy_states, tokens, loss_mask, pad) -> torch.Tensor:
        return value_head_output(self.actor.module, policy_states)

    def values_across_stages(self, policy_values, tokens, pad, micro_batch_size=None) -> torch.Tensor:
        return policy_values   # the head ran on the policy's last stage

    def train_step(self, batch, micro_batch_size: int, ppo, pack: bool = False) -> Dict[str, float]:
        return {}

    def checkpoint_engines(self):
        return {}


class NoCritic:
    """ppo.critic=none: critic-free estimators (GRPO, RLOO, REINFORCE++) need no values."""

    on_actor = False
    chunks: List[torch.nn.Module] = []

    def __init__(self, cfg: RunConfig, vocab: int, actor: MegatronEngine):
        pass

    def load(self, path) -> None:
        pass

    def values(self, policy_states, tokens, loss_mask, pad) -> Optional[torch.Tensor]:
        return None

    def values_across_stages(self, policy_values, tokens, pad, micro_batch_size=None) -> Optional[torch.Tensor]:
        return None

    def train_step(self, batch, micro_batch_size: int, ppo, pack: bool = False) -> Dict[str, float]:
        return {}

    def checkpoint_engines(self):
        return {}


CRITICS: Dict[str, type] = {"separate": SeparateCritic, "value_head": ValueHeadCritic, "none": NoCritic}
"""The ppo.critic values -> the critic's class. A class gives ``on_actor`` (a value head on the
actor and a value term in its loss), ``chunks``, ``load(path)``, ``values(policy_states, tokens,
loss_mask, pad)`` ([B, T], or None for a critic-free kind), ``values_across_stages(policy_values,
tokens, pad, micro_batch_size)`` (the same at PP > 1, on every rank, through the pipeline schedule
in micro-batches of that many rows; ``policy_values``: the actor's value head's output when it has
one), ``train_step(batch, micro_batch_size, ppo)`` (its stats, "critic/"-prefixed) and
``checkpoint_engines()``."""


