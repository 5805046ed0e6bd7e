"""Streams of examples into micro-batches: a buffered shuffle and buffered packing, both deterministic.

A streamed dataset is never held whole, so the two whole-dataset steps of the prepared path become
buffered ones (as `datasets.IterableDataset.shuffle` and axolotl's streaming multipack do):

- `buffered_shuffle(items, buffer_size, seed)`: a buffer of `buffer_size` items; each incoming item
  replaces a uniformly drawn buffered one, which is emitted; the rest leaves in random order at the
  end. Item i can move at most ~buffer_size places earlier, arbitrarily later.
- `stream_micro_batches(examples, ...)`: `buffer_size` examples at a time are packed by
  `pack_first_fit_decreasing` (bins shuffled, as in the prepared path) or taken as padded rows; the
  rows queue up and leave `micro_batch_size` at a time, so a micro-batch may mix two buffers; only
  the final micro-batch of the stream may be short. Micro-batches follow the contract of
  `pure.data.packing.collate_packed`.

Randomness comes only from `seed` sequences ([seed, epoch, buffer index] for packing), so the
micro-batches are a pure function of (stream, settings, seed, epoch), and `skip=n` (resume after n
consumed micro-batches) yields exactly what the uninterrupted stream would have yielded from n on,
without collating the skipped ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from pure.data.packing import collate_packed, collate_padded, pack_first_fit_decreasing
from pure.data.settings import Example

T = TypeVar("T")
_DRAWS = 4096  # random indices drawn per numpy call


def buffered_shuffle(items: Iterable[T], buffer_size: int, seed: Sequence[int]) -> Iterator[T]:
    """Items in a buffered random order (see the module docstring); deterministic given `seed`."""
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be positive, got {buffer_size}")
    rng = np.random.default_rng(list(seed))
    buffer: list[T] = []
    draws: list[int] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        if not draws:
            draws = rng.integers(0, buffer_size, size=_DRAWS).tolist()[::-1]
        j = draws.pop()
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)).tolist():
        yield buffer[j]


@dataclass(frozen=True)
class StreamBatching:
    """How streamed examples become micro-batches (the plain values taken from the config)."""

    sequence_len: int
    micro_batch_size: int
    pad_id: int = 0  # the tokenizer's pad token id (backends.streaming fills it in); 0 when it has none
    packing: bool = True
    buffer_size: int = 10_000  # streaming_multipack_buffer_size
    pad_to_sequence_len: bool = True
    max_per_bin: int = 200  # sample_packing_bin_size
    sequential: bool = False  # sample_packing_sequentially
    bucket_by_length: bool = False  # group_by_length (padded rows only)
    isolate_documents: bool = True  # False (pretrain_multipack_attn: false): a row attends across documents


def _buffers(examples: Iterable[Example], size: int) -> Iterator[list[Example]]:
    buffer: list[Example] = []
    for example in examples:
        buffer.append(example)
        if len(buffer) == size:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def _rows(examples: Iterable[Example], how: StreamBatching, seed: int, epoch: int) -> Iterator[list[Example]]:
    """Rows (lists of documents) in emission order: each buffer packed or kept one example per row."""
    for k, buffer in enumerate(_buffers(examples, how.buffer_size)):
        if not how.packing:
            yield from ([example] for example in buffer)
            continue
        lengths = np.fromiter((len(e["input_ids"]) for e in buffer), dtype=np.int64, count=len(buffer))
        buffer_seed = int(np.random.SeedSequence([seed, epoch, k]).generate_state(1)[0])
        bins = pack_first_fit_decreasing(lengths, how.sequence_len, max_per_bin=how.max_per_bin,
                                         group_size=len(buffer), sequential=how.sequential, seed=buffer_seed)
        yield from ([buffer[int(i)] for i in bin_] for bin_ in bins)


def _collate(rows: list[list[Example]], how: StreamBatching) -> dict:
    if how.packing:
        flat = [doc for row in rows for doc in row]
        bounds = np.cumsum([0] + [len(row) for row in rows])
        bins = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        (batch,) = collate_packed(flat, bins, len(rows), how.sequence_len, how.pad_id,
                                  pad_to_sequence_len=how.pad_to_sequence_len)
        return batch if how.isolate_documents else join_documents(batch)
    pad_to = how.sequence_len if how.pad_to_sequence_len else None
    (batch,) = collate_padded([row[0] for row in rows], range(len(rows)), len(rows), how.pad_id, pad_to=pad_to)
    return batch


def _row_groups(examples: Iterable[Example], how: StreamBatching, seed: int,
                epoch: int) -> Iterator[list[list[Example]]]:
    """Rows grouped `micro_batch_size` at a time (padded-row buckets sorted by length per mega-batch)."""
    group: list[list[Example]] = []
    rows = _rows(examples, how, seed, epoch)
    if how.bucket_by_length and not how.packing:
        rows = _bucketed(rows, how.micro_batch_size)
    for row in rows:
        group.append(row)
        if len(group) == how.micro_batch_size:
            yield group
            group = []
    if group:
        yield group


def _bucketed(rows: Iterator[list[Example]], micro_batch_size: int) -> Iterator[list[Example]]:
    """`group_by_length` on a stream: each run of 50 micro-batches of rows sorted longest first."""
    mega = 50 * micro_batch_size
    for chunk in _buffers(rows, mega):
        yield from sorted(chunk, key=lambda row: -len(row[0]["input_ids"]))


def stream_micro_batches(examples: Iterable[Example], how: StreamBatching, *, seed: int, epoch: int = 0,
                         skip: int = 0) -> Iterator[dict]:
    """Micro-batches of a stream of examples ({input_ids, labels}); the first `skip` are not emitted."""
    if how.micro_batch_size < 1 or how.buffer_size < 1:
        raise ValueError("micro_batch_size and buffer_size must be positive")
    for index, group in enumerate(_row_groups(examples, how, seed, epoch)):
        if index >= skip:
            yield _collate(group, how)


def join_documents(batch: dict) -> dict:
    """One attention segment per row (`pretrain_multipack_attn: false`): segment id 1 on every real
    token and positions counting on across the row's documents. Labels are unchanged, so a document's
    first token stays unpredicted."""
    real = batch["segment_ids"] > 0
    positions = torch.where(real, torch.cumsum(real.long(), dim=1) - 1, torch.zeros_like(batch["positions"]))
    return {**batch, "segment_ids": real.long(), "positions": positions}
