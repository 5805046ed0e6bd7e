"""Token log-probs through the lm_head: the plain-torch reference of `kernels.linear_ce`.

For final hidden states h [N, D], the head weight W [V, D] and targets y [N]:

    z = h W^T                                    logits [N, V]
    log p(y_i) = z_i[y_i] - logsumexp_v z_i[v]
    logit_mean_i = (1/V) sum_v z_i[v] = h_i . mean_v W[v]

This version materialises z; `kernels.linear_ce` computes the same values and gradients a chunk of
tokens at a time. Both return a `TokenLogprobs`, so the losses never know which one ran.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from pure.losses.common import IGNORE_INDEX, token_logprobs


class TokenLogprobs(NamedTuple):
    """Per-token results of the lm_head + log-softmax, all [N].

    logprobs: float32, differentiable; 0 where the target is IGNORE_INDEX. logit_mean: float32,
    detached (TRL's `logits/chosen` metric). target_is_argmax: bool, detached (token accuracy);
    False where the target is IGNORE_INDEX.
    """

    logprobs: torch.Tensor
    logit_mean: torch.Tensor
    target_is_argmax: torch.Tensor


# (hidden [N, D], weight [V, D], targets [N]) -> TokenLogprobs
TokenLogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], TokenLogprobs]


def check_token_logprob_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Shapes and dtypes every implementation expects; a ValueError naming the argument otherwise."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token log-probs need hidden [N, D] and weight [V, D], got hidden {tuple(hidden.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"token log-probs need targets [N] = [{hidden.shape[0]}] of dtype long, got "
                         f"{tuple(targets.shape)} of {targets.dtype}")


def reference_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> TokenLogprobs:
    """log p(targets) with the full [N, V] logits materialised (see the module docstring)."""
    check_token_logprob_inputs(hidden, weight, targets)
    logits = hidden @ weight.T
    detached = logits.detach()
    return TokenLogprobs(
        token_logprobs(logits, targets),
        detached.float().mean(-1),
        (detached.argmax(-1) == targets) & (targets != IGNORE_INDEX),
    )
