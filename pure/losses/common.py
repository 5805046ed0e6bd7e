"""Helpers every token-level objective shares: next-token targets and their log-probs, the target
token count, and reading a total of the accumulated batch."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from pure.data.settings import IGNORE_INDEX


def next_token_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """targets[t] = labels[t + 1]: what the logits at t must predict ([B, T], -100 = no target).

    The last position has no target; in packed rows neither has the last token of a document
    (its successor belongs to the next document, which it must not learn to predict).
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if segment_ids is not None:
        crosses = segment_ids[:, 1:] != segment_ids[:, :-1]
        targets[:, :-1] = targets[:, :-1].masked_fill(crosses, IGNORE_INDEX)
    return targets


def count_targets(micro_batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Totals of the whole accumulated batch for token-level losses (SFT): trained target tokens and rows."""
    tokens = sum(
        int((next_token_targets(mb["labels"], mb.get("segment_ids")) != IGNORE_INDEX).sum())
        for mb in micro_batches if "labels" in mb
    )
    rows = sum(int(mb["input_ids"].shape[0]) for mb in micro_batches if "input_ids" in mb)
    return {"total_target_tokens": torch.tensor(max(tokens, 1)), "total_rows": torch.tensor(max(rows, 1))}


def batch_total(batch: dict, key: str, loss: str) -> torch.Tensor:
    """`batch[key]`: a value of the whole accumulated batch (a total the loss divides by, or a batch
    statistic), which the step sets from the loss's `count_fn` / `batch_stats_fn`.

    There is no fallback to the micro-batch's own count: it would silently scale the loss by the
    number of micro-batches."""
    if key not in batch:
        raise ValueError(f"{loss}: the micro-batch has no {key!r}, a value of the whole accumulated batch that "
                         f"make_train_step / make_eval_step set from the loss's count_fn / batch_stats_fn "
                         f"(on a lone batch: loss.on_batch(apply, batch))")
    return batch[key]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for logits [..., V] and integer targets [...], in float32.

    `log_softmax` is taken through `cross_entropy` so no float64 or extra [N, V] copy is made.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return -F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


def sequence_logprobs(token_lp: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-row sum (or mean) of token log-probs over the positions where `mask` is true."""
    total = (token_lp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def completion_logps(apply, batch: dict, key=None, reference: bool = False) -> dict[str, torch.Tensor]:
    """Per-row log-prob of the trained (label != -100) tokens of `batch` under the policy, or under
    the reference policy (`apply.reference`, no gradient) when `reference`.

    Returns `logps` [R] (sum over the row's completion tokens), `tokens` [R] (how many), and
    `logits_mean` [R] (mean logit over the vocabulary and the completion positions, detached: TRL's
    `logits/chosen`). Only completion positions go through lm_head, by `apply.token_logprobs` (the
    fused kernel when one was injected into `make_apply`: no [tokens, vocab] logits).
    """
    targets = next_token_targets(batch["labels"], batch.get("segment_ids"))
    mask = targets != IGNORE_INDEX
    policy = apply.reference if reference else apply
    kwargs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), compute_logits=False)
    out = policy(batch["input_ids"], **kwargs) if reference else policy(batch["input_ids"], key=key, **kwargs)
    head = policy.token_logprobs(out.hidden[mask], targets[mask])
    lp = head.logprobs
    rows = mask.nonzero()[:, 0]
    zeros = torch.zeros(mask.shape[0], dtype=lp.dtype, device=lp.device)
    tokens = mask.sum(-1)
    logit_sums = zeros.index_add(0, rows, head.logit_mean)
    return {
        "logps": zeros.index_add(0, rows, lp),
        "tokens": tokens,
        "logits_mean": logit_sums / tokens.clamp(min=1),
    }
