"""Micro-batches for reward models: Bradley-Terry pairs and token-labelled (PRM) rows.

Pairs (`rm` examples with `chosen_input_ids` / `rejected_input_ids`, see `pure/data/preference.py`)
go through the model in one forward: rows 0..B-1 are the chosen sequences and rows B..2B-1 the
rejected ones, in the same pair order, right-padded with `pad_id` to the longest of the 2B rows
(as TRL's `DataCollatorForPreference` lays them out). Right padding and the causal mask keep real
tokens from ever attending to padding, so no segment ids are needed. The score is read at
`last_index`, the rightmost non-pad token (`pure.models.heads.last_non_pad_index`, transformers'
rule), so training reads the same position as the exported `*ForSequenceClassification` model.

PRM rows (`stepwise_supervised` examples with `input_ids` / `labels`) are right-padded, labels with
-100; the class of a step sits on its last token, nothing is shifted (token classification).

Epoch orders are `rng.permutation(rng.fold_in(rng.key(seed), epoch), n)` (`epoch_order`), a pure
function of (seed, epoch), so resuming mid-epoch replays the same order.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pure import rng
from pure.data.settings import IGNORE_INDEX, DataError, Example
from pure.models.heads import last_non_pad_index

PAIR_FIELDS = ("chosen_input_ids", "rejected_input_ids")


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of `epoch`: a permutation keyed by (seed, epoch)."""
    return rng.permutation(rng.fold_in(rng.key(seed), epoch), num_examples).tolist()


def _chunks(order: Sequence[int], size: int) -> list[list[int]]:
    if size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {size}")
    order = [int(i) for i in order]
    return [order[b:b + size] for b in range(0, len(order), size)]


def _ids(example: Example, field: str, index: int) -> list[int]:
    if field not in example:
        raise DataError(f"reward example {index}: missing field {field!r}; example keys: {sorted(example)}")
    ids = list(example[field])
    if not ids:
        raise DataError(f"reward example {index}: field {field!r} is empty; a sequence needs at least one token")
    return ids


def _right_padded(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _width(rows: list[list[int]], pad_to: int | None, what: str) -> int:
    longest = max(len(ids) for ids in rows)
    if pad_to is None:
        return longest
    if longest > pad_to:
        raise DataError(f"{what}: a sequence of {longest} tokens does not fit pad_to={pad_to}")
    return pad_to


def collate_reward_pairs(examples: Sequence[Example], order: Sequence[int], micro_batch_size: int,
                         pad_id: int, pad_to: int | None = None) -> list[dict]:
    """Micro-batches of `micro_batch_size` pairs, taken in `order` (the last one may hold fewer).

    Each: `input_ids` Long [2B, T] (chosen rows then rejected rows, right-padded with `pad_id` to the
    longest row, or to `pad_to`), `last_index` Long [2B] (rightmost non-pad token of each row),
    `margin` Float [B] when the examples carry a `margin` (TRL's optional margin column), and the
    python ints `num_pairs` (B) and `num_tokens` (real tokens of the 2B sequences).
    """
    batches = []
    for chunk in _chunks(order, micro_batch_size):
        chosen = [_ids(examples[i], "chosen_input_ids", i) for i in chunk]
        rejected = [_ids(examples[i], "rejected_input_ids", i) for i in chunk]
        rows = chosen + rejected
        input_ids = _right_padded(rows, _width(rows, pad_to, f"reward pairs {chunk}"), pad_id)
        batch = {
            "input_ids": input_ids,
            "last_index": last_non_pad_index(input_ids, pad_id),
            "num_pairs": len(chunk),
            "num_tokens": sum(len(ids) for ids in rows),
        }
        with_margin = ["margin" in examples[i] for i in chunk]
        if any(with_margin):
            if not all(with_margin):
                missing = [i for i, has in zip(chunk, with_margin) if not has]
                raise DataError(f"reward examples {missing} have no 'margin' while others in their batch do; "
                                "give every pair a margin or none")
            batch["margin"] = torch.tensor([float(examples[i]["margin"]) for i in chunk], dtype=torch.float32)
        batches.append(batch)
    return batches


def collate_token_labels(examples: Sequence[Example], order: Sequence[int], micro_batch_size: int,
                         pad_id: int, pad_to: int | None = None, num_labels: int | None = None) -> list[dict]:
    """PRM micro-batches of `micro_batch_size` rows, taken in `order`.

    Each: `input_ids` Long [B, T] right-padded with `pad_id`, `labels` Long [B, T] padded with -100
    (the class of each labelled token, not shifted), and the python ints `num_tokens` (real tokens)
    and `num_labelled` (labels that are not -100). With `num_labels`, every label must lie in
    [0, num_labels).
    """
    batches = []
    for chunk in _chunks(order, micro_batch_size):
        ids, labels = [], []
        for i in chunk:
            row_ids, row_labels = _ids(examples[i], "input_ids", i), _ids(examples[i], "labels", i)
            if len(row_ids) != len(row_labels):
                raise DataError(f"token-labelled example {i}: {len(row_ids)} input_ids but {len(row_labels)} labels; "
                                "expected one label per token")
            if num_labels is not None:
                bad = [v for v in row_labels if v != IGNORE_INDEX and not 0 <= v < num_labels]
                if bad:
                    raise DataError(f"token-labelled example {i}: label {bad[0]} is outside [0, {num_labels}) "
                                    f"(num_labels={num_labels}; -100 marks unlabelled tokens)")
            ids.append(row_ids)
            labels.append(row_labels)
        width = _width(ids, pad_to, f"token-labelled examples {chunk}")
        label_tensor = _right_padded(labels, width, IGNORE_INDEX)
        batches.append({
            "input_ids": _right_padded(ids, width, pad_id),
            "labels": label_tensor,
            "num_tokens": sum(len(row) for row in ids),
            "num_labelled": int((label_tensor != IGNORE_INDEX).sum()),
        })
    return batches
