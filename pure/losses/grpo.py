"""GRPO and its relatives: clipped policy-gradient objectives on per-token log-probs of sampled
completions, as TRL's `GRPOTrainer._compute_loss` computes them.

For completion token t of row i, with current log-prob ℓ, sampling-time log-prob ℓ_old (ℓ.detach()
when the batch brings none: one update per generation, μ = 1), reference log-prob ℓ_ref and the
row's advantage A_i, the importance weight is

    token level:     log w_it = ℓ_it - ℓ_old_it
    sequence level:  log w_i  = Σ_t m_it (ℓ_it - ℓ_old_it) / max(1, Σ_t m_it)    (GSPO, arXiv:2507.18071)

and with r = exp(log w), ε_lo = `epsilon`, ε_hi = `epsilon_high` (None = ε_lo, TRL's default):

| loss_type | per-token loss | source |
|---|---|---|
| grpo, bnpo, dr_grpo, dapo | -min(r' A, clip(r, 1-ε_lo, 1+ε_hi) A); r' = min(r, δ) with `delta`, else r | arXiv:2402.03300 |
| cispo | -sg(min(r, ε_hi)) A ℓ (ε_hi is the raw cap, 5.0 in ScaleRL) | arXiv:2506.13585, 2510.13786 |
| sapo | -(4/τ) σ(τ (r - 1)) A, τ = τ_pos if A > 0 else τ_neg | arXiv:2511.20347 |

plus β KL_it with the k3 estimator KL = exp(ℓ_ref - ℓ) - (ℓ_ref - ℓ) - 1 when `beta` > 0 (sg is
stop-gradient; the clip is PPO's as in GRPO/DeepSeekMath, δ INTELLECT-2's two-sided clip,
arXiv:2505.07291, cispo MiniMax-M1's with ScaleRL's cap). The four clip types differ only in the normaliser (`reduce_grpo_loss`): grpo and sapo average each row over
its tokens, then the rows; bnpo averages over the micro-batch's tokens; dr_grpo divides by
rows x max_completion_length (Dr. GRPO, arXiv:2503.20783); dapo and cispo divide by the active tokens
of the whole generation batch (DAPO, arXiv:2503.14476). As in TRL, grpo, sapo, bnpo and dr_grpo are
means of each micro-batch divided by the number of micro-batches, so with unequal micro-batches they
depend on how the batch is cut; dapo and cispo are sums over tokens of one global total, so their
micro-batch losses add up to the whole-batch loss whatever the cut.

Like TRL with its default `epsilon_high=None`, cispo then caps the ratio at ε_lo (0.2): set
`epsilon_high` (e.g. 5.0) for the ScaleRL objective.

The micro-batch (see `make_grpo`) carries prompts left-padded to P and completions right-padded to
C; completion token j is predicted by the final hidden state at position P-1+j, and lm_head runs
only on the completion tokens that count. `temperature` divides the logits as TRL does with its
sampling temperature (the hidden states are divided instead, which is the same for a linear head);
`old_logps` and `ref_logps` a batch brings must be taken at the same temperature.

Rollouts sampled by another engine or an older policy (vLLM, async prefetch) are corrected as TRL
does. The truncated importance-sampling (IS) correction multiplies each token's loss by a detached
weight w = π_old / π_sampling (`importance_sampling_ratio`: per token, or per sequence as
exp Σ_t m_t Δ_t; `*_truncate` clamps w to the cap, `*_mask` zeroes it above the cap); π_old is the
policy the step starts from, π_sampling the sampler's log-probs. The off-policy sequence mask
(OPSM, DeepSeek-V3.2) drops a row with a negative advantage whose mean KL(π_sampling || πθ) over
its tokens exceeds `off_policy_mask_threshold`; `use_bias_correction_kl` weights the KL term by r.
In TRL's order: loss x OPSM x w, then + β KL (x r with the bias correction).
"""
from __future__ import annotations

from typing import Sequence

import torch

from pure.losses.common import batch_total
from pure.losses.core import Loss

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
ENTROPY_CHUNK_ROWS = 1024  # rows of [rows, vocab] logits the entropy metric holds at once


