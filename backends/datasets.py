"""Datasets in, prepared examples out: loading through HF `datasets`, the prompt strategy per row,
the length policy, merge/shuffle/dedup, the validation split, and the hashed on-disk cache.

    tokenizer = load_tokenizer(config.tokenizer_config or config.base_model)
    added = prepare_tokenizer(tokenizer, config)
    data = prepare_datasets(config, tokenizer)      # data.train, data.eval: datasets.Dataset

Every `datasets:` entry mirrors `datasets.load_dataset`: `path` (a local file or folder, or a Hub id
found in the local HF cache: nothing is downloaded), `name`, `data_files`, `split` with slicing
(`train[:10%]`, `train[100:200]`), `revision`, `ds_type` (from the extension when absent),
`shards`/`shards_idx`. A `save_to_disk` folder loads with `load_from_disk`.

The cache lives in `dataset_prepared_path/<hash>` (default `./last_run_prepared`, which is then
rewritten every run, as axolotl does). The hash covers the tokenizer (vocab, added and special
tokens, chat template), each dataset's options and file contents (size+mtime for large files),
and every setting that changes tokenisation, masking, filtering, splitting or order. Strategy code
is not hashed (the docs say so): delete the folder after changing a prompt strategy.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from backends.templates import read_jinja
from backends.user_code import entry_strategy
from pure.data.registry import accepts_keyword
from pure.data.settings import DataError, DataSettings, Example

log = logging.getLogger("puretune.data")

DEFAULT_PREPARED_PATH = "last_run_prepared"
# Bump when the cached layout or the preparation order changes.
CACHE_FORMAT = "puretune-prepared-v1"
# Files up to this size are hashed by content, larger ones by size and mtime.
CONTENT_HASH_LIMIT = 64 * 1024 * 1024
EXTENSION_TYPES = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
    ".arrow": "arrow", ".txt": "text",
}
REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "adl://", "abfs://", "az://", "oci://", "http://", "https://")
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


# ---------------------------------------------------------------------------------------------
# Loading one entry
# ---------------------------------------------------------------------------------------------

_SPLIT_RE = re.compile(r"^\s*([\w.\-]+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def pick_split(loaded, entry: dict, split_name: str):
    """The split `split_name` of a loaded dataset dict (map-style or streamed), or the dataset itself
    when it is not a dict; a dict with one split serves any split name the entry did not set."""
    import datasets

    if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict, dict)):
        return loaded
    if split_name in loaded:
        return loaded[split_name]
    if len(loaded) == 1 and not entry.get("split"):
        return next(iter(loaded.values()))
    raise DataError(f"dataset {str(entry.get('path'))!r} has no split {split_name!r}; it has {', '.join(loaded)}")


def parse_split(spec: str) -> tuple[str, str | None, str | None]:
    """`train[10%:50%]` -> ("train", "10%", "50%"); `test` -> ("test", None, None)."""
    match = _SPLIT_RE.match(spec or "train")
    if not match:
        raise DataError(f"split {spec!r}: expected NAME, NAME[start:stop] or NAME[a%:b%]")
    return match.group(1), match.group(2), match.group(3)


def _bound(value: str | None, n: int, default: int) -> int:
    if value is None:
        return default
    if value.endswith("%"):
        index = int(round(n * int(value[:-1]) / 100))  # datasets' default "closest" rounding
    else:
        index = int(value)
    return index if index >= 0 else n + index


def slice_split(dataset, start: str | None, stop: str | None):
    """Rows [start:stop) of a Dataset, bounds as row counts or percentages (negative from the end)."""
    if start is None and stop is None:
        return dataset
    n = len(dataset)
    lo = max(0, min(n, _bound(start, n, 0)))
    hi = max(0, min(n, _bound(stop, n, n)))
    return dataset.select(range(lo, max(lo, hi)))


def _is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES)


def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", path)) and not path.startswith(".") and Path(path).suffix not in EXTENSION_TYPES


def _ds_type(entry: Mapping, files: list[Path]) -> str:
    if entry.get("ds_type"):
        ds_type = str(entry["ds_type"])
        return "json" if ds_type == "jsonl" else ds_type
    for f in files:
        if f.suffix.lower() in EXTENSION_TYPES:
            return EXTENSION_TYPES[f.suffix.lower()]
    names = ", ".join(str(f) for f in files[:3])
    raise DataError(
        f"cannot tell the format of {names}: set ds_type (json, csv, parquet or arrow) on the dataset entry"
    )


def _data_files(entry: Mapping, root: Path) -> list[Path]:
    files = entry.get("data_files")
    if files is None:
        return []
    files = [files] if isinstance(files, str) else list(files)
    out = []
    for f in files:
        p = Path(f).expanduser()
        if not p.is_absolute():
            p = root / p if (root / p).exists() or not p.exists() else p
        if not p.exists():
            raise DataError(f"data file {f!r} of dataset {entry.get('path')!r} does not exist (looked at {p})")
        out.append(p)
    return out


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def find_json_error(path: Path) -> DataError | None:
    """The first malformed line of a JSON / JSON-lines file, as a DataError naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        return DataError(f"{path}: line {line}: not valid UTF-8 text")
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON document
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return DataError(f"{path}: line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}")
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            try:  # a single pretty-printed object is valid too
                json.loads(text)
                return None
            except json.JSONDecodeError:
                pass
            return DataError(f"{path}: line {number}: invalid JSON ({err.msg} at column {err.colno}): {line[:80]!r}")
        if not isinstance(value, dict):
            return DataError(f"{path}: line {number}: expected a JSON object per line, got {type(value).__name__}")
    return None


