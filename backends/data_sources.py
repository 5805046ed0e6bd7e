"""Where a dataset entry's rows come from: local files and folders, `save_to_disk` folders and Hub
datasets already in the local HF cache (nothing is downloaded), read whole or as a stream.

    dataset = load_dataset_entry({"path": "data.jsonl", "split": "train[:10%]"})   # datasets.Dataset
    stream, files = stream_dataset_entry({"path": "data.jsonl"})                   # IterableDataset
    for row in iter_rows(stream, entry, files): ...

Every entry mirrors `datasets.load_dataset`: `path` (a local file or folder, or a Hub id found in
the local HF cache), `name`, `data_files`, `split` with slicing (`train[:10%]`, `train[100:200]`),
`revision`, `ds_type` (from the extension when absent), `shards`/`shards_idx`. A malformed JSON
line surfaces as a DataError naming the file and line.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from pure.data.settings import DataError

# `datasets` is imported inside the loaders: importing this module stays cheap (and works on the GPU
# image, which has no `datasets`).
EXTENSION_TYPES = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
    ".arrow": "arrow", ".txt": "text",
}
REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "adl://", "abfs://", "az://", "oci://", "http://", "https://")


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


def looks_like_hub_id(path: str) -> bool:
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


def entry_data_files(entry: Mapping, root: Path) -> list[Path]:
    """The entry's `data_files`, relative ones found under `root`; [] when it names none."""
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
    files = entry_data_files(entry, path)
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


def _not_cached_error(entry: Mapping) -> DataError:
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
        raise _not_cached_error(entry) from None
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
    elif looks_like_hub_id(path):
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


def dataset_label(entry: Mapping) -> str:
    """`path (name) [split]`: how logs and stats name an entry."""
    label = str(entry.get("path"))
    if entry.get("name"):
        label += f" ({entry['name']})"
    if entry.get("split"):
        label += f" [{entry['split']}]"
    return label


# ---------------------------------------------------------------------------------------------
# Streaming one entry (rows read lazily)
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


def stream_dataset_entry(entry: Mapping[str, Any], default_split: str = "train") -> tuple[Any, list[Path]]:
    """One entry as (a `datasets.IterableDataset`, the data files it reads), split picked and sliced.

    Slices must be row counts (`train[100:200]`): a percentage needs the length of the stream.
    """
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
    elif looks_like_hub_id(path):
        folder = hub_snapshot(entry)
        if folder is None:
            raise _not_cached_error(entry)
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