def _check_options(loss_type: str, importance_sampling_level: str, beta: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not a GRPO loss type; expected one of {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level {importance_sampling_level!r} is not one of "
                         f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    if beta < 0:
        raise ValueError(f"beta (the KL coefficient) must be >= 0, got {beta}")


def importance_log_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                           level: str) -> torch.Tensor:
    """log w: per token [B, C], or per sequence [B, 1] (the masked mean of the token log-ratios)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(πθ || π_ref) per token: exp(ℓ_ref - ℓ) - (ℓ_ref - ℓ) - 1 >= 0."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def importance_sampling_ratio(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor,
                              mode: str, cap_max: float | None = 3.0, cap_min: float | None = None) -> torch.Tensor:
    """The IS weight π_old / π_sampling of rollouts from another sampler (no gradient): [B, C] for
    the token modes, [B, 1] (exp of the masked sum of the log-ratios) for the sequence modes.
    `*_truncate` clamps it into [cap_min, cap_max]; `*_mask` sets it to 0 outside (None: no bound)."""
    if mode not in IS_MODES:
        raise ValueError(f"importance sampling mode {mode!r} is not one of {', '.join(IS_MODES)}")
    mask = mask.to(old_logps.dtype)
    diff = (old_logps.detach() - sampling_logps.to(old_logps.dtype)) * mask
    ratio = torch.exp(diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=cap_min, max=cap_max)
    outside = torch.zeros_like(ratio, dtype=torch.bool)
    if cap_min is not None:
        outside |= ratio < cap_min
    if cap_max is not None:
        outside |= ratio > cap_max
    return ratio.masked_fill(outside, 0.0)


def off_policy_mask(advantages: torch.Tensor, logps: torch.Tensor, sampling_logps: torch.Tensor,
                    mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """OPSM's keep mask [B, 1] (1 keep, 0 drop): a row stays when its advantage is >= 0 or the mean
    over its tokens of ℓ_sampling - sg(ℓ) is at most `threshold`."""
    mask = mask.to(logps.dtype)
    kl = ((sampling_logps.to(logps.dtype) - logps.detach()) * mask).sum(-1, keepdim=True) / \
        mask.sum(-1, keepdim=True).clamp(min=1.0)
    adv = advantages.reshape(-1, 1) if advantages.dim() == 1 else advantages
    return ((adv >= 0) | (kl <= threshold)).to(mask.dtype)


def sampling_metrics(micro_batches: Sequence[dict], mode: str) -> dict[str, float]:
    """TRL's `sampling/*` metrics of a generation's micro-batches (each with old_logps,
    sampling_logps, completion_mask and is_ratio): |ℓ_old - ℓ_sampling| mean and max over the
    completion tokens, and the IS weight's min / mean / max over tokens (token modes) or rows."""
    deltas, ratios = [], []
    for mb in micro_batches:
        active = mb["completion_mask"] > 0
        deltas.append((mb["old_logps"] - mb["sampling_logps"].to(mb["old_logps"].dtype)).abs()[active])
        ratio = mb["is_ratio"]
        ratios.append(ratio.flatten() if mode.startswith("sequence") else ratio[active])
    delta, ratio = torch.cat(deltas).double(), torch.cat(ratios).double()

    def stat(x, fn):
        return float(fn(x)) if x.numel() else 0.0

    return {"sampling/sampling_logp_difference/mean": stat(delta, torch.mean),
            "sampling/sampling_logp_difference/max": stat(delta, torch.max),
            "sampling/importance_sampling_ratio/min": stat(ratio, torch.min),
            "sampling/importance_sampling_ratio/mean": stat(ratio, torch.mean),
            "sampling/importance_sampling_ratio/max": stat(ratio, torch.max)}


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
                      advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str, epsilon: float = 0.2,
                      epsilon_high: float | None = None, delta: float | None = None, beta: float = 0.0,
                      importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
                      sapo_temperature_neg: float = 1.05, is_ratio: torch.Tensor | None = None,
                      sampling_logps: torch.Tensor | None = None, off_policy_mask_threshold: float | None = None,
                      use_bias_correction_kl: bool = False) -> tuple[torch.Tensor, dict]:
    """The per-token loss [B, C] of the module docstring's table (before the completion mask and the
    reduction), for log-probs [B, C] (`logps` differentiable), advantages [B] and the completion
    mask [B, C]; times the OPSM keep mask (with `off_policy_mask_threshold`: from `sampling_logps`,
    else from the old log-probs) and the IS weight `is_ratio` ([B, C] or [B, 1]) when given, then
    plus β KL (times r with `use_bias_correction_kl`).

    `parts` holds, for metrics, TRL's `coef_1` (r, after the δ cap), `per_token_kl` (None without
    KL), and the masks `is_low_clipped` (r < 1-ε_lo and A < 0), `is_high_clipped` (r > 1+ε_hi and
    A > 0), `is_region_clipped` (either) for the clip types, `is_cispo_clipped` (r > ε_hi and A > 0)
    for cispo; the masks are [B, C] at token level, [B, 1] at sequence level, None where they do not
    apply; `off_policy_mask` [B, 1] (None without the threshold).
    """
    _check_options(loss_type, importance_sampling_level, beta)
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.to(logps.dtype).unsqueeze(-1)  # [B, 1]
    coef_1 = torch.exp(importance_log_weights(logps, old_logps, mask, importance_sampling_level))
    parts = {"per_token_kl": None, "is_low_clipped": None, "is_high_clipped": None, "is_region_clipped": None,
             "is_cispo_clipped": None, "off_policy_mask": None}
    kl = None
    if beta > 0:
        if ref_logps is None:
            raise ValueError(f"grpo_token_losses: beta = {beta} > 0 needs ref_logps [B, C], got None")
        kl = k3_kl(logps, ref_logps.to(logps.dtype))
        if use_bias_correction_kl:
            kl = kl * coef_1

    if loss_type == "cispo":
        loss = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * logps
        parts["is_cispo_clipped"] = (coef_1 > epsilon_high) & (adv > 0)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg).to(logps.dtype)
        loss = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        loss = -torch.min(coef_1 * adv, coef_2 * adv)
        low = (coef_1 < 1 - epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + epsilon_high) & (adv > 0)
        parts.update(is_low_clipped=low, is_high_clipped=high, is_region_clipped=low | high)
    parts["coef_1"] = coef_1

    if off_policy_mask_threshold is not None:
        keep = off_policy_mask(advantages, logps, old_logps if sampling_logps is None else sampling_logps, mask,
                               off_policy_mask_threshold)
        loss = loss * keep
        parts["off_policy_mask"] = keep
    if is_ratio is not None:
        loss = loss * is_ratio.to(logps.dtype).detach()
    if kl is not None:
        loss = loss + beta * kl
        parts["per_token_kl"] = kl
    return loss.expand_as(mask), parts