def _load_files(ds_type: str, files: list[Path], entry: Mapping):
    import datasets

    try:
        return datasets.load_dataset(ds_type, data_files=[str(f) for f in files], split=None)
    except Exception as err:  # datasets wraps parse errors in its own exception types
        if ds_type == "json":
            for f in files:
                found = find_json_error(f)
                if found is not None:
                    raise found from None
        cause = err.__cause__ or err
        raise DataError(
            f"could not load {', '.join(str(f) for f in files)} as {ds_type}: {type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else ''}"
        ) from None


def local_data_files(entry: Mapping, path: Path) -> list[Path]:
    """The data files of a local folder entry: `data_files`, else every data file under it (of `ds_type`)."""
    files = _data_files(entry, path)
    if files:
        return files
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSION_TYPES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if entry.get("ds_type"):
        wanted = _ds_type(entry, [])
        files = [f for f in files if EXTENSION_TYPES[f.suffix.lower()] == wanted] or files
    if not files:
        raise DataError(f"dataset folder {path} holds no .json/.jsonl/.csv/.parquet/.arrow files "
                        "and is not a save_to_disk folder")
    if not entry.get("ds_type"):
        kinds = {EXTENSION_TYPES[f.suffix.lower()] for f in files}
        if len(kinds) > 1:
            raise DataError(f"dataset folder {path} mixes formats ({', '.join(sorted(kinds))}); "
                            "set ds_type or data_files")
    return files


def _load_local(entry: Mapping, path: Path):
    import datasets

    if path.is_file():
        return _load_files(_ds_type(entry, [path]), [path], entry)
    if _is_saved_dataset(path) and not entry.get("data_files"):
        try:
            return datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(f"could not load the saved dataset folder {path}: {err}") from None
    files = local_data_files(entry, path)
    return _load_files(_ds_type(entry, files), files, entry)


