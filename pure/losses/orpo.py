"""ORPO: monolithic preference optimisation without a reference model (Hong et al. 2024,
"ORPO: Monolithic Preference Optimization without Reference Model", arXiv:2403.07691).

With the length-averaged log-prob l(y) = (1/|y|) sum_t log p(y_t | x, y_<t) and the odds
odds(y) = p / (1 - p), p = e^l (Eq. 4),

    log OR  = log odds(y_w) - log odds(y_l) = (l_w - l_l) - (log(1 - e^l_w) - log(1 - e^l_l))
    L_ORPO  = NLL(y_w) - lambda * log sigma(log OR)                                   (Eq. 6-7)

NLL(y_w) is the mean cross-entropy over the chosen completion tokens and lambda is axolotl's
`orpo_alpha` (TRL's ORPOConfig `beta`, 0.1). This is TRL's `ORPOTrainer.odds_ratio_loss` and its
metrics: `rewards/*` = lambda * l, `log_odds_ratio` = mean log sigma(log OR), `log_odds_chosen` =
mean log OR, `nll_loss`, plus the pair metrics of `pure.losses.pairs`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pure.losses.core import Loss
from pure.losses.pairs import pair_loss


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) near 0, log1p(-e^x) below -log 2. Both branches are finite
    for x < 0, so the unused one does not poison the gradient."""
    near_zero = x > -math.log(2.0)
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) with p = e^l, from the length-averaged log-prob l < 0."""
    return avg_logps - log1m_exp(avg_logps)


def orpo_terms(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, alpha: float):
    """Per-pair odds-ratio term of ORPO (the NLL is added by the loss).

    Returns (loss [B] = -alpha * log sigma(log OR), chosen rewards alpha * l_w, rejected rewards
    alpha * l_l, {"log_odds_ratio": log sigma(log OR), "log_odds_chosen": log OR}).
    """
    log_or = log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)
    ratio = F.logsigmoid(log_or)
    return (-alpha * ratio, alpha * chosen_avg_logps.detach(), alpha * rejected_avg_logps.detach(),
            {"log_odds_ratio": ratio, "log_odds_chosen": log_or})


def make_orpo(orpo_alpha: float = 0.1) -> Loss:
    """The ORPO `Loss` over pair micro-batches: NLL(chosen) + orpo_alpha * odds-ratio term."""
    orpo_alpha = float(orpo_alpha)
    if orpo_alpha < 0:
        raise ValueError(f"orpo_alpha must be >= 0, got {orpo_alpha}")

    def formula(chosen, rejected):
        return orpo_terms(chosen, rejected, orpo_alpha)

    return pair_loss(formula, "orpo", average=True, nll_weight=1.0)


orpo = make_orpo()