def reduce_grpo_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, *,
                     accumulation_steps: int | torch.Tensor = 1, generation_tokens: torch.Tensor | float | None = None,
                     max_completion_length: int | None = None) -> torch.Tensor:
    """A micro-batch's scalar loss from its per-token losses [B, C], with TRL's normaliser per type:

        grpo, sapo:   mean_i [Σ_t m_it l_it / max(1, Σ_t m_it)] / accumulation_steps
        bnpo:         Σ m l / max(1, Σ m) / accumulation_steps
        dr_grpo:      Σ m l / (B · max_completion_length) / accumulation_steps
        dapo, cispo:  Σ m l / max(1, generation_tokens)   (active tokens of the whole generation batch)
    """
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation_steps
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("reduce_grpo_loss: loss_type 'dr_grpo' needs max_completion_length, its normaliser")
        return masked.sum() / (per_token_loss.shape[0] * max_completion_length) / accumulation_steps
    if loss_type in ("dapo", "cispo"):
        if generation_tokens is None:
            raise ValueError(f"reduce_grpo_loss: loss_type {loss_type!r} needs generation_tokens, the active "
                             "completion tokens of the whole generation batch")
        tokens = torch.as_tensor(generation_tokens, dtype=masked.dtype, device=masked.device)
        return masked.sum() / tokens.clamp(min=1.0)
    raise ValueError(f"loss_type {loss_type!r} is not a GRPO loss type; expected one of {', '.join(LOSS_TYPES)}")


