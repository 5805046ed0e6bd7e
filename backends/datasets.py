"""Datasets in, prepared examples out: the prompt strategy per row, the length policy, merge /
shuffle / dedup / shard, the validation split, through the cache.

    tokenizer = load_tokenizer(config.tokenizer_config or config.base_model)
    added = prepare_tokenizer(tokenizer, **tokenizer_edits(config))   # backends.tokenizer
    data = prepare_datasets(data_spec(config), tokenizer)           # data.train, data.eval: datasets.Dataset

Rows come from `backends.data_sources` (loading, splits, shards), the cache key and folder from
`backends.data_cache`; `backends.data_spec.DataSpec` carries the config's data keys as plain values.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from backends.data_cache import CACHE_FORMAT, cache_folder, prepared_fingerprint, read_cache, write_cache
from backends.data_sources import dataset_label, iter_rows, load_dataset_entry, stream_dataset_entry
from backends.data_spec import DataSpec, check_streaming, is_streaming
from backends.user_code import entry_strategy
from pure.data.length import apply_length_policy
from pure.data.settings import DataError, DataSettings, Example

log = logging.getLogger("puretune.data")

# Below this many rows per process, forking costs more than it saves.
PARALLEL_MIN_ROWS = 1000


@dataclass
class PreparedData:
    """The prepared train (and eval) examples, as Arrow-backed `datasets.Dataset`s."""

    train: Any
    eval: Any | None
    fingerprint: str
    path: Path | None  # the cache folder, None when skip_prepare_dataset
    stats: list[dict] = field(default_factory=list)  # one entry per dataset: counts and filters
    from_cache: bool = False


def _run_strategy(dataset, row_fn, num_proc: int) -> list[Example]:
    """row_fn over every row, in order; with num_proc > 1 through datasets.map in processes."""
    if num_proc <= 1 or len(dataset) < PARALLEL_MIN_ROWS * num_proc:
        examples: list[Example] = []
        for index, row in enumerate(dataset):
            examples.extend(row_fn(row, index))
        return examples

    def apply(batch: dict, indices: list[int]) -> dict:
        columns = list(batch)
        out = []
        for values, index in zip(zip(*(batch[c] for c in columns)), indices):
            out.extend(json.dumps(ex) for ex in row_fn(dict(zip(columns, values)), index))
        return {"_example": out}

    mapped = dataset.map(apply, batched=True, with_indices=True, remove_columns=dataset.column_names,
                         num_proc=num_proc, load_from_cache_file=False, desc="tokenising")
    return [json.loads(s) for s in mapped["_example"]]


def _length_policy(examples: list[Example], settings: DataSettings, label: str) -> tuple[list[Example], dict]:
    """The shared length policy for token examples; rows without input_ids/labels pass as they are."""
    if not examples or not all("input_ids" in ex and "labels" in ex for ex in examples):
        return examples, {"kept": len(examples)}
    kept, stats = apply_length_policy(examples, settings, label)
    info = asdict(stats) if hasattr(stats, "__dataclass_fields__") else dict(stats or {})
    if hasattr(stats, "summary"):
        info["summary"] = stats.summary()
    return kept, info


def _read_lazily(entry: dict, row_fn, shuffle: bool, seed: int) -> tuple[list[Example], int]:
    """`--iterable`: rows read as a stream (no Arrow copy of the raw data), strategy applied row by row;
    `shuffle` reorders the rows with the permutation `Dataset.shuffle(seed=seed)` would use, so the
    examples equal the non-iterable path's."""
    stream, files = stream_dataset_entry(entry)
    per_row = [row_fn(row, index) for index, row in enumerate(iter_rows(stream, entry, files))]
    if not per_row:
        raise DataError(f"dataset {entry.get('path')!r} (split {entry.get('split') or 'train'!r}) has no rows")
    if shuffle:
        per_row = [per_row[i] for i in np.random.default_rng(seed).permutation(len(per_row)).tolist()]
    return [example for part in per_row for example in part], len(per_row)