def hub_snapshot(entry: Mapping) -> Path | None:
    """The local HF cache folder of a Hub dataset id, or None when it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=str(entry["path"]), repo_type="dataset", revision=entry.get("revision"),
            local_files_only=True,
        )
        return Path(folder)
    except Exception:
        return None


def _not_cached(entry: Mapping) -> DataError:
    path = entry.get("path")
    return DataError(
        f"dataset {path!r} is not in the local Hugging Face cache and puretune does not download "
        f"datasets. Download it where there is network access (e.g. `huggingface-cli download "
        f"{path} --repo-type dataset`), or save its rows to a file and point the entry at it: "
        f"`path: ./data/{str(path).split('/')[-1]}.jsonl`"
    )


def _load_hub(entry: Mapping):
    import datasets

    folder = hub_snapshot(entry)
    if folder is not None:
        if entry.get("data_files") or not entry.get("name"):
            try:
                return _load_local(entry, folder)
            except DataError:
                if entry.get("data_files"):
                    raise
        try:
            return datasets.load_dataset(str(folder), name=entry.get("name"))
        except Exception as err:
            raise DataError(f"could not load the cached dataset {entry['path']!r} from {folder}: {err}") from None
    # maybe `datasets` cached it as Arrow from an earlier load_dataset: ask it, offline
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(
            str(entry["path"]), name=entry.get("name"), revision=entry.get("revision"),
            data_files=entry.get("data_files"),
        )
    except Exception:
        raise _not_cached(entry) from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_dataset_entry(entry: Mapping[str, Any], *, default_split: str = "train"):
    """One `datasets:` entry as a `datasets.Dataset`: loaded, split picked and sliced, sharded."""
    path = entry.get("path")
    if not path:
        raise DataError("a dataset entry needs `path:` (a local file or folder, or a Hub dataset id)")
    path = str(path)
    if _is_remote(path):
        raise DataError(f"dataset {path!r}: remote paths (s3://, gs://, https://, ...) are not supported yet "
                        "by puretune; copy the file locally and point `path:` at it")
    local = Path(path).expanduser()
    if local.exists():
        loaded = _load_local(entry, local)
    elif _looks_like_hub_id(path):
        loaded = _load_hub(entry)
    else:
        raise DataError(f"dataset file {path!r} does not exist (relative paths start at {os.getcwd()})")

    split_spec = entry.get("split") or default_split
    split_name, start, stop = parse_split(split_spec)
    dataset = pick_split(loaded, entry, split_name)
    dataset = slice_split(dataset, start, stop)
    shards = entry.get("shards")
    if shards:
        index = entry.get("shards_idx") or 0
        dataset = dataset.shard(num_shards=int(shards), index=int(index), contiguous=True)
    if len(dataset) == 0:
        raise DataError(f"dataset {path!r} (split {split_spec!r}) has no rows")
    return dataset


# ---------------------------------------------------------------------------------------------
# The cache key
# ---------------------------------------------------------------------------------------------


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A content hash of everything in a tokenizer that changes token ids or the chat template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])).encode())
    added = {
        int(i): [t.content, t.special, t.lstrip, t.rstrip, t.normalized, t.single_word]
        for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
    }
    special = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()}
    extra = {
        "added": added, "special": special, "chat_template": getattr(tokenizer, "chat_template", None),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "add_bos": getattr(tokenizer, "add_bos_token", None), "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def file_fingerprint(path: Path) -> list:
    """[name, size, content sha256] for small files, [name, size, mtime_ns] for large ones."""
    stat = path.stat()
    if stat.st_size <= CONTENT_HASH_LIMIT:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return [str(path), stat.st_size, h.hexdigest()]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _source_files(entry: Mapping) -> list[Path]:
    path = str(entry.get("path") or "")
    local = Path(path).expanduser()
    if not local.exists() and _looks_like_hub_id(path):
        local = hub_snapshot(entry) or local
    if local.is_file():
        return [local]
    if local.is_dir():
        files = _data_files(entry, local) if entry.get("data_files") else []
        if files:
            return files
        return sorted(p for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return []


def dataset_fingerprint(entry: Mapping) -> str:
    """The hash of one entry: every option the user wrote plus its files' identity."""
    return _sha({"entry": dict(entry), "files": [file_fingerprint(f) for f in _source_files(entry)]})