def count_grpo(micro_batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Totals of the accumulated batch: active completion tokens (at least 1), micro-batches, and rows
    (at least 1, as `count_targets` counts them, so `grpo + nll` agrees on it)."""
    tokens = sum(int(mb["completion_mask"].sum()) for mb in micro_batches if "completion_mask" in mb)
    rows = sum(int(mb["input_ids"].shape[0]) for mb in micro_batches if "input_ids" in mb)
    return {"total_completion_tokens": torch.tensor(max(tokens, 1)),
            "total_micro_batches": torch.tensor(len(micro_batches)),
            "total_rows": torch.tensor(max(rows, 1))}


def _completion_hidden(policy, batch: dict, key, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states that predict the active completion tokens [N, D], divided by the
    temperature, and the bool mask [B, C] they come from."""
    input_ids, completion_ids = batch["input_ids"], batch["completion_ids"]
    prompt_length = input_ids.shape[1] - completion_ids.shape[1]
    if prompt_length < 1:
        raise ValueError(f"grpo: input_ids {tuple(input_ids.shape)} must be a prompt of at least one token followed "
                         f"by the completion_ids {tuple(completion_ids.shape)}")
    kwargs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), compute_logits=False)
    out = policy(input_ids, **kwargs) if key is None else policy(input_ids, key=key, **kwargs)
    hidden = out.hidden[:, prompt_length - 1:-1]  # position P-1+j predicts completion token j
    active = batch["completion_mask"] > 0
    selected = hidden[active]
    return (selected / temperature if temperature != 1.0 else selected), active


