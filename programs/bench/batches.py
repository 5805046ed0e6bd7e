"""The batches every benchmark variant trains on: our micro-batches, and the very same rows as
transformers `Trainer` inputs (packed rows rebuilt by `DataCollatorWithFlattening`, or the unpacked
rows in our order, padded by `DataCollatorForSeq2Seq`), each carrying what a step is credited with."""
from __future__ import annotations

import numpy as np
import torch

from backends.flops import attention_pairs
from programs import common
from programs.bench import BenchError


def load_train_examples(config, tokenizer) -> list[dict]:
    from backends.datasets import prepare_datasets
    from programs.data import data_spec

    data = prepare_datasets(data_spec(config), tokenizer)
    return [dict(input_ids=r["input_ids"], labels=r["labels"]) for r in data.train]


def plan_micro_batches(examples, config, pad_id: int, count: int, packing: bool | None = None) -> list[dict]:
    """The first `count` full micro-batches (exactly `micro_batch_size` rows) of epochs 0, 1, ..., as
    `common.epoch_micro_batches` makes them; a short last batch of an epoch is skipped so a trainer
    with a fixed batch size can see the very same batches."""
    batches, epoch = [], 0
    while len(batches) < count:
        full = [b for b in common.epoch_micro_batches(examples, config, pad_id, epoch, packing=packing)
                if b["input_ids"].shape[0] == config.micro_batch_size]
        if not full:
            raise BenchError(f"the training data makes no full micro-batch of micro_batch_size "
                             f"{config.micro_batch_size}; lower micro_batch_size or add data")
        batches += full
        epoch += 1
    return batches[:count]


def document_lengths(segment_ids: torch.Tensor) -> list[int]:
    """Lengths of the documents of a [B, T] segment-id batch (0 = padding, 1..n = documents per row)."""
    lengths = []
    for row in segment_ids.numpy():
        counts = np.bincount(row)
        lengths += [int(c) for c in counts[1:] if c]
    return lengths


def batch_counts(lengths: list[int], supervised: int, slots: int) -> dict:
    """What a step credits a micro-batch with: real tokens, loss terms, slots, causal attention pairs."""
    return {"tokens": int(sum(lengths)), "supervised": int(supervised), "slots": int(slots),
            "pairs": attention_pairs(lengths)}


def ours_counts(batch: dict) -> dict:
    return batch_counts(document_lengths(batch["segment_ids"]), batch["num_trained"], batch["input_ids"].numel())


def hf_packed_rows(micro_batches: list[dict], pad_id: int) -> list[dict]:
    """Our packed micro-batches as Trainer rows: each row's documents flattened by transformers'
    `DataCollatorWithFlattening` (labels' first token -100, position_ids restarting at 0), then
    right-padded to our row width (pad id, label -100, position 0)."""
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    rows = []
    for batch in micro_batches:
        width = batch["input_ids"].shape[1]
        for r in range(batch["input_ids"].shape[0]):
            seg, ids, labels = batch["segment_ids"][r], batch["input_ids"][r], batch["labels"][r]
            docs = [{"input_ids": ids[seg == s].tolist(), "labels": labels[seg == s].tolist()}
                    for s in range(1, int(seg.max()) + 1)]
            flat = flatten(docs)
            n = flat["input_ids"].shape[1]
            row = {"input_ids": torch.full((width,), pad_id, dtype=torch.long),
                   "labels": torch.full((width,), -100, dtype=torch.long),
                   "position_ids": torch.zeros(width, dtype=torch.long)}
            for key in row:
                row[key][:n] = flat[key][0]
            lengths = [len(d["input_ids"]) for d in docs]
            row["bench_counts"] = batch_counts(lengths, int((row["labels"][1:] != -100).sum()), width)
            rows.append(row)
    return rows


def collate_packed_rows(rows: list[dict]) -> dict:
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}
    batch["bench_counts"] = {k: sum(r["bench_counts"][k] for r in rows) for k in rows[0]["bench_counts"]}
    return batch


def hf_padded_rows(examples, config, count: int) -> list[dict]:
    """`count` rows in the order our unpacked batching visits them (a (seed, epoch) permutation per epoch)."""
    from pure import rng

    rows, epoch, seed = [], 0, config.seed
    while len(rows) < count:
        order = rng.permutation(rng.fold_in(rng.key(seed), epoch), len(examples)).tolist()
        rows += [{"input_ids": list(examples[i]["input_ids"]), "labels": list(examples[i]["labels"])} for i in order]
        epoch += 1
    return rows[:count]


class PaddedCollator:
    """`DataCollatorForSeq2Seq` (pad to the longest row, labels padded with -100) plus the step counts."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")

    def __call__(self, rows):
        batch = dict(self.pad(rows))
        lengths = batch["attention_mask"].sum(1).tolist()
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        batch["bench_counts"] = batch_counts(lengths, supervised, batch["input_ids"].numel())
        return batch