def _prepare_entries(entries: list[dict], kind: str, tokenizer, settings: DataSettings, *,
                     config_dict: dict, num_proc: int, shuffle_each: bool, seed: int,
                     what: str, iterable: bool = False) -> tuple[list[list[Example]], list[dict]]:
    per_dataset, stats = [], []
    for i, entry in enumerate(entries):
        label = dataset_label(entry)
        row_fn = entry_strategy(kind, entry, tokenizer, settings, config=config_dict, dataset_index=i)
        if iterable:
            examples, n_rows = _read_lazily(entry, row_fn, shuffle_each, seed)
        else:
            raw = load_dataset_entry(entry)
            if shuffle_each:
                raw = raw.shuffle(seed=seed)
            examples, n_rows = _run_strategy(raw, row_fn, num_proc), len(raw)
        kept, length_info = _length_policy(examples, settings, label)
        info = {"split": what, "dataset": label, "rows": n_rows, "examples": len(examples),
                "kept": len(kept), **{k: v for k, v in length_info.items() if k not in ("kept", "dataset")}}
        summary = length_info.get("summary") or f"{label}: kept {len(kept)} of {len(examples)} examples"
        info["summary"] = f"{what}: {n_rows} rows -> {summary}"
        log.info(info["summary"])
        if not kept:
            log.warning("%s: every example of %s was removed (%s)", what, label, summary)
        per_dataset.append(kept)
        stats.append(info)
    return per_dataset, stats


def _example_key(example: Example) -> str:
    return hashlib.sha1(json.dumps(example, sort_keys=True, default=str).encode()).hexdigest()


def deduplicate(examples: list[Example], seen: set[str] | None = None) -> tuple[list[Example], int]:
    """Drop exact duplicates (and anything already in `seen`), keeping first occurrences."""
    seen = set() if seen is None else seen
    out = []
    for ex in examples:
        key = _example_key(ex)
        if key in seen:
            continue
        seen.add(key)
        out.append(ex)
    return out, len(examples) - len(out)


