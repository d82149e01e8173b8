"""Offline preference losses: DPO and variants, SimPO, ORPO, KTO, Bradley-Terry reward models.

Inputs are per-example sequence log-probabilities (``[B]``): sums of token log-probs over the
completion, or their means where the method says so (SimPO, ORPO, and IPO with length
normalisation). Every function returns per-example losses; the caller reduces them (a sum
divided by the global number of examples, so the result does not depend on the batch split).
The DPO family is one flat table (``DPO_LOSSES``: loss type -> row), not an if/elif chain; so are
KTO's variants (``KTO_LOSSES``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

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


# loss of the reference-relative log-ratio difference h, by DPO loss type
_LOGIT_LOSSES: Dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
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
    if loss_type not in _LOGIT_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (known: {', '.join(_LOGIT_LOSSES)})")
    if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
        raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = _LOGIT_LOSSES[loss_type](logits, beta, label_smoothing)
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


def cpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_nll: torch.Tensor,
             beta: float, alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", Eq. 6), no reference model: DPO's
    sigmoid loss with the reference terms dropped, plus behaviour cloning on the chosen completion:

        L = -log sigma(beta * (log pi(y_w) - log pi(y_l)))  +  alpha * NLL(y_w)
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps)
    prefer = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return prefer + alpha * chosen_nll


class PreferenceLogps(NamedTuple):
    """What a row of the DPO family reads, each ``[B]``."""

    chosen: torch.Tensor
    """log pi(y_w | x): summed token log-probs, or their mean when the row is length-normalised
    (or dpo.length_normalize is set)."""
    rejected: torch.Tensor
    """log pi(y_l | x), the same way."""
    ref_chosen: Optional[torch.Tensor]
    """log pi_ref(y_w | x), the same way; None for reference-free rows."""
    ref_rejected: Optional[torch.Tensor]
    chosen_nll: torch.Tensor
    """Mean token NLL of y_w (ORPO's SFT term; CPO's behaviour-cloning term)."""


Rewards = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DPOVariant:
    """One row of the DPO family table."""

    loss: Callable[[PreferenceLogps, Any], Rewards]
    """(inputs, hyperparameters) -> (losses, chosen rewards, rejected rewards), each [B], the
    rewards detached. The hyperparameters are the dpo config block (beta, label_smoothing,
    simpo_gamma, orpo_lambda, ...): each row reads the fields it needs."""
    needs_reference: bool
    """False: no reference log-probs (no precomputing pass, no frozen model); ref_* are None."""
    length_normalized: bool
    """True: always mean token log-probs; False: sums, or means with dpo.length_normalize."""


def _reference_relative(loss_type: str, x: PreferenceLogps, hp) -> Rewards:
    return dpo_loss(x.chosen, x.rejected, x.ref_chosen, x.ref_rejected, hp.beta, loss_type, hp.label_smoothing)


def _simpo(x: PreferenceLogps, hp) -> Rewards:
    # reference-free "rewards": beta * average log-prob
    losses = simpo_loss(x.chosen, x.rejected, hp.beta, hp.simpo_gamma, hp.label_smoothing)
    return losses, hp.beta * x.chosen.detach(), hp.beta * x.rejected.detach()


def _orpo(x: PreferenceLogps, hp) -> Rewards:
    losses, _ = orpo_loss(x.chosen, x.rejected, x.chosen_nll, hp.orpo_lambda)
    return losses, hp.beta * x.chosen.detach(), hp.beta * x.rejected.detach()


def _cpo(x: PreferenceLogps, hp) -> Rewards:
    losses = cpo_loss(x.chosen, x.rejected, x.chosen_nll, hp.beta, hp.cpo_alpha, hp.label_smoothing)
    return losses, hp.beta * x.chosen.detach(), hp.beta * x.rejected.detach()


DPO_LOSSES: Dict[str, DPOVariant] = {
    #              loss                                       reference  length-normalised
    "sigmoid": DPOVariant(partial(_reference_relative, "sigmoid"), True, False),
    "ipo": DPOVariant(partial(_reference_relative, "ipo"), True, False),
    "hinge": DPOVariant(partial(_reference_relative, "hinge"), True, False),
    "robust": DPOVariant(partial(_reference_relative, "robust"), True, False),
    "simpo": DPOVariant(_simpo, False, True),
    "orpo": DPOVariant(_orpo, False, True),
    "cpo": DPOVariant(_cpo, False, False),
}
DPO_LOSS_TYPES: Tuple[str, ...] = tuple(DPO_LOSSES)
"""The dpo.loss_type values."""


def preference_loss(loss_type: str, x: PreferenceLogps, hp) -> Rewards:
    """The ``loss_type`` row of :data:`DPO_LOSSES` on ``x``."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown dpo.loss_type {loss_type!r} (known: {', '.join(DPO_LOSS_TYPES)})")
    return DPO_LOSSES[loss_type].loss(x, hp)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, Eq. 8) on unpaired examples:

        r = log pi(y|x) - log pi_ref(y|x);  z0 = max(0, KL estimate), detached
        desirable:   w_d * (1 - sigma(beta (r - z0)))
        undesirable: w_u * (1 - sigma(beta (z0 - r)))

    ``desirable`` [B] bool; ``kl`` a scalar estimate of KL(pi || pi_ref) (e.g. from mismatched
    prompt/completion pairs, as the paper: :func:`kto_reference_point`)."""
    r = policy_logps - ref_logps
    z0 = torch.clamp(kl, min=0).detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable.bool(), good, bad)


class KTOLogps(NamedTuple):
    """What a row of the KTO table reads, each ``[B]``."""

    policy: torch.Tensor
    """log pi(y | x): summed token log-probs of the completion."""
    reference: torch.Tensor
    """log pi_ref(y | x), the same way."""
    desirable: torch.Tensor
    """bool: the completion is labelled desirable."""
    z0: torch.Tensor
    """Scalar reference point of the global batch (:func:`kto_reference_point`)."""


@dataclass(frozen=True)
class KTOVariant:
    """One row of the KTO table."""

    loss: Callable[[KTOLogps, Any], torch.Tensor]
    """(inputs, hyperparameters) -> per-example losses [B]. The hyperparameters are the kto config
    block (beta, desirable_weight, undesirable_weight): each row reads the fields it needs."""
    needs_reference: bool = True
    length_normalized: bool = False
    """Always summed log-probs (the fields match :class:`DPOVariant`'s, so a block's row answers
    both questions whichever family it is from)."""


def _kto(x: KTOLogps, hp) -> torch.Tensor:
    return kto_loss(x.policy, x.reference, x.desirable, x.z0, hp.beta, hp.desirable_weight, hp.undesirable_weight)


KTO_LOSSES: Dict[str, KTOVariant] = {
    "kto": KTOVariant(_kto),
    # "apo_zero_unpaired": KTOVariant(_apo_zero_unpaired)   TRL's: desirable 1 - sigma(beta r),
    #                                                       undesirable sigma(beta r), no z0
}
"""The kto.loss_type values."""

PREFERENCE_LOSSES: Dict[str, Any] = {**DPO_LOSSES, **KTO_LOSSES}
"""Every loss type of both tables: a dpo.loss_type or kto.loss_type names one row (the names are
disjoint), whose needs_reference / length_normalized the module reads."""


def kto_variant_loss(loss_type: str, x: KTOLogps, hp) -> torch.Tensor:
    """The ``loss_type`` row of :data:`KTO_LOSSES` on ``x``."""
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"unknown kto.loss_type {loss_type!r} (known: {', '.join(KTO_LOSSES)})")
    return KTO_LOSSES[loss_type].loss(x, hp)


def kto_kl_sums(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of the log-ratios log pi(y'|x) - log pi_ref(y'|x) over mismatched pairs (x, y')
    ``[B]``, detached. Added up over all micro-batches and data-parallel ranks of a step, they give
    the reference point of the whole global batch (TRL gathers the batch's KL terms across
    processes too), which then does not depend on how the batch is split."""
    log_ratio = (policy_kl_logps - ref_kl_logps).detach()
    return log_ratio.sum(), torch.tensor(float(log_ratio.numel()), dtype=log_ratio.dtype, device=log_ratio.device)


def kto_reference_point(mean_log_ratio: torch.Tensor) -> torch.Tensor:
    """KTO's reference point (Ethayarajh et al. 2024, Sec. 4.1):

        z0 = max(0, mean over mismatched pairs of log pi(y'|x) - log pi_ref(y'|x)), detached

    (no gradient flows through the reference point). ``mean_log_ratio`` = sum / count of
    :func:`kto_kl_sums` over the global batch."""
    return torch.as_tensor(mean_log_ratio).clamp(min=0).detach()


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """:func:`kto_reference_point` of one batch of mismatched pairs."""
    total, count = kto_kl_sums(policy_kl_logps, ref_kl_logps)
    return kto_reference_point(total / count.clamp(min=1))


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, Eq. 1):
    -log sigma(r_w - r_l - margin). Returns ``(losses, correct)`` with correct = r_w > r_l."""
    diff = chosen_rewards - rejected_rewards
    return -F.logsigmoid(diff - margin), (diff > 0).float().detach()