def _entries(datasets_cfg) -> list[dict]:
    out = []
    for d in datasets_cfg or []:
        out.append(d.to_dict() if hasattr(d, "to_dict") else dict(d))
    return out


def prepared_fingerprint(config, tokenizer, settings: DataSettings | None = None) -> str:
    """The cache key of `prepare_datasets(config, tokenizer)`."""
    settings = settings or config.data_settings()
    return _sha({
        "format": CACHE_FORMAT,
        "kind": config.training_kind(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": asdict(settings),
        "eval_sequence_len": config.eval_sequence_len,
        "datasets": [dataset_fingerprint(e) for e in _entries(config.datasets)],
        "test_datasets": [dataset_fingerprint(e) for e in _entries(config.test_datasets)],
        "val_set_size": config.val_set_size,
        "shuffle_merged_datasets": config.shuffle_merged_datasets,
        "shuffle_before_merging_datasets": config.shuffle_before_merging_datasets,
        "dataset_exact_deduplication": config.dataset_exact_deduplication,
        "dataset_shard": [config.dataset_shard_num, config.dataset_shard_idx],
        "seed": settings.seed,
    })[:32]


# ---------------------------------------------------------------------------------------------
# Preparing
# ---------------------------------------------------------------------------------------------


def _dataset_label(entry: Mapping) -> str:
    label = str(entry.get("path"))
    if entry.get("name"):
        label += f" ({entry['name']})"
    if entry.get("split"):
        label += f" [{entry['split']}]"
    return label


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
    from pure.data.length import apply_length_policy

    kept, stats = apply_length_policy(examples, settings, label)
    info = asdict(stats) if hasattr(stats, "__dataclass_fields__") else dict(stats or {})
    if hasattr(stats, "summary"):
        info["summary"] = stats.summary()
    return kept, info


def _read_lazily(entry: dict, row_fn, shuffle: bool, seed: int) -> tuple[list[Example], int]:
    """`--iterable`: rows read as a stream (no Arrow copy of the raw data), strategy applied row by row;
    `shuffle` reorders the rows with the permutation `Dataset.shuffle(seed=seed)` would use, so the
    examples equal the non-iterable path's."""
    import numpy as np

    from backends.streaming import _load_streaming_entry, iter_rows

    stream, files = _load_streaming_entry(entry)
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
        label = _dataset_label(entry)
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


def _build(config, tokenizer, settings: DataSettings) -> tuple[list[Example], list[Example] | None, list[dict]]:
    kind = config.training_kind()
    seed = settings.seed
    num_proc = config.dataset_num_proc or os.cpu_count() or 1
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    train_entries = _entries(config.datasets)
    if not train_entries:
        raise DataError("the config has no `datasets:` to prepare")
    common = dict(config_dict=config_dict, num_proc=num_proc, seed=seed,
                  shuffle_each=bool(config.shuffle_before_merging_datasets),
                  iterable=bool(getattr(config, "preprocess_iterable", False)))
    per_train, stats = _prepare_entries(train_entries, kind, tokenizer, settings, what="train", **common)
    train = [ex for part in per_train for ex in part]
    evals: list[Example] | None = None
    if config.test_datasets:
        eval_settings = replace(settings, sequence_len=config.eval_sequence_len or settings.sequence_len)
        per_eval, eval_stats = _prepare_entries(_entries(config.test_datasets), kind, tokenizer, eval_settings,
                                                what="eval", **common)
        stats += eval_stats
        evals = [ex for part in per_eval for ex in part]
    if not train:
        raise _empty_error("train", stats)
    if config.dataset_exact_deduplication:
        train, removed = deduplicate(train)
        stats.append({"split": "train", "dataset": "(merged)", "duplicates_removed": removed,
                      "summary": f"train: removed {removed} exact duplicates"})
        if evals is not None:
            evals, removed = deduplicate(evals, seen={_example_key(ex) for ex in train})
            stats.append({"split": "eval", "dataset": "(merged)", "duplicates_removed": removed,
                          "summary": f"eval: removed {removed} exact duplicates (or copies of train rows)"})
    if config.shuffle_merged_datasets:
        random.Random(seed).shuffle(train)
        if evals is not None:
            random.Random(seed + 1).shuffle(evals)
    if config.dataset_shard_num:
        n, idx = config.dataset_shard_num, config.dataset_shard_idx or 0
        size, extra = divmod(len(train), n)
        lo = idx * size + min(idx, extra)
        train = train[lo: lo + size + (1 if idx < extra else 0)]
    if config.val_set_size and evals is None:
        train, evals = split_validation(train, config.val_set_size, seed)
    if not train:
        raise _empty_error("train", stats)
    if evals is not None and not evals:
        raise _empty_error("eval", stats)
    return train, evals, stats


def prepare_datasets(config, tokenizer, *, settings: DataSettings | None = None) -> PreparedData:
    """Load, tokenise, filter, merge and split every dataset of `config`, through the cache.

    `config` is a `programs.config.Config` (anything with its attributes, `data_settings()` and
    `training_kind()`). With `dataset_prepared_path` set, a complete cache folder for the same
    hash is reused; without it, `./last_run_prepared/<hash>` is rewritten. `skip_prepare_dataset`
    prepares in memory and neither reads nor writes the cache. `preprocess_iterable` (`preprocess
    --iterable`) reads the raw rows as a stream instead of loading each dataset whole; the examples,
    and so the cache key, are the same. A streamed config (`streaming: true`, `pretraining_dataset`)
    is refused: see `backends.streaming`.
    """
    import datasets

    from backends.streaming import check_streaming_config, is_streaming

    if is_streaming(config):
        check_streaming_config(config)  # a streamed DPO/KTO/... config: say that streams are SFT-only
        raise DataError(
            "this config streams its train set (streaming: true or pretraining_dataset), which is tokenised "
            "on the fly during training and never prepared: iterate backends.streaming.stream_train_steps "
            "(or stream_micro_batches) for training and use backends.streaming.prepare_eval_datasets for "
            "test_datasets"
        )
    settings = settings or config.data_settings()
    fingerprint = prepared_fingerprint(config, tokenizer, settings)
    if config.skip_prepare_dataset:
        train, evals, stats = _build(config, tokenizer, settings)
        return PreparedData(examples_to_dataset(train), examples_to_dataset(evals) if evals is not None else None,
                            fingerprint, None, stats)
    root = Path(config.dataset_prepared_path or DEFAULT_PREPARED_PATH).expanduser()
    target = root / fingerprint
    if config.dataset_prepared_path and (target / "meta.json").is_file():
        meta = json.loads((target / "meta.json").read_text())
        train = datasets.load_from_disk(str(target / "train"))
        evals = datasets.load_from_disk(str(target / "eval")) if (target / "eval").is_dir() else None
        log.info("reusing prepared data from %s (%d train, %d eval examples)", target, len(train),
                 len(evals) if evals is not None else 0)
        return PreparedData(train, evals, fingerprint, target, meta.get("stats", []), from_cache=True)

    train_rows, eval_rows, stats = _build(config, tokenizer, settings)
    train = examples_to_dataset(train_rows)
    evals = examples_to_dataset(eval_rows) if eval_rows is not None else None
    _write_cache(target, train, evals, {"fingerprint": fingerprint, "format": CACHE_FORMAT, "stats": stats,
                                        "train": len(train), "eval": len(evals) if evals is not None else 0})
    train = datasets.load_from_disk(str(target / "train"))
    evals = datasets.load_from_disk(str(target / "eval")) if evals is not None else None
    return PreparedData(train, evals, fingerprint, target, stats)


def _write_cache(target: Path, train, evals, meta: dict) -> None:
    """Write into a temporary sibling folder, then rename it into place (never half-written)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        train.save_to_disk(str(tmp / "train"))
        if evals is not None:
            evals.save_to_disk(str(tmp / "eval"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer set-up
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _get(config, key: str):
    value = getattr(config, key, None) if not isinstance(config, Mapping) else config.get(key)
    return value


def prepare_tokenizer(tokenizer, config) -> int:
    """Apply `special_tokens`, `tokens` and `added_tokens_overrides`; make sure a pad token exists;
    write the global `chat_template` / `chat_template_jinja` into `tokenizer.chat_template`.

    Returns how many tokens were added to the vocabulary (the model side resizes its embeddings
    when this is > 0). A missing pad token becomes the EOS token, which adds nothing. The template
    goes into the tokenizer so that everything downstream (inference, the exported tokenizer's
    `chat_template.jinja`) formats chats exactly as training did; as in axolotl, a dataset's own
    `chat_template` still wins for that dataset's rows.
    """
    before = len(tokenizer)
    apply_chat_template_choice(tokenizer, config)
    overrides = _get(config, "added_tokens_overrides")
    if overrides:
        _override_added_tokens(tokenizer, {int(k): str(v) for k, v in dict(overrides).items()})
    special = _get(config, "special_tokens")
    if special is not None:
        special = special.model_dump(exclude_none=True) if hasattr(special, "model_dump") else dict(special)
        updates = {k: special[k] for k in SPECIAL_TOKEN_KEYS if special.get(k) and getattr(tokenizer, k, None) != special[k]}
        if updates:
            tokenizer.add_special_tokens(updates)
        extra = [t for t in special.get("additional_special_tokens") or [] if t not in tokenizer.get_vocab()]
        if extra:
            keep_old = ("replace_extra_special_tokens" if accepts_keyword(tokenizer.add_special_tokens, "replace_extra_special_tokens")
                        else "replace_additional_special_tokens")  # transformers 5 / 4 spelling
            tokenizer.add_special_tokens({"additional_special_tokens": extra}, **{keep_old: False})
    tokens = _get(config, "tokens")
    if tokens:
        vocab = tokenizer.get_vocab()
        new = [t for t in tokens if t not in vocab]
        if new:
            tokenizer.add_tokens(new)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token; set special_tokens.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return len(tokenizer) - before


def apply_chat_template_choice(tokenizer, config) -> str | None:
    """Set `tokenizer.chat_template` from the config's global `chat_template` (+ `chat_template_jinja`).

    Nothing changes when neither is set; `tokenizer_default` keeps the tokenizer's own template (and
    fails when it has none). Returns the template now in the tokenizer, or None when untouched.
    """
    from pure.data.templates import resolve_chat_template

    name, jinja = _get(config, "chat_template"), _get(config, "chat_template_jinja")
    if not name and not jinja:
        return None
    try:
        jinja = read_jinja(jinja, "chat_template_jinja") if jinja else None
    except ValueError as err:
        raise DataError(str(err)) from None
    template = resolve_chat_template(name, tokenizer, jinja)
    tokenizer.chat_template = template
    return template


def _override_added_tokens(tokenizer, overrides: dict[int, str]) -> None:
    """Rename reserved added tokens in place (`added_tokens_overrides: {id: new_text}`)."""
    from tokenizers import Tokenizer

    added = getattr(tokenizer, "added_tokens_decoder", {})
    for token_id in overrides:
        if token_id not in added:
            raise DataError(f"added_tokens_overrides: token id {token_id} is not an added token of this "
                            f"tokenizer (added ids: {sorted(added)[:10]}...)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError("added_tokens_overrides needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    old_names = {}
    for token in spec.get("added_tokens", []):
        if token["id"] in overrides:
            old_names[token["content"]] = overrides[token["id"]]
            token["content"] = overrides[token["id"]]
    vocab = spec.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        for old, new in old_names.items():
            if old in vocab:
                vocab[new] = vocab.pop(old)
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    for attr in SPECIAL_TOKEN_KEYS:
        value = getattr(tokenizer, attr, None)
        if value in old_names:
            setattr(tokenizer, attr, old_names[value])
