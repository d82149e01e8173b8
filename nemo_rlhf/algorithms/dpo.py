"""Offline preference losses: DPO and variants, SimPO, ORPO, KTO, Bradley-Terry reward models.

Inputs are per-example sequence log-probabilities (``[B]``): sums of token log-probs over the
completion, or their means where the method says so (SimPO, ORPO, and IPO with length
normalisation). Every function returns per-example losses; the caller reduces them (a sum
divided by the global number of examples, so the result does not depend on the batch split).
Variants are a flat table (``DPO_LOSSES``), not an if/elif chain.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F


def _sigmoid(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # DPO (Rafailov et al. 2023, Eq. 7); conservative DPO with label smoothing eps (Mitchell 2023):
    # -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def _ipo(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # IPO (Azar et al. 2023, Eq. 17): (h - 1 / (2 beta))^2, h the beta-free log-ratio difference
    return (logits - 1 / (2 * beta)) ** 2


def _hinge(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # SLiC-style hinge (Zhao et al. 2023): max(0, 1 - beta h)
    return torch.relu(1 - beta * logits)


def _robust(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Robust DPO (Chowdhury et al. 2024, Eq. 9): unbiased under preference-label flips with rate eps
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing)


DPO_LOSSES: Dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid, "ipo": _ipo, "hinge": _hinge, "robust": _robust,
}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses and implicit rewards.

        h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))
        rewards = beta * (log pi - log pi_ref), detached

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (known: {', '.join(DPO_LOSSES)})")
    if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
        raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = DPO_LOSSES[loss_type](logits, beta, label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor, beta: float,
               gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, Eq. 6), reference-free on length-normalised log-probs:
    -log sigma(beta * (avg_w - avg_l) - gamma)."""
    logits = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def orpo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor,
              chosen_nll: torch.Tensor, lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, Eqs. 6-7), no reference model:

        log odds(y) = log p - log(1 - p),  p = exp(mean token log-prob)
        L = NLL(y_w) - lam * log sigma(log odds(y_w) - log odds(y_l))

    Returns ``(losses, log_odds_ratio)``."""
    log_odds = (policy_chosen_avg_logps - policy_rejected_avg_logps) - (
        torch.log1p(-torch.exp(policy_chosen_avg_logps)) - torch.log1p(-torch.exp(policy_rejected_avg_logps)))
    ratio = F.logsigmoid(log_odds)
    return chosen_nll - lam * ratio, log_odds.detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, Eq. 8) on unpaired examples:

        r = log pi(y|x) - log pi_ref(y|x);  z0 = max(0, KL estimate), detached
        desirable:   w_d * (1 - sigma(beta (r - z0)))
        undesirable: w_u * (1 - sigma(beta (z0 - r)))

    ``desirable`` [B] bool; ``kl`` a scalar estimate of KL(pi || pi_ref) (e.g. from mismatched
    prompt/completion pairs, as the paper)."""
    r = policy_logps - ref_logps
    z0 = torch.clamp(kl, min=0).detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable.bool(), good, bad)


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, Sec. 4.1): the batch mean of
    log pi(y'|x) - log pi_ref(y'|x) over mismatched pairs (x, y'), clamped at 0 and detached (no
    gradient flows through the reference point)."""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, Eq. 1):
    -log sigma(r_w - r_l - margin). Returns ``(losses, correct)`` with correct = r_w > r_l."""
    diff = chosen_rewards - rejected_rewards
    return -F.logsigmoid(diff - margin), (diff > 0).float().detach()
