"""Streamed training data: `streaming: true` (SFT) and `pretraining_dataset:`, tokenised on the fly.

    spec = data_spec(config)   # programs.data: the config's data keys as a backends.data_spec.DataSpec
    for cursor, micro_batches in stream_train_steps(spec, tokenizer, state.data_cursor, accumulation):
        state, metrics = train_step(state, micro_batches)
        state = state.replace(data_cursor=cursor)

Rows are read lazily (`backends.data_sources.stream_dataset_entry`, a `datasets` IterableDataset)
from local files, folders, `save_to_disk` folders or Hub datasets already in the local cache; each
row goes through its prompt strategy and the length policy as it arrives, datasets are concatenated
in order, shuffled through a buffer when `shuffle_merged_datasets` (default true;
`shuffle_before_merging_datasets` shuffles each dataset first), and packed
`streaming_multipack_buffer_size` examples at a time (see `pure.data.stream`). Everything random is
seeded by (seed, epoch), so an epoch's micro-batches are a pure function of the spec and the files,
and resuming after n micro-batches re-reads the stream and skips n: bitwise the same batches as an
uninterrupted run.

`pretraining_dataset` entries ({path, name, split, data_files, text_column: text, type: pretrain,
skip}) become `type: completion` datasets over `text_column` (BOS + text + EOS, split at
`sequence_len`, every token trained) after skipping `skip` rows; they are always packed, with one
attention segment per document unless `pretrain_multipack_attn: false`.

Rows are tokenised in this process as they are read (`dataset_num_proc` does not apply to a stream),
and a resumed run re-reads and re-tokenises the rows it skips.

What a stream cannot do, because its length is unknown, fails with a DataError that says so:
percentage split slices, `shards`, `dataset_shard_num`, `val_set_size` (use `test_datasets`: eval
sets are prepared and cached as usual, `prepare_eval_datasets`), exact deduplication; and training
needs `max_steps`.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, replace
from typing import Iterator, Mapping

from backends.data_sources import dataset_label, iter_rows, stream_dataset_entry
from backends.data_spec import DataSpec, check_streaming
from backends.datasets import prepare_datasets
from backends.user_code import entry_strategy
from pure.data.length import apply_length_policy
from pure.data.settings import DataError, DataSettings, Example
from pure.data.stream import StreamBatching, buffered_shuffle, stream_micro_batches as _micro_batches

log = logging.getLogger("puretune.data")


def _pretraining_entries(spec: DataSpec) -> list[dict]:
    out = []
    for i, item in enumerate(spec.pretraining_dataset):
        entry = {"path": item} if isinstance(item, str) else dict(item)
        if not entry.get("path"):
            raise DataError(f"pretraining_dataset[{i}] needs path: (a local file or folder, or a cached Hub dataset)")
        if entry.get("type") in (None, "", "pretrain"):
            entry["type"] = "completion"
            entry["field"] = entry.pop("text_column", None) or "text"
        entry.setdefault("split", "train")
        out.append(entry)
    return out


def streaming_entries(spec: DataSpec) -> list[dict]:
    """The train entries to stream: `pretraining_dataset` (as completion datasets) or `datasets`."""
    entries = _pretraining_entries(spec) or list(spec.datasets)
    if not entries:
        raise DataError("streaming: the config has no `datasets:` (or `pretraining_dataset:`) to stream")
    return entries


# ---------------------------------------------------------------------------------------------
# Examples and micro-batches
# ---------------------------------------------------------------------------------------------


def _keep(example: Example, settings: DataSettings, label: str, row: int, counts: dict) -> Example | None:
    """The length policy for one streamed example (its `raise` error names the streamed row)."""
    n = len(example["input_ids"])
    if n > settings.sequence_len and settings.excess_length_strategy == "raise":
        raise DataError(f"dataset {label!r} row {row}: {n} tokens is longer than sequence_len="
                        f"{settings.sequence_len} (excess_length_strategy: raise)")
    kept, stats = apply_length_policy([example], settings, label)
    for key, value in asdict(stats).items():
        if isinstance(value, int) and key not in ("sequence_len", "min_sample_len"):
            counts[key] = counts.get(key, 0) + value
    return kept[0] if kept else None


def _entry_examples(entry: dict, index: int, kind: str, tokenizer, settings: DataSettings,
                    config_dict: dict) -> Iterator[Example]:
    label = dataset_label(entry)
    stream, files = stream_dataset_entry(entry)
    row_fn = entry_strategy(kind, entry, tokenizer, settings, config=config_dict, dataset_index=index)
    counts: dict = {"rows": 0}
    for row_index, row in enumerate(iter_rows(stream, entry, files)):
        counts["rows"] += 1
        for example in row_fn(row, row_index):
            if "input_ids" not in example or "labels" not in example:
                raise DataError(f"dataset {label!r} row {row_index}: streaming needs input_ids and labels "
                                f"from its prompt strategy, got {sorted(example)}")
            kept = _keep(example, settings, label, row_index, counts)
            if kept is not None:
                yield {"input_ids": list(kept["input_ids"]), "labels": list(kept["labels"])}
    log.info("streamed %s: %s", label, ", ".join(f"{k} {v}" for k, v in counts.items()))
    if not counts.get("kept"):
        log.warning("streamed %s gave no example (%s)", label, counts)


def stream_examples(spec: DataSpec, tokenizer, epoch: int = 0) -> Iterator[Example]:
    """The train examples of one epoch in stream order: {input_ids, labels} per example."""
    check_streaming(spec)
    seed, buffer = spec.settings.seed, spec.streaming_buffer_size
    config_dict = dict(spec.transform_cfg)
    per_dataset = []
    for i, entry in enumerate(streaming_entries(spec)):
        examples = _entry_examples(entry, i, "sft", tokenizer, spec.settings, config_dict)
        if spec.shuffle_before_merging_datasets:
            examples = buffered_shuffle(examples, buffer, [seed, epoch, 1, i])
        per_dataset.append(examples)
    merged = itertools.chain.from_iterable(per_dataset)
    if spec.shuffle_merged_datasets:
        merged = buffered_shuffle(merged, buffer, [seed, epoch, 0])
    return merged


def _batching(spec: DataSpec, tokenizer) -> StreamBatching:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return replace(spec.stream_batching, pad_id=pad_id)


def stream_micro_batches(spec: DataSpec, tokenizer, epoch: int = 0, *, skip: int = 0) -> Iterator[dict]:
    """The micro-batches of one streamed epoch, from the `skip`-th on.

    Same dict contract as `programs.common.epoch_micro_batches`: LongTensors `input_ids`, `labels`,
    `positions`, `segment_ids` of shape [rows, width] and ints `num_tokens`, `num_trained`. A pure
    function of (spec, files, tokenizer, epoch): `skip=n` gives exactly the batches an
    uninterrupted stream gives after its first n.
    """
    return _micro_batches(stream_examples(spec, tokenizer, epoch), _batching(spec, tokenizer),
                          seed=spec.settings.seed, epoch=epoch, skip=skip)


def stream_train_steps(spec: DataSpec, tokenizer, data_cursor: Mapping[str, int] | None,
                       accumulation: int) -> Iterator[tuple[dict, list[dict]]]:
    """Endless (cursor after the step, micro-batches of the step) pairs, epoch after epoch.

    `data_cursor` is the train state's {"epoch": e, "batch": n}: n micro-batches of epoch e are
    consumed. An epoch's last micro-batches that do not fill `accumulation` are dropped and the next
    epoch starts (as the prepared path does). Training needs `max_steps` (a stream's length is unknown).
    """
    if not spec.max_steps:
        raise DataError("a streamed train set needs max_steps: the number of steps in a stream is not known "
                        "in advance (1 step = sequence_len x micro_batch_size x gradient_accumulation_steps tokens)")
    if accumulation < 1:
        raise ValueError(f"accumulation must be positive, got {accumulation}")
    cursor = dict(data_cursor or {})
    epoch, consumed = int(cursor.get("epoch", 0)), int(cursor.get("batch", 0))
    while True:
        batches = stream_micro_batches(spec, tokenizer, epoch, skip=consumed)
        steps = 0
        while True:
            micro = list(itertools.islice(batches, accumulation))
            if len(micro) < accumulation:
                break
            consumed += accumulation
            steps += 1
            yield {"epoch": epoch, "batch": consumed}, micro
        if steps == 0 and consumed == 0:
            raise DataError(f"the streamed train set gave fewer than gradient_accumulation_steps ({accumulation}) "
                            f"micro-batches in epoch {epoch}; add data or lower micro_batch_size / "
                            "gradient_accumulation_steps")
        epoch, consumed = epoch + 1, 0



def prepare_eval_datasets(spec: DataSpec, tokenizer):
    """The eval set of a streamed run: `test_datasets` prepared and cached as usual (not streamed),
    as a `datasets.Dataset`; None without `test_datasets`."""
    if not spec.test_datasets:
        return None
    eval_len = spec.eval_sequence_len or spec.settings.sequence_len
    eval_only = replace(
        spec, datasets=spec.test_datasets, test_datasets=(), val_set_size=0.0, streaming=False,
        pretraining_dataset=(), shuffle_merged_datasets=False, dataset_shard_num=None, dataset_shard_idx=0,
        settings=replace(spec.settings, sequence_len=eval_len),
    )
    return prepare_datasets(eval_only, tokenizer).train
