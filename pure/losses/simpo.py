"""SimPO and CPO: reference-free sigmoid preference losses, as TRL's `CPOTrainer.cpo_loss`.

CPO (Xu et al. 2024, "Contrastive Preference Optimization", arXiv:2401.08417, Eq. 3 + the NLL
regulariser), on summed completion log-probs s(y) = sum_t log p(y_t | x, y_<t):

    L_CPO = -log sigma(beta (s_w - s_l)) + alpha * NLL(y_w)

SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
arXiv:2405.14734, Eq. 6), on length-averaged log-probs l(y) = s(y) / |y| and a target margin gamma:

    L_SimPO = -log sigma(beta l_w - beta l_l - gamma) + alpha * NLL(y_w)

(TRL writes the margin as beta (l_w - l_l - gamma / beta), the same number.) With label smoothing
eps (TRL's conservative variant), -log sigma(z) becomes -(1 - eps) log sigma(z) - eps log sigma(-z).
NLL(y_w) is the mean cross-entropy over the chosen completion tokens and alpha is `cpo_alpha`
(TRL CPOConfig default 1.0; axolotl `rl: simpo` documents rl_beta 0.1, simpo_gamma 0.5, cpo_alpha
1.0). Rewards are beta * (the log-probs the loss uses), as in TRL.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pure.losses.core import Loss
from pure.losses.pairs import pair_loss


def cpo_terms(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float = 0.0,
              label_smoothing: float = 0.0):
    """Per-pair sigmoid term: z = beta (chosen - rejected) - gamma,
    loss = -(1 - eps) log sigma(z) - eps log sigma(-z).

    Returns (loss [B], chosen rewards beta * chosen, rejected rewards beta * rejected, {}).
    """
    z = beta * (chosen_logps - rejected_logps) - gamma
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach(), {}


def _check(beta: float, cpo_alpha: float, label_smoothing: float) -> None:
    if beta < 0:
        raise ValueError(f"rl_beta must be >= 0, got {beta}")
    if cpo_alpha < 0:
        raise ValueError(f"cpo_alpha must be >= 0, got {cpo_alpha}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")


def make_simpo(beta: float = 0.1, simpo_gamma: float = 0.5, cpo_alpha: float = 1.0,
               label_smoothing: float = 0.0) -> Loss:
    """The SimPO `Loss` over pair micro-batches (length-averaged log-probs, margin `simpo_gamma`)."""
    beta, simpo_gamma, cpo_alpha, label_smoothing = map(float, (beta, simpo_gamma, cpo_alpha, label_smoothing))
    _check(beta, cpo_alpha, label_smoothing)

    def formula(chosen, rejected):
        return cpo_terms(chosen, rejected, beta, simpo_gamma, label_smoothing)

    return pair_loss(formula, "simpo", average=True, nll_weight=cpo_alpha)


def make_cpo(beta: float = 0.1, cpo_alpha: float = 1.0, label_smoothing: float = 0.0) -> Loss:
    """The CPO `Loss` over pair micro-batches (summed log-probs, TRL loss_type "sigmoid")."""
    beta, cpo_alpha, label_smoothing = map(float, (beta, cpo_alpha, label_smoothing))
    _check(beta, cpo_alpha, label_smoothing)

    def formula(chosen, rejected):
        return cpo_terms(chosen, rejected, beta, 0.0, label_smoothing)

    return pair_loss(formula, "cpo", average=False, nll_weight=cpo_alpha)


simpo = make_simpo()
cpo = make_cpo()
