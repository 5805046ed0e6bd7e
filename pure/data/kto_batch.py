"""KTO micro-batches: each row a (prompt, completion) with its desirable label, plus a mismatched KL row.

KTO's reference point z0 is estimated on (prompt, completion) pairs that do not belong together
(`pure.losses.kto`). Row j of the epoch order gets the KL row

    prompt of example order[j]  +  completion of example order[j - 1]   (j = 0 takes the last one)

TRL builds its KL rows by the same shift but *within* each batch, which pairs a prompt with its own
completion when the batch has one row (TRL then refuses batch size 1). Shifting along the whole epoch
order gives every row a mismatched completion whatever the micro-batch size, and the KL rows of an
accumulated batch do not depend on how it is split into micro-batches. (An epoch of one example has
only its own completion to use.)
"""
from __future__ import annotations

from typing import Sequence

import torch

from pure import rng
from pure.data.settings import IGNORE_INDEX, DataError, Example


def _check_example(example: Example, index: int) -> None:
    for name in ("prompt_ids", "completion_ids", "label"):
        if name not in example:
            raise DataError(f"KTO example {index}: missing `{name}` (expected prompt_ids, completion_ids, label)")
    if len(example["prompt_ids"]) == 0:
        raise DataError(f"KTO example {index}: `prompt_ids` is empty; the first completion token needs a "
                        f"token before it to be predicted from")
    if len(example["completion_ids"]) == 0:
        raise DataError(f"KTO example {index}: `completion_ids` is empty; expected at least one token")
    if example["label"] not in (True, False):
        raise DataError(f"KTO example {index}: `label` must be a bool (desirable or not), "
                        f"got {example['label']!r}")


def _rows(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `labels` (-100 on prompt and padding) of (prompt, completion) rows."""
    width = max(len(p) + len(c) for p, c in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for r, (prompt, completion) in enumerate(pairs):
        n, m = len(prompt), len(completion)
        input_ids[r, :n + m] = torch.tensor([*prompt, *completion], dtype=torch.long)
        labels[r, n:n + m] = torch.tensor(completion, dtype=torch.long)
    return input_ids, labels


def collate_kto(examples: Sequence[Example], order: Sequence[int] | torch.Tensor, micro_batch_size: int,
                pad_id: int, *, max_length: int | None = None) -> list[dict]:
    """Micro-batches of `micro_batch_size` rows (the last may have fewer), taking examples in `order`.

    Each: `input_ids`, `labels` [B, T] (prompt + completion, right-padded with `pad_id`, labels -100
    on prompt and padding), `kto_label` Bool [B] (True = desirable), `kl_input_ids`, `kl_labels`
    [B, T'] (the mismatched rows described in the module docstring), and the ints `num_rows`,
    `num_tokens` (real tokens of the main rows), `num_trained` (their trained tokens).

    `max_length` cuts KL completions from the right so a KL row fits (TRL's keep_end); main rows must
    already fit (the preference tokenizer truncates them).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    order = [int(i) for i in order]
    for j in order:
        if not 0 <= j < len(examples):
            raise DataError(f"KTO order names example {j}, but there are {len(examples)} examples")
    for j in sorted(set(order)):
        _check_example(examples[j], j)
    n = len(order)
    batches = []
    for start in range(0, n, micro_batch_size):
        main, kl = [], []
        for pos in range(start, min(start + micro_batch_size, n)):
            example = examples[order[pos]]
            prompt, completion = list(example["prompt_ids"]), list(example["completion_ids"])
            other = list(examples[order[pos - 1]]["completion_ids"])  # pos 0 wraps to the last one
            if max_length is not None:
                if len(prompt) + len(completion) > max_length:
                    raise DataError(f"KTO example {order[pos]}: prompt + completion is "
                                    f"{len(prompt) + len(completion)} tokens, over max_length {max_length}")
                other = other[:max_length - len(prompt)]
            main.append((prompt, completion))
            kl.append((prompt, other))
        input_ids, labels = _rows(main, pad_id)
        kl_input_ids, kl_labels = _rows(kl, pad_id)
        batches.append({
            "input_ids": input_ids, "labels": labels,
            "kto_label": torch.tensor([bool(examples[order[p]]["label"]) for p in range(start, start + len(main))]),
            "kl_input_ids": kl_input_ids, "kl_labels": kl_labels,
            "num_rows": len(main),
            "num_tokens": sum(len(p) + len(c) for p, c in main),
            "num_trained": sum(len(c) for _, c in main),
        })
    return batches


def kto_micro_batches(examples: Sequence[Example], micro_batch_size: int, pad_id: int, seed: int, epoch: int,
                      *, max_length: int | None = None) -> list[dict]:
    """One epoch of KTO micro-batches, shuffled by `permutation(fold_in(key(seed), epoch), n)`."""
    order = rng.permutation(rng.fold_in(rng.key(seed), epoch), len(examples))
    return collate_kto(examples, order, micro_batch_size, pad_id, max_length=max_length)
