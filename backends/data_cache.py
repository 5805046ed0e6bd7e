"""The prepared-data cache: its key (a hash of everything that changes the examples) and its folder.

The cache lives in `dataset_prepared_path/<hash>` (default `./last_run_prepared`, which is then
rewritten every run, as axolotl does). The hash covers the tokenizer (vocab, added and special
tokens, chat template), each dataset's options and file contents (size+mtime for large files),
and every setting that changes tokenisation, masking, filtering, splitting or order. Strategy code
is not hashed (the docs say so): delete the folder after changing a prompt strategy.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from backends.atomic import atomic_folder
from backends.data_sources import entry_data_files, hub_snapshot, looks_like_hub_id
from backends.data_spec import DataSpec


DEFAULT_PREPARED_PATH = "last_run_prepared"
# Bump when the cached layout or the preparation order changes.
CACHE_FORMAT = "puretune-prepared-v1"
# Files up to this size are hashed by content, larger ones by size and mtime.
CONTENT_HASH_LIMIT = 64 * 1024 * 1024


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
    if not local.exists() and looks_like_hub_id(path):
        local = hub_snapshot(entry) or local
    if local.is_file():
        return [local]
    if local.is_dir():
        files = entry_data_files(entry, local) if entry.get("data_files") else []
        if files:
            return files
        return sorted(p for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return []


def dataset_fingerprint(entry: Mapping) -> str:
    """The hash of one entry: every option the user wrote plus its files' identity."""
    return _sha({"entry": dict(entry), "files": [file_fingerprint(f) for f in _source_files(entry)]})


def prepared_fingerprint(spec: DataSpec, tokenizer) -> str:
    """The cache key of `prepare_datasets(spec, tokenizer)`."""
    return _sha({
        "format": CACHE_FORMAT,
        "kind": spec.kind,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": asdict(spec.settings),
        "eval_sequence_len": spec.eval_sequence_len,
        "datasets": [dataset_fingerprint(e) for e in spec.datasets],
        "test_datasets": [dataset_fingerprint(e) for e in spec.test_datasets],
        "val_set_size": spec.val_set_size,
        "shuffle_merged_datasets": spec.shuffle_merged_datasets,
        "shuffle_before_merging_datasets": spec.shuffle_before_merging_datasets,
        "dataset_exact_deduplication": spec.dataset_exact_deduplication,
        "dataset_shard": [spec.dataset_shard_num, spec.dataset_shard_idx],
        "seed": spec.settings.seed,
    })[:32]


def cache_folder(spec: DataSpec, fingerprint: str) -> Path:
    """Where the examples of `fingerprint` are cached."""
    return Path(spec.dataset_prepared_path or DEFAULT_PREPARED_PATH).expanduser() / fingerprint


def read_cache(target: Path) -> tuple[Any, Any | None, list[dict]] | None:
    """(train, eval or None, stats) of a complete cache folder, None when there is none."""
    import datasets  # here, not at the top: importing backends stays cheap (the GPU image has no datasets)

    if not (target / "meta.json").is_file():
        return None
    meta = json.loads((target / "meta.json").read_text())
    train = datasets.load_from_disk(str(target / "train"))
    evals = datasets.load_from_disk(str(target / "eval")) if (target / "eval").is_dir() else None
    return train, evals, meta.get("stats", [])


def write_cache(target: Path, train, evals, meta: dict) -> None:
    """Save train (and eval) and meta.json into `target` through `backends.atomic.atomic_folder`, so
    a reader never sees it half-written and a crash keeps the previous cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target) as tmp:
        train.save_to_disk(str(tmp / "train"))
        if evals is not None:
            evals.save_to_disk(str(tmp / "eval"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
