"""Implicit Language Q-Learning (Snell et al. 2022, "Offline RL for Natural Language Generation
with Implicit Language Q Learning"; trlX ``ILQLConfig.loss``).

Shapes: B sequences, T action positions (position t = the state after the prompt and t actions;
the action taken there is ``actions[:, t]``), V vocabulary.

    Q-loss    sum_i mean_t (Q_i(s_t, a_t) - [r_t + gamma * V(s_{t+1}) * nonterminal_{t+1}])^2
    V-loss    mean_t |tau - 1(minQ_target(s_t, a_t) < V(s_t))| * (minQ_target - V)^2   (expectile)
    CQL       sum_i mean_t CE(Q_i(s_t, .), a_t)          (push Q down on actions not taken)
    AWAC      mean_t exp(awac_beta * (minQ_target - V)) * CE(logits(s_t, .), a_t)
    loss      = Q-loss + alpha * V-loss + cql_scale * CQL + awac_scale * AWAC

"mean_t" is a masked mean over the valid (non-padding) action positions of the batch: a sum
divided by the number of valid actions, as trlX does (``n_nonterminal``). Targets (the bootstrap
value, the target-Q minimum) are detached.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from nemo_rlhf.algorithms.reductions import masked_mean


def ilql_loss(q1: torch.Tensor, q2: Optional[torch.Tensor], target_q1: torch.Tensor,
              target_q2: Optional[torch.Tensor], v: torch.Tensor, v_next: torch.Tensor,
              action_nll: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
              next_nonterminal: torch.Tensor, gamma: float = 0.99, tau: float = 0.7, alpha: float = 1.0,
              cql_scale: float = 0.1, awac_scale: float = 1.0, awac_beta: float = 0.0
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """ILQL loss.

    q1, q2, target_q1, target_q2: [B, T, V] Q-values of every action at each state (q2 / target_q2
    None with a single Q head); v: [B, T] V(s_t); v_next: [B, T] V(s_{t+1}); action_nll: [B, T]
    -log pi(a_t | s_t) of the language model; actions: [B, T] long; rewards: [B, T];
    mask: [B, T] valid action positions; next_nonterminal: [B, T] 0 where s_{t+1} is terminal.
    """
    qs = [q for q in (q1, q2) if q is not None]
    target_qs = [q for q in (target_q1, target_q2) if q is not None]
    idx = actions.unsqueeze(-1)
    q_taken = [q.gather(-1, idx).squeeze(-1) for q in qs]
    target_q = torch.stack([q.gather(-1, idx).squeeze(-1) for q in target_qs]).min(0).values.detach()
    # bootstrap target: r_t + gamma * V(s_{t+1}) (0 after the terminal state)
    q_target = (rewards + gamma * v_next * next_nonterminal).detach()
    loss_q = sum(masked_mean((q - q_target) ** 2, mask) for q in q_taken)
    # expectile regression of V towards min target Q
    diff = target_q - v
    weight = torch.where(diff >= 0, torch.full_like(diff, tau), torch.full_like(diff, 1 - tau))
    loss_v = masked_mean(weight * diff ** 2, mask)
    # CQL: cross-entropy of Q as logits against the taken action
    loss_cql = sum(masked_mean(F.cross_entropy(q.float().transpose(1, 2), actions, reduction="none"), mask)
                   for q in qs)
    # AWAC-weighted language-model term
    awac_weight = torch.exp(awac_beta * diff).detach()
    loss_awac = masked_mean(awac_weight * action_nll, mask)
    loss = loss_q + alpha * loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    with torch.no_grad():
        stats = {"loss_q": loss_q.detach(), "loss_v": loss_v.detach(), "loss_cql": loss_cql.detach(),
                 "loss_awac": loss_awac.detach(), "q_mean": masked_mean(q_taken[0].detach(), mask),
                 "v_mean": masked_mean(v.detach(), mask), "target_q_mean": masked_mean(target_q, mask)}
    return loss, stats


def ilql_logits(logits: torch.Tensor, q1: torch.Tensor, q2: Optional[torch.Tensor], v: torch.Tensor,
                beta: float) -> torch.Tensor:
    """ILQL sampling (Snell et al., Sec. 4.2; trlX): log pi_beta + beta * (min Q - V).
    logits, q1, q2: [B, V]; v: [B] or [B, 1]."""
    q = q1 if q2 is None else torch.minimum(q1, q2)
    v = v.reshape(-1, 1)
    return torch.log_softmax(logits.float(), -1) + beta * (q.float() - v.float())


@torch.no_grad()
def polyak_update(target: torch.nn.Module, source: torch.nn.Module, rate: float) -> None:
    """target <- rate * source + (1 - rate) * target (rate 1 = hard copy)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(1 - rate).add_(s.detach(), alpha=rate)
