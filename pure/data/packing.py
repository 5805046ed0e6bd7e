"""Multipack: bin-pack examples into rows of `sequence_len` tokens, and collate rows into batches.

`pack_first_fit_decreasing` is a pure function of the lengths (and seed, epoch): the example indices
are shuffled by (seed, epoch), cut into groups of `group_size`, and each group is packed by
First-Fit-Decreasing with at most `max_per_bin` documents per bin; the bins are then shuffled with the
same generator. It is exact FFD, vectorised over runs of equal length: with items sorted by length,
first-fit puts a run of k items of length L into the open bins in index order, each taking
min(remaining // L, max_per_bin - count) of them, and opens new bins for the rest. One numpy pass per
distinct length instead of one Python step per item, so a million lengths pack in about a second.

Collation: one bin becomes one row; `positions` restart at 0 for every document and `segment_ids`
number the documents 1..n (0 = padding), so attention stays inside a document (varlen / block-diagonal
mask). Labels follow the Hugging Face convention (aligned with `input_ids`, the loss shifts them);
the label of every document's first token is set to -100, because in a packed row that position would
be predicted from the previous document, and in an unpacked row nothing predicts it. `num_trained` is
therefore exactly the number of loss terms.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pure.data.settings import IGNORE_INDEX, Example


def _check_lengths(lengths: np.ndarray, capacity: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    bad = np.flatnonzero((lengths < 1) | (lengths > capacity))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"example {i} has length {int(lengths[i])}; every length must be in "
                         f"1..{capacity} (apply the length policy before packing)")
    return lengths


def _first_fit_decreasing_group(lengths: np.ndarray, capacity: int, max_per_bin: int) -> np.ndarray:
    """Bin number of each item of one group under First-Fit-Decreasing (items in bin-placement order)."""
    n = lengths.size
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    run_starts = np.flatnonzero(np.r_[True, sorted_lengths[1:] != sorted_lengths[:-1]])
    run_ends = np.r_[run_starts[1:], n]
    remaining = np.empty(n, dtype=np.int64)  # at most one bin per item
    count = np.empty(n, dtype=np.int64)
    bin_of_sorted = np.empty(n, dtype=np.int64)
    n_bins = 0
    for start, end in zip(run_starts.tolist(), run_ends.tolist()):
        size, todo = int(sorted_lengths[start]), end - start
        placed = 0
        if n_bins:
            open_bins = np.flatnonzero(remaining[:n_bins] >= size)  # first-fit: leftmost first
            if open_bins.size:
                fits = np.minimum(remaining[open_bins] // size, max_per_bin - count[open_bins])
                filled = np.cumsum(fits)
                last = int(np.searchsorted(filled, todo))  # first bin at which the run is used up
                if last < filled.size:
                    open_bins, fits = open_bins[: last + 1], fits[: last + 1].copy()
                    fits[-1] -= filled[last] - todo
                placed = int(fits.sum())
                bin_of_sorted[start:start + placed] = np.repeat(open_bins, fits)
                remaining[open_bins] -= fits * size
                count[open_bins] += fits
        left = todo - placed
        if left:
            per_bin = min(capacity // size, max_per_bin)
            new_bins = -(-left // per_bin)
            bin_of_sorted[start + placed:end] = n_bins + np.arange(left) // per_bin
            counts = np.full(new_bins, per_bin, dtype=np.int64)
            counts[-1] = left - per_bin * (new_bins - 1)
            remaining[n_bins:n_bins + new_bins] = capacity - counts * size
            count[n_bins:n_bins + new_bins] = counts
            n_bins += new_bins
    bin_of = np.empty(n, dtype=np.int64)
    bin_of[order] = bin_of_sorted
    return bin_of


def _split_by_bin(items: np.ndarray, bin_of: np.ndarray, order_key: np.ndarray) -> list[np.ndarray]:
    """Group `items` by bin number; within a bin keep the order of `order_key` (placement order)."""
    by_bin = np.lexsort((order_key, bin_of))
    grouped = items[by_bin]
    bounds = np.r_[0, np.flatnonzero(np.diff(bin_of[by_bin])) + 1, grouped.size].tolist()
    return [grouped[a:b] for a, b in zip(bounds[:-1], bounds[1:])]  # np.split is 5x slower here


def _pack_sequential(lengths: np.ndarray, capacity: int, max_per_bin: int) -> list[np.ndarray]:
    ends = np.cumsum(lengths)
    starts_total = np.r_[0, ends]
    bins = []
    start, n = 0, lengths.size
    while start < n:
        stop = int(np.searchsorted(ends, starts_total[start] + capacity, side="right"))
        stop = min(stop, start + max_per_bin)
        bins.append(np.arange(start, stop))
        start = stop
    return bins


def pack_first_fit_decreasing(lengths: np.ndarray | Sequence[int], capacity: int, *, max_per_bin: int = 200,
                              group_size: int = 100_000, sequential: bool = False, seed: int = 0,
                              epoch: int = 0) -> list[np.ndarray]:
    """Bins of example indices, each bin's total length <= capacity and size <= max_per_bin.

    sequential=True (axolotl's `sample_packing_sequentially`) keeps the dataset order: documents go
    into the current bin until the next one does not fit, and nothing is shuffled. Otherwise the
    result is a deterministic function of (lengths, capacity, max_per_bin, group_size, seed, epoch).
    """
    lengths = _check_lengths(lengths, capacity)
    if max_per_bin < 1 or group_size < 1:
        raise ValueError("max_per_bin and group_size must be positive")
    if sequential:
        return _pack_sequential(lengths, capacity, max_per_bin)
    rng = np.random.default_rng([seed, epoch])
    shuffled = rng.permutation(lengths.size)
    bins: list[np.ndarray] = []
    for g in range(0, lengths.size, group_size):
        items = shuffled[g:g + group_size]
        group_lengths = lengths[items]
        bin_of = _first_fit_decreasing_group(group_lengths, capacity, max_per_bin)
        placement = np.empty(items.size, dtype=np.int64)
        placement[np.argsort(-group_lengths, kind="stable")] = np.arange(items.size)
        bins += _split_by_bin(items, bin_of, placement)
    return [bins[i] for i in rng.permutation(len(bins))]


def packing_efficiency(lengths: np.ndarray | Sequence[int], bins: Sequence[np.ndarray], capacity: int) -> float:
    """Used token slots / all slots of the packed rows (1.0 = no padding)."""
    if not bins:
        return 0.0
    lengths = np.asarray(lengths, dtype=np.int64)
    used = int(lengths[np.concatenate(bins)].sum())
    return used / (len(bins) * capacity)


def _batch(rows: list[list[Example]], width: int, pad_id: int) -> dict:
    """One batch: each row is the concatenation of its documents, right-padded to `width`."""
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    segment_ids = np.zeros(shape, dtype=np.int64)
    for r, docs in enumerate(rows):
        offset = 0
        for segment, doc in enumerate(docs, start=1):
            n = len(doc["input_ids"])
            if offset + n > width:
                raise ValueError(f"row {r} needs {offset + n} tokens but the batch is {width} wide")
            input_ids[r, offset:offset + n] = doc["input_ids"]
            labels[r, offset:offset + n] = doc["labels"]
            labels[r, offset] = IGNORE_INDEX  # nothing in this document predicts its first token
            positions[r, offset:offset + n] = np.arange(n)
            segment_ids[r, offset:offset + n] = segment
            offset += n
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "positions": torch.from_numpy(positions),
        "segment_ids": torch.from_numpy(segment_ids),
        "num_tokens": int((segment_ids > 0).sum()),
        "num_trained": int((labels != IGNORE_INDEX).sum()),
    }


def collate_packed(examples: Sequence[Example], bins: Sequence[np.ndarray], micro_batch_size: int,
                   sequence_len: int, pad_id: int, pad_to_sequence_len: bool = True) -> list[dict]:
    """Batches of `micro_batch_size` packed rows (the last batch may have fewer rows).

    Each batch: LongTensors `input_ids`, `labels` (pad -100), `positions` (0.. per document, 0 on
    padding), `segment_ids` (1..n per document in the row, 0 on padding) of shape
    [rows, sequence_len] (or [rows, longest row] when pad_to_sequence_len is False), plus the ints
    `num_tokens` (real tokens) and `num_trained` (labels that are not -100).
    """
    batches = []
    for b in range(0, len(bins), micro_batch_size):
        rows = [[examples[int(i)] for i in bin_] for bin_ in bins[b:b + micro_batch_size]]
        width = sequence_len
        if not pad_to_sequence_len:
            width = max(sum(len(doc["input_ids"]) for doc in docs) for docs in rows)
        batches.append(_batch(rows, width, pad_id))
    return batches


def collate_padded(examples: Sequence[Example], indices: Sequence[int] | np.ndarray, micro_batch_size: int,
                   pad_id: int, pad_to: int | None = None, bucket_by_length: bool = False) -> list[dict]:
    """Batches of `micro_batch_size` unpacked rows, one example per row, right-padded.

    Rows are padded to the longest row of the batch, or to `pad_to` when given. `bucket_by_length`
    (axolotl's `group_by_length`) sorts each mega-batch of 50 batches by length, longest first, so
    a batch holds similar lengths and wastes little padding; it stays deterministic for given indices.
    Same keys as `collate_packed`; `segment_ids` is 1 on real tokens.
    """
    indices = [int(i) for i in indices]
    if bucket_by_length:
        mega = 50 * micro_batch_size
        indices = [i for m in range(0, len(indices), mega)
                   for i in sorted(indices[m:m + mega], key=lambda i: -len(examples[i]["input_ids"]))]
    batches = []
    for b in range(0, len(indices), micro_batch_size):
        rows = [[examples[i]] for i in indices[b:b + micro_batch_size]]
        width = pad_to or max(len(docs[0]["input_ids"]) for docs in rows)
        batches.append(_batch(rows, width, pad_id))
    return batches

