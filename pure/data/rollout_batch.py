"""Micro-batches of rollouts for GRPO: each row is a prompt and one sampled completion.

Prompts are left-padded to the longest prompt P and completions right-padded after them to the
longest completion C, so completion token j of every row sits at column P + j and is predicted by
the hidden state at P + j - 1 (as TRL lays out `prompt_ids | completion_ids`). Padding is segment 0,
attended by nothing real; positions count real tokens only, so each row computes exactly as it
would alone. `labels` carry the trained completion tokens (-100 elsewhere), so token-level losses
such as `nll` compose with the GRPO loss on the same micro-batch.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pure.data.settings import IGNORE_INDEX


def collate_rollouts(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                     advantages: Sequence[float] | torch.Tensor, pad_id: int,
                     masked: Sequence[bool] | None = None,
                     sampling_logps: Sequence[Sequence[float]] | None = None) -> dict[str, torch.Tensor]:
    """input_ids / positions / segment_ids / labels [B, P+C], completion_ids / completion_mask [B, C]
    (1.0 on every completion token that trains, including the stop token; a row in `masked`, e.g. a
    truncated completion under `mask_truncated_completions`, trains on none), advantages [B] (fp32);
    with `sampling_logps` (the sampler's log-prob of each completion token), sampling_logps [B, C]
    (fp32, 0 on padding)."""
    if not (len(prompt_ids) == len(completion_ids) == len(advantages)):
        raise ValueError(f"collate_rollouts: {len(prompt_ids)} prompts, {len(completion_ids)} completions and "
                         f"{len(advantages)} advantages; expected one of each per row")
    masked = [False] * len(prompt_ids) if masked is None else list(masked)
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in completion_ids))
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    segments = torch.zeros(B, P + C, dtype=torch.long)
    completions = torch.full((B, C), pad_id, dtype=torch.long)
    mask = torch.zeros(B, C)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if not p:
            raise ValueError(f"collate_rollouts: row {i} has an empty prompt; a completion needs a prompt token to follow")
        input_ids[i, P - len(p):P] = torch.tensor(list(p), dtype=torch.long)
        segments[i, P - len(p):P + len(c)] = 1
        if len(c):
            input_ids[i, P:P + len(c)] = torch.tensor(list(c), dtype=torch.long)
            completions[i, :len(c)] = torch.tensor(list(c), dtype=torch.long)
            mask[i, :len(c)] = 0.0 if masked[i] else 1.0
    if sampling_logps is not None:
        bad = [i for i, (c, lp) in enumerate(zip(completion_ids, sampling_logps)) if len(c) != len(lp)]
        if len(sampling_logps) != B or bad:
            raise ValueError(f"collate_rollouts: sampling_logps needs one log-prob per completion token of each row; "
                             f"rows {bad[:5]} differ" if bad else f"collate_rollouts: {len(sampling_logps)} rows of "
                             f"sampling_logps for {B} rows")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, P:] = completions.masked_fill(mask == 0, IGNORE_INDEX)
    batch = {"input_ids": input_ids, "positions": (segments.cumsum(-1) - 1).clamp(min=0), "segment_ids": segments,
             "completion_ids": completions, "completion_mask": mask, "labels": labels,
             "advantages": torch.as_tensor(advantages, dtype=torch.float32).reshape(B)}
    if sampling_logps is not None:
        logps = torch.zeros(B, C)
        for i, lp in enumerate(sampling_logps):
            logps[i, :len(lp)] = torch.tensor(list(lp), dtype=torch.float32)
        batch["sampling_logps"] = logps
    return batch