def split_validation(examples: list[Example], val_set_size: float | int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): `val_set_size` rows (a whole number) or that fraction (< 1), chosen with `seed`."""
    n = len(examples)
    if isinstance(val_set_size, float) and val_set_size < 1:
        n_eval = math.ceil(val_set_size * n)
    else:
        n_eval = int(val_set_size)
    if n_eval >= n:
        raise DataError(f"val_set_size={val_set_size} takes {n_eval} of the {n} prepared examples, "
                        "leaving none to train on")
    chosen = set(random.Random(seed).sample(range(n), n_eval))
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    evals = [ex for i, ex in enumerate(examples) if i in chosen]
    return train, evals


def examples_to_dataset(examples: list[Example]):
    """A `datasets.Dataset` with one column per key in any example (missing values are None)."""
    import datasets

    keys: dict[str, None] = {}
    for ex in examples:
        keys.update(dict.fromkeys(ex))
    return datasets.Dataset.from_dict({k: [ex.get(k) for ex in examples] for k in keys})


def _empty_error(what: str, stats: list[dict]) -> DataError:
    detail = "; ".join(s["summary"] for s in stats) or "no datasets"
    return DataError(f"the {what} set is empty after preparation: {detail}")


def _build(spec: DataSpec, tokenizer) -> tuple[list[Example], list[Example] | None, list[dict]]:
    settings, seed = spec.settings, spec.settings.seed
    if not spec.datasets:
        raise DataError("the config has no `datasets:` to prepare")
    common = dict(config_dict=dict(spec.transform_cfg), num_proc=spec.dataset_num_proc or os.cpu_count() or 1,
                  seed=seed, shuffle_each=spec.shuffle_before_merging_datasets, iterable=spec.preprocess_iterable)
    per_train, stats = _prepare_entries(list(spec.datasets), spec.kind, tokenizer, settings, what="train", **common)
    train = [ex for part in per_train for ex in part]
    evals: list[Example] | None = None
    if spec.test_datasets:
        eval_settings = replace(settings, sequence_len=spec.eval_sequence_len or settings.sequence_len)
        per_eval, eval_stats = _prepare_entries(list(spec.test_datasets), spec.kind, tokenizer, eval_settings,
                                                what="eval", **common)
        stats += eval_stats
        evals = [ex for part in per_eval for ex in part]
    if not train:
        raise _empty_error("train", stats)
    if spec.dataset_exact_deduplication:
        train, removed = deduplicate(train)
        stats.append({"split": "train", "dataset": "(merged)", "duplicates_removed": removed,
                      "summary": f"train: removed {removed} exact duplicates"})
        if evals is not None:
            evals, removed = deduplicate(evals, seen={_example_key(ex) for ex in train})
            stats.append({"split": "eval", "dataset": "(merged)", "duplicates_removed": removed,
                          "summary": f"eval: removed {removed} exact duplicates (or copies of train rows)"})
    if spec.shuffle_merged_datasets:
        random.Random(seed).shuffle(train)
        if evals is not None:
            random.Random(seed + 1).shuffle(evals)
    if spec.dataset_shard_num:
        n, idx = spec.dataset_shard_num, spec.dataset_shard_idx
        size, extra = divmod(len(train), n)
        lo = idx * size + min(idx, extra)
        train = train[lo: lo + size + (1 if idx < extra else 0)]
    if spec.val_set_size and evals is None:
        train, evals = split_validation(train, spec.val_set_size, seed)
    if not train:
        raise _empty_error("train", stats)
    if evals is not None and not evals:
        raise _empty_error("eval", stats)
    return train, evals, stats


def prepare_datasets(spec: DataSpec, tokenizer) -> PreparedData:
    """Load, tokenise, filter, merge and split every dataset of `spec`, through the cache.

    With `dataset_prepared_path` set, a complete cache folder for the same hash is reused; without
    it, `./last_run_prepared/<hash>` is rewritten. `skip_prepare_dataset` prepares in memory and
    neither reads nor writes the cache. `preprocess_iterable` (`preprocess --iterable`) reads the raw
    rows as a stream instead of loading each dataset whole; the examples, and so the cache key, are
    the same. A streamed train set (`streaming: true`, `pretraining_dataset`) is refused: see
    `backends.streaming`.
    """
    import datasets  # here, not at the top: importing backends stays cheap (the GPU image has no datasets)

    if is_streaming(spec):
        check_streaming(spec)  # a streamed DPO/KTO/... config: say that streams are SFT-only
        raise DataError(
            "this config streams its train set (streaming: true or pretraining_dataset), which is tokenised "
            "on the fly during training and never prepared: iterate backends.streaming.stream_train_steps "
            "(or stream_micro_batches) for training and use backends.streaming.prepare_eval_datasets for "
            "test_datasets"
        )
    fingerprint = prepared_fingerprint(spec, tokenizer)
    if spec.skip_prepare_dataset:
        train, evals, stats = _build(spec, tokenizer)
        return PreparedData(examples_to_dataset(train), examples_to_dataset(evals) if evals is not None else None,
                            fingerprint, None, stats)
    target = cache_folder(spec, fingerprint)
    cached = read_cache(target) if spec.dataset_prepared_path else None
    if cached is not None:
        train, evals, stats = cached
        log.info("reusing prepared data from %s (%d train, %d eval examples)", target, len(train),
                 len(evals) if evals is not None else 0)
        return PreparedData(train, evals, fingerprint, target, stats, from_cache=True)

    train_rows, eval_rows, stats = _build(spec, tokenizer)
    train = examples_to_dataset(train_rows)
    evals = examples_to_dataset(eval_rows) if eval_rows is not None else None
    write_cache(target, train, evals, {"fingerprint": fingerprint, "format": CACHE_FORMAT, "stats": stats,
                                       "train": len(train), "eval": len(evals) if evals is not None else 0})
    train = datasets.load_from_disk(str(target / "train"))
    evals = datasets.load_from_disk(str(target / "eval")) if evals is not None else None
    return PreparedData(train, evals, fingerprint, target, stats)
