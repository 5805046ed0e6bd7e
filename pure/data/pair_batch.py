"""Micro-batches of preference pairs for the DPO family.

A micro-batch of B pairs is one tensor of 2B rows: rows 0..B-1 are prompt + chosen, rows B..2B-1
prompt + rejected (pair i is rows i and B + i), so the policy and the reference each run one
forward per micro-batch, as TRL's `concatenated_forward` does. Rows are right-padded with `pad_id`
to the longest of the 2B rows; labels are -100 on the prompt and the padding and the token id on
the completion (which already ends with EOS, see `pure/data/preference.py`). Right padding needs
no attention mask: a causal model's logits at real positions never see the pad tokens after them.
Sample packing is refused for preference methods by the program, not here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pure import rng
from pure.data.settings import IGNORE_INDEX, DataError, Example

PAIR_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _token_list(example: Example, index: int, field: str) -> list[int]:
    if field not in example:
        raise DataError(f"preference example {index}: missing field {field!r}; expected {list(PAIR_FIELDS)}")
    ids = example[field]
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise DataError(f"preference example {index}: field {field!r} must be a list of token ids (ints), "
                        f"got {type(ids).__name__}")
    if field != "prompt_ids" and not ids:
        raise DataError(f"preference example {index}: field {field!r} is empty; "
                        "a completion needs at least its EOS token")
    return list(ids)


def collate_pairs(examples: Sequence[Example], order: Sequence[int], micro_batch_size: int,
                  pad_id: int) -> list[dict]:
    """Cut `order` (indices into `examples`) into micro-batches of `micro_batch_size` pairs; the
    trailing partial micro-batch is kept.

    Each micro-batch: `input_ids` Long [2B, T] (T = longest of its 2B rows), `labels` Long [2B, T],
    `last_index` Long [2B] (position of each row's last real token: reward models read it),
    `num_pairs` (int B) and `num_tokens` (int, real tokens of the 2B rows); and `ref_logps` [2B]
    when every example carries precomputed `ref_chosen_logps` / `ref_rejected_logps`.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    batches = []
    for start in range(0, len(order), micro_batch_size):
        group = [int(i) for i in order[start:start + micro_batch_size]]
        rows, labels = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for i in group:
                if not 0 <= i < len(examples):
                    raise DataError(f"pair order names example {i}, but there are {len(examples)} examples")
                prompt = _token_list(examples[i], i, "prompt_ids")
                completion = _token_list(examples[i], i, side)
                rows.append(prompt + completion)
                labels.append([IGNORE_INDEX] * len(prompt) + completion)
        lengths = [len(r) for r in rows]
        width = max(lengths)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        label_tensor = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, lab) in enumerate(zip(rows, labels)):
            input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            label_tensor[r, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "labels": label_tensor,
            "last_index": torch.tensor(lengths, dtype=torch.long) - 1,
            "num_pairs": len(group),
            "num_tokens": sum(lengths),
        }
        if all("ref_chosen_logps" in examples[i] for i in group):  # precompute_ref_log_probs
            batch["ref_logps"] = torch.tensor([examples[i]["ref_chosen_logps"] for i in group]
                                              + [examples[i]["ref_rejected_logps"] for i in group])
        batches.append(batch)
    return batches


def pair_micro_batches(examples: Sequence[Example], micro_batch_size: int, pad_id: int, seed: int, epoch: int,
                       shuffle: bool = True) -> list[dict]:
    """One epoch of pair micro-batches, in the order `permutation(fold_in(key(seed), epoch), n)` (or
    the dataset order when not `shuffle`): a pure function of (examples, seed, epoch)."""
    n = len(examples)
    order = rng.permutation(rng.fold_in(rng.key(seed), epoch), n).tolist() if shuffle else list(range(n))
    return collate_pairs(examples, order, micro_batch_size, pad_id)
