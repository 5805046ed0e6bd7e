"""Group-relative advantages of sampled completions, as TRL's `GRPOTrainer` computes them.

N = G·M completions are grouped prompt-major: rows g·G .. g·G+G-1 are the G = `num_generations`
samples of prompt g. rewards_per_func [N, K] holds reward function k's score of completion i, NaN
where the function returned None; w [K] are the reward weights. A completion every function
scored None is *unscorable*: its reward is NaN, so it is left out of every mean and std below, and
its advantage is 0.

sum_then_normalize (GRPO, Shao et al. 2024):

    R_i = Σ_k w_k r_ik  (NaN terms skipped)         A_i = (R_i - mean_group(R)) / (std(R) + 1e-4)

with std over the group (`scale_rewards="group"`), over the whole batch ("batch"; the baseline is
still the group mean), or no division ("none": Dr. GRPO, Liu et al. 2025).

normalize_then_sum (GDPO, arXiv:2601.05242): each function is normalised within its group first,
z_ik = (r_ik - mean_group(r_k)) / (std_group(r_k) + 1e-4), then S_i = Σ_k w_k z_ik (NaN terms
skipped) and A = (S - mean(S)) / (std(S) + 1e-4) over the batch; `scale_rewards` is not read
there, as in TRL.

Means and stds skip NaN; std is Bessel-corrected (TRL's `nanstd`), so a group with one scored
completion has a NaN std: its advantages are 0 like an unscorable row's, and under
normalize_then_sum that function adds nothing to the group's S.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPSILON = 1e-4  # TRL's guard against a zero std


class Advantages(NamedTuple):
    """advantages [N] (0 for unscorable rows); rewards [N] the weighted reward Σ_k w_k r_ik (NaN for
    unscorable rows); std_is_zero [N] bool, where the std the advantage is scaled by is zero (TRL's
    `frac_reward_zero_std` is its mean)."""

    advantages: torch.Tensor
    rewards: torch.Tensor
    std_is_zero: torch.Tensor


def nanstd(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """The Bessel-corrected std over the non-NaN entries (NaN with fewer than two of them).

    TRL's `nanstd` takes the factor n / (n - 1) of integer counts, which torch divides in float32;
    here it is in x's dtype, so float64 rewards differ from TRL's by that rounding (~1e-8 relative)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=keepdim)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keepdim).to(x.dtype)
    return torch.sqrt(variance * count / (count - 1))


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k r_ik skipping NaN terms [N]; NaN where every r_ik is NaN."""
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def _normalize_scale(scale_rewards) -> str:
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)} (or True/False)")
    return scale_rewards


def _weights(weights, rewards_per_func: torch.Tensor) -> torch.Tensor:
    weights = torch.as_tensor(weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device).reshape(-1)
    if weights.shape[0] != rewards_per_func.shape[1]:
        raise ValueError(f"{weights.shape[0]} reward weights for {rewards_per_func.shape[1]} reward functions "
                         f"(rewards_per_func is {tuple(rewards_per_func.shape)}); give one weight per function")
    return weights


def _check_rewards(rewards_per_func: torch.Tensor, num_generations: int) -> None:
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be [N, K] (completions x reward functions), "
                         f"got shape {tuple(rewards_per_func.shape)}")
    if num_generations < 1 or rewards_per_func.shape[0] % num_generations:
        raise ValueError(f"rewards_per_func has {rewards_per_func.shape[0]} rows, not a multiple of "
                         f"num_generations = {num_generations}")


def _std_or_zero(x: torch.Tensor, enough: bool, dim=None, keepdim: bool = False) -> torch.Tensor:
    """nanstd, or zeros where there is only one value per std (TRL's num_generations = 1 case)."""
    if enough:
        return nanstd(x, dim=dim, keepdim=keepdim)
    return torch.zeros_like(x if dim is None else torch.nanmean(x, dim=dim, keepdim=keepdim))


def group_advantages(rewards_per_func: torch.Tensor, weights: Sequence[float] | torch.Tensor, num_generations: int,
                     *, aggregation: str = "sum_then_normalize", scale_rewards: str | bool = "group") -> Advantages:
    """The advantages of the module docstring for rewards_per_func [N, K] (NaN = None)."""
    _check_rewards(rewards_per_func, num_generations)
    scale = _normalize_scale(scale_rewards)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
    w = _weights(weights, rewards_per_func)
    G = num_generations
    rewards = weighted_rewards(rewards_per_func, w)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)

    if aggregation == "sum_then_normalize":
        group_mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
        if scale == "batch":
            std = _std_or_zero(rewards, rewards.numel() > 1).expand_as(rewards)
        else:  # "none" keeps the group std for std_is_zero only
            std = _std_or_zero(rewards.view(-1, G), G > 1, dim=1).repeat_interleave(G)
        advantages = rewards - group_mean
        if scale != "none":
            advantages = advantages / (std + STD_EPSILON)
    else:
        grouped = rewards_per_func.view(-1, G, rewards_per_func.shape[1])
        z = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (_std_or_zero(grouped, G > 1, dim=1, keepdim=True)
                                                                + STD_EPSILON)
        # nansum: a function left unnormalisable in a group (one score there, NaN std) adds 0, as in TRL
        summed = (z.view_as(rewards_per_func) * w.unsqueeze(0)).nansum(dim=1).masked_fill(unscorable, float("nan"))
        std = _std_or_zero(summed, summed.numel() > 1).expand_as(summed)
        advantages = (summed - torch.nanmean(summed)) / (std + STD_EPSILON)

    std_is_zero = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(advantages, nan=0.0), rewards, std_is_zero)


def reward_metrics(rewards_per_func: torch.Tensor, weights: Sequence[float] | torch.Tensor, names: Sequence[str],
                   advantages_result: Advantages) -> dict[str, float]:
    """TRL's reward metrics of one generation batch: `reward`, `reward_std` (of the weighted reward,
    unscorable rows left out), `rewards/<name>/mean`, `rewards/<name>/std` (per function, over the
    rows it scored; NaN when it scored none or one), `frac_reward_zero_std`."""
    _weights(weights, rewards_per_func)  # the same shape check as group_advantages
    if len(names) != rewards_per_func.shape[1]:
        raise ValueError(f"{len(names)} reward names for {rewards_per_func.shape[1]} reward functions")
    metrics = {}
    for k, name in enumerate(names):
        column = rewards_per_func[:, k]
        metrics[f"rewards/{name}/mean"] = torch.nanmean(column).item()
        metrics[f"rewards/{name}/std"] = nanstd(column).item()
    metrics["reward"] = torch.nanmean(advantages_result.rewards).item()
    metrics["reward_std"] = nanstd(advantages_result.rewards).item()
    metrics["frac_reward_zero_std"] = advantages_result.std_is_zero.float().mean().item()
    return metrics


def all_zero_advantages(advantages: torch.Tensor) -> bool:
    """True when every advantage is exactly 0: the batch moves no clip-type objective (with beta = 0),
    so a step on it can be skipped (`skip_zero_advantage_batches`)."""
    return bool((advantages == 0).all())