def _scatter_tokens(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """values [N] at the True positions of `active` [B, C], zeros elsewhere (differentiable)."""
    rows, cols = active.nonzero(as_tuple=True)
    return torch.zeros(active.shape, dtype=values.dtype, device=values.device).index_put((rows, cols), values)


def completion_token_logps(policy, batch: dict, key=None, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs [B, C] of the completion tokens under `policy` (0 where the mask is off)."""
    hidden, active = _completion_hidden(policy, batch, key, temperature)
    return _scatter_tokens(policy.token_logprobs(hidden, batch["completion_ids"][active]).logprobs, active)


def head_weight(params: dict) -> torch.Tensor:
    """The lm_head weight [V, D]: `lm_head.weight`, else the tied embedding."""
    weight = params.get("lm_head.weight")
    return params["model.embed_tokens.weight"] if weight is None else weight


def entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, chunk_rows: int = ENTROPY_CHUNK_ROWS) -> torch.Tensor:
    """Σ over rows of the entropy of softmax(h W^T) for hidden [N, D], without gradient, at most
    `chunk_rows` rows of logits at a time."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        hidden, weight = hidden.detach(), weight.detach()
        for start in range(0, hidden.shape[0], chunk_rows):
            logp = torch.log_softmax((hidden[start:start + chunk_rows] @ weight.T).float(), -1)
            total = total + -(logp.exp() * logp).sum()
    return total


def make_grpo(loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None,
              delta: float | None = None, beta: float = 0.0, importance_sampling_level: str = "token",
              max_completion_length: int | None = None, sapo_temperature_pos: float = 1.0,
              sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
              off_policy_mask_threshold: float | None = None, use_bias_correction_kl: bool = False,
              name: str = "grpo") -> Loss:
    """The GRPO `Loss` (module docstring) on one micro-batch of sampled completions:

        input_ids, positions, segment_ids [B, P+C]   prompt left-padded to P, completion right-padded to C
        completion_ids [B, C], completion_mask [B, C] (1.0 on the tokens that count)
        advantages [B]; optional old_logps, ref_logps, sampling_logps [B, C]; optional is_ratio
        [B, C] or [B, 1] (`importance_sampling_ratio`); optional generation_tokens (0-dim)

    ref_logps, when beta > 0 and the batch has none, come from `apply.reference`. dapo and cispo
    divide by `generation_tokens`, else by the accumulated batch's completion tokens (`count_grpo`).

    Metrics, each summing over the micro-batches of a step to the step's value: `entropy` (mean per
    token), `kl` (beta > 0), `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`
    (clip types; mean over tokens, or over rows at sequence level), `cispo_clip_ratio` (cispo),
    `off_policy_mask/dropped_ratio` (the share of rows OPSM drops, with its threshold).
    """
    _check_options(loss_type, importance_sampling_level, beta)
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' divides by max_completion_length; give it (a positive int)")
    if epsilon < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError(f"epsilon and epsilon_high must be >= 0, got {epsilon} and {epsilon_high}")
    if delta is not None and loss_type not in CLIP_TYPES:
        raise ValueError(f"delta (two-sided clipping) applies to the clip loss types {', '.join(CLIP_TYPES)}, "
                         f"not {loss_type!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    options = dict(loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high, delta=delta, beta=beta,
                   importance_sampling_level=importance_sampling_level,
                   sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                   off_policy_mask_threshold=off_policy_mask_threshold, use_bias_correction_kl=use_bias_correction_kl)

    def grpo_loss(apply, batch, key=None):
        total_tokens = batch_total(batch, "total_completion_tokens", name)
        micro_batches = batch_total(batch, "total_micro_batches", name)
        hidden, active = _completion_hidden(apply, batch, key, temperature)
        logps = _scatter_tokens(apply.token_logprobs(hidden, batch["completion_ids"][active]).logprobs, active)
        mask = batch["completion_mask"].to(logps.dtype)
        ref_logps = batch.get("ref_logps")
        if beta > 0 and ref_logps is None:
            ref_logps = completion_token_logps(apply.reference, batch, temperature=temperature)
        old_logps = batch.get("old_logps")
        per_token, parts = grpo_token_losses(logps, None if old_logps is None else old_logps.to(logps.dtype),
                                             ref_logps, batch["advantages"], mask, is_ratio=batch.get("is_ratio"),
                                             sampling_logps=batch.get("sampling_logps"), **options)
        generation_tokens = batch.get("generation_tokens", total_tokens)
        value = reduce_grpo_loss(per_token, mask, loss_type, accumulation_steps=micro_batches,
                                 generation_tokens=generation_tokens, max_completion_length=max_completion_length)

        def token_mean(x):  # summed over the micro-batches: the mean over the accumulated batch's tokens
            return (x.detach().to(mask.dtype) * mask).sum() / total_tokens

        def clip_mean(x):  # [B, 1] at sequence level: a mean over rows, as TRL's global_masked_mean
            if importance_sampling_level == "sequence":
                return x.to(mask.dtype).sum() / batch_total(batch, "total_rows", name)
            return token_mean(x)

        metrics = {"entropy": entropy_sum(hidden, head_weight(apply.params)) / total_tokens}
        if parts["per_token_kl"] is not None:
            metrics["kl"] = token_mean(parts["per_token_kl"])
        if parts["is_region_clipped"] is not None:
            metrics["clip_ratio/low_mean"] = clip_mean(parts["is_low_clipped"])
            metrics["clip_ratio/high_mean"] = clip_mean(parts["is_high_clipped"])
            metrics["clip_ratio/region_mean"] = clip_mean(parts["is_region_clipped"])
        if parts["is_cispo_clipped"] is not None:
            metrics["cispo_clip_ratio"] = clip_mean(parts["is_cispo_clipped"])
        if parts["off_policy_mask"] is not None:
            metrics["off_policy_mask/dropped_ratio"] = (1 - parts["off_policy_mask"]).sum() / \
                batch_total(batch, "total_rows", name)
        return value, metrics

    return Loss(grpo_loss, name, count_fn=count_grpo)
