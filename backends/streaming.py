"""Streamed training data: `streaming: true` (SFT) and `pretraining_dataset:`, tokenised on the fly.

    for cursor, micro_batches in stream_train_steps(config, tokenizer, state.data_cursor, accumulation):
        state, metrics = train_step(state, micro_batches)
        state = state.replace(data_cursor=cursor)

Rows are read lazily through `datasets` streaming (`IterableDataset`) from local files, folders,
`save_to_disk` folders or Hub datasets already in the local cache; each row goes through its prompt
strategy and the length policy as it arrives, datasets are concatenated in order, shuffled through a
buffer when `shuffle_merged_datasets` (default true; `shuffle_before_merging_datasets` shuffles each
dataset first), and packed `streaming_multipack_buffer_size` examples at a time (see
`pure.data.stream`). Everything random is seeded by (seed, epoch), so an epoch's micro-batches are a
pure function of the config and the files, and resuming after n micro-batches re-reads the stream and
skips n: bitwise the same batches as an uninterrupted run.

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
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from backends.datasets import (
    _dataset_label,
    _ds_type,
    _entries,
    _is_remote,
    _is_saved_dataset,
    _looks_like_hub_id,
    _not_cached,
    find_json_error,
    hub_snapshot,
    local_data_files,
    parse_split,
    pick_split,
)
from backends.user_code import entry_strategy
from pure.data.settings import DataError, DataSettings, Example
from pure.data.stream import StreamBatching, buffered_shuffle, stream_micro_batches as _micro_batches

log = logging.getLogger("puretune.data")

STREAMING_KINDS = ("sft",)


def _get(config, key: str, default: Any = None) -> Any:
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    return default if value is None else value


def is_streaming(config) -> bool:
    """True when the train set is streamed: `streaming: true`, `pretraining_dataset:`, or every
    `datasets:` entry marked `streaming: true` (a mix of streamed and prepared entries is an error)."""
    if _get(config, "streaming") or _get(config, "pretraining_dataset"):
        return True
    marks = [bool(e.get("streaming")) for e in _entries(_get(config, "datasets"))]
    if any(marks) and not all(marks):
        raise DataError("datasets: some entries set streaming: true and others do not; a train set is either "
                        "streamed or prepared: set streaming: true at the top level (or on every entry)")
    return bool(marks) and all(marks)


def _pretraining_entries(config) -> list[dict]:
    out = []
    for i, spec in enumerate(_get(config, "pretraining_dataset") or []):
        entry = {"path": spec} if isinstance(spec, str) else dict(spec)
        if not entry.get("path"):
            raise DataError(f"pretraining_dataset[{i}] needs path: (a local file or folder, or a cached Hub dataset)")
        if entry.get("type") in (None, "", "pretrain"):
            entry["type"] = "completion"
            entry["field"] = entry.pop("text_column", None) or "text"
        entry.setdefault("split", "train")
        out.append(entry)
    return out


def streaming_entries(config) -> list[dict]:
    """The train entries to stream: `pretraining_dataset` (as completion datasets) or `datasets`."""
    entries = _pretraining_entries(config) or _entries(_get(config, "datasets"))
    if not entries:
        raise DataError("streaming: the config has no `datasets:` (or `pretraining_dataset:`) to stream")
    return entries


def check_streaming_config(config) -> None:
    """The keys a stream cannot honour, each refused with what to do instead."""
    kind = config.training_kind() if hasattr(config, "training_kind") else "sft"
    if kind not in STREAMING_KINDS:
        raise DataError(f"streaming supports SFT and pretraining, not {kind!r}; preprocess the dataset instead")
    refusals = {
        "val_set_size": "a held-out split needs the whole train set; use test_datasets (eval sets are not streamed)",
        "dataset_shard_num": "sharding needs the row count of the stream; shard the files instead",
        "dataset_exact_deduplication": "deduplicating a stream would keep every row seen; deduplicate the files",
    }
    for key, why in refusals.items():
        if _get(config, key):
            raise DataError(f"{key} cannot be used with a streamed train set: {why}")


# ---------------------------------------------------------------------------------------------
# Loading one entry as an IterableDataset
# ---------------------------------------------------------------------------------------------


def _stream_files(ds_type: str, files: list[Path]):
    import datasets

    return datasets.load_dataset(ds_type, data_files=[str(f) for f in files], split=None, streaming=True)


def _stream_local(entry: Mapping, path: Path):
    import datasets

    if path.is_file():
        return _stream_files(_ds_type(entry, [path]), [path]), [path]
    if _is_saved_dataset(path) and not entry.get("data_files"):
        try:
            saved = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(f"could not load the saved dataset folder {path}: {err}") from None
        if isinstance(saved, datasets.DatasetDict):
            return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in saved.items()}), []
        return saved.to_iterable_dataset(), []
    files = local_data_files(entry, path)
    return _stream_files(_ds_type(entry, files), files), files


def load_streaming_entry(entry: Mapping[str, Any], *, default_split: str = "train"):
    """One dataset entry as a `datasets.IterableDataset` (rows read lazily), split picked and sliced.

    Slices must be row counts (`train[100:200]`): a percentage needs the length of the stream.
    """
    return _load_streaming_entry(entry, default_split)[0]


def _load_streaming_entry(entry: Mapping[str, Any], default_split: str = "train") -> tuple[Any, list[Path]]:
    """(IterableDataset, the data files it reads) of one entry."""
    import datasets

    path = str(entry.get("path") or "")
    if not path:
        raise DataError("a dataset entry needs `path:` (a local file or folder, or a Hub dataset id)")
    if _is_remote(path):
        raise DataError(f"dataset {path!r}: remote paths (s3://, gs://, https://, ...) are not supported yet "
                        "by puretune, streamed or not; copy the files locally and point `path:` at them")
    if entry.get("shards"):
        raise DataError(f"dataset {path!r}: shards cannot be cut from a stream (its row count is unknown); "
                        "point data_files at a subset of the files instead")
    local = Path(path).expanduser()
    if local.exists():
        loaded, files = _stream_local(entry, local)
    elif _looks_like_hub_id(path):
        folder = hub_snapshot(entry)
        if folder is None:
            raise _not_cached(entry)
        if entry.get("name") and not entry.get("data_files"):  # a named subset: the dataset's own loader
            try:
                loaded, files = datasets.load_dataset(str(folder), name=entry["name"], streaming=True), []
            except Exception as err:
                raise DataError(f"could not stream the cached dataset {path!r} ({entry['name']}) from {folder}: "
                                f"{err}") from None
        else:
            loaded, files = _stream_local(entry, folder)
    else:
        raise DataError(f"dataset file {path!r} does not exist (relative paths start at {os.getcwd()})")

    split_spec = entry.get("split") or default_split
    split_name, start, stop = parse_split(split_spec)
    stream = pick_split(loaded, entry, split_name)
    for bound in (start, stop):
        if bound is not None and (bound.endswith("%") or int(bound) < 0):
            raise DataError(f"dataset {path!r}: split {split_spec!r}: a streamed dataset is sliced by row counts "
                            "from its start (train[100:200]); percentages and negative bounds need its length")
    lo = int(start) if start is not None else 0
    if lo:
        stream = stream.skip(lo)
    if stop is not None:
        stream = stream.take(max(0, int(stop) - lo))
    if entry.get("skip"):
        stream = stream.skip(int(entry["skip"]))
    return stream, files


def iter_rows(stream, entry: Mapping, files: list[Path] = ()) -> Iterator[dict]:
    """The rows of a loaded stream; a malformed file among `files` surfaces as a DataError naming the
    file and line."""
    iterator = iter(stream)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except DataError:
            raise
        except Exception as err:  # datasets wraps parse errors in its own exception types
            for f in files:
                if f.suffix.lower() in (".json", ".jsonl") or entry.get("ds_type") in ("json", "jsonl"):
                    found = find_json_error(f)
                    if found is not None:
                        raise found from None
            cause = err.__cause__ or err
            raise DataError(f"could not read dataset {entry.get('path')!r} while streaming: "
                            f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
        yield row


# ---------------------------------------------------------------------------------------------
# Examples and micro-batches
# ---------------------------------------------------------------------------------------------


def _keep(example: Example, settings: DataSettings, label: str, row: int, counts: dict) -> Example | None:
    """The length policy for one streamed example (its `raise` error names the streamed row)."""
    from pure.data.length import apply_length_policy

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
    label = _dataset_label(entry)
    stream, files = _load_streaming_entry(entry)
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


def stream_examples(config, tokenizer, epoch: int = 0, *, settings: DataSettings | None = None) -> Iterator[Example]:
    """The train examples of one epoch in stream order: {input_ids, labels} per example."""
    check_streaming_config(config)
    settings = settings or config.data_settings()
    seed = settings.seed
    buffer = int(_get(config, "streaming_multipack_buffer_size", 10_000))
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    per_dataset = []
    for i, entry in enumerate(streaming_entries(config)):
        examples = _entry_examples(entry, i, "sft", tokenizer, settings, config_dict)
        if _get(config, "shuffle_before_merging_datasets"):
            examples = buffered_shuffle(examples, buffer, [seed, epoch, 1, i])
        per_dataset.append(examples)
    merged = itertools.chain.from_iterable(per_dataset)
    if _get(config, "shuffle_merged_datasets", True):
        merged = buffered_shuffle(merged, buffer, [seed, epoch, 0])
    return merged


def stream_batching(config, pad_id: int) -> StreamBatching:
    """The micro-batch settings of a streamed train set, read from the config."""
    pretraining = bool(_get(config, "pretraining_dataset"))
    packing = pretraining or bool(_get(config, "sample_packing"))
    buffer = _get(config, "pretrain_multipack_buffer_size") if pretraining else None
    return StreamBatching(
        sequence_len=int(_get(config, "sequence_len")),
        micro_batch_size=int(_get(config, "micro_batch_size", 1)),
        pad_id=pad_id,
        packing=packing,
        buffer_size=int(buffer or _get(config, "streaming_multipack_buffer_size", 10_000)),
        pad_to_sequence_len=(_get(config, "pad_to_sequence_len") is not False) if packing
        else bool(_get(config, "pad_to_sequence_len")),
        max_per_bin=int(_get(config, "sample_packing_bin_size", 200)),
        sequential=bool(_get(config, "sample_packing_sequentially")),
        bucket_by_length=bool(_get(config, "group_by_length")),
        isolate_documents=not pretraining or _get(config, "pretrain_multipack_attn") is not False,
    )


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def stream_micro_batches(config, tokenizer, epoch: int = 0, *, skip: int = 0,
                         settings: DataSettings | None = None) -> Iterator[dict]:
    """The micro-batches of one streamed epoch, from the `skip`-th on.

    Same dict contract as `programs.common.epoch_micro_batches`: LongTensors `input_ids`, `labels`,
    `positions`, `segment_ids` of shape [rows, width] and ints `num_tokens`, `num_trained`. A pure
    function of (config, files, tokenizer, epoch): `skip=n` gives exactly the batches an
    uninterrupted stream gives after its first n.
    """
    settings = settings or config.data_settings()
    how = stream_batching(config, _pad_id(tokenizer))
    return _micro_batches(stream_examples(config, tokenizer, epoch, settings=settings), how,
                          seed=settings.seed, epoch=epoch, skip=skip)


def stream_train_steps(config, tokenizer, data_cursor: Mapping[str, int] | None, accumulation: int, *,
                       settings: DataSettings | None = None) -> Iterator[tuple[dict, list[dict]]]:
    """Endless (cursor after the step, micro-batches of the step) pairs, epoch after epoch.

    `data_cursor` is the train state's {"epoch": e, "batch": n}: n micro-batches of epoch e are
    consumed. An epoch's last micro-batches that do not fill `accumulation` are dropped and the next
    epoch starts (as the prepared path does). Training needs `max_steps` (a stream's length is unknown).
    """
    if not _get(config, "max_steps"):
        raise DataError("a streamed train set needs max_steps: the number of steps in a stream is not known "
                        "in advance (1 step = sequence_len x micro_batch_size x gradient_accumulation_steps tokens)")
    if accumulation < 1:
        raise ValueError(f"accumulation must be positive, got {accumulation}")
    cursor = dict(data_cursor or {})
    epoch, consumed = int(cursor.get("epoch", 0)), int(cursor.get("batch", 0))
    while True:
        batches = stream_micro_batches(config, tokenizer, epoch, skip=consumed, settings=settings)
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


def prepare_eval_datasets(config, tokenizer, *, settings: DataSettings | None = None):
    """The eval set of a streamed run: `test_datasets` prepared and cached as usual (not streamed),
    as a `datasets.Dataset`; None without `test_datasets`."""
    from backends.datasets import prepare_datasets

    if not _get(config, "test_datasets"):
        return None
    settings = settings or config.data_settings()
    eval_len = _get(config, "eval_sequence_len") or settings.sequence_len
    eval_only = config.model_copy(update={
        "datasets": config.test_datasets, "test_datasets": None, "val_set_size": 0, "streaming": False,
        "pretraining_dataset": None, "shuffle_merged_datasets": False, "dataset_shard_num": None,
        "dataset_shard_idx": None,
    })
    return prepare_datasets(eval_only, tokenizer, settings=replace(settings, sequence_len=eval_len)).train
