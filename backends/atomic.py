"""Atomic, durable writes: a reader sees the previous version or the complete new one, never a
half-written one, and after a power cut the name points at complete data.

- `atomic_folder(target)`: a whole folder (a checkpoint, an HF model) is built in a temporary
  sibling, fsynced, and swapped into place; a failed swap puts the previous folder back.
- `atomic_files(target)`: files are built in a hidden temporary folder inside `target` and each
  replaces its namesake there; `target` may hold other files (a run's output_dir).
- `atomic_write(path, data)`: one file.

Durability needs an fsync of every file, of the folder that holds them, and of the parent whose
entry the rename changed: a rename is only as durable as the directory it is recorded in.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# mkdtemp creates 0700; a saved model or checkpoint is shared like a folder made by mkdir.
_FOLDER_MODE = 0o755


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and folder under `path`, then `path` itself."""
    path = Path(path)
    for entry in path.rglob("*"):
        if entry.is_file():
            with open(entry, "rb") as fh:
                os.fsync(fh.fileno())
        elif entry.is_dir():
            _fsync_dir(entry)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows) have no directory fsync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_folder(parent: Path, name: str) -> Path:
    """A fresh hidden folder in `parent`: on the same file system as its destination, so the
    final rename is atomic (a rename across file systems is a copy)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    os.chmod(tmp, _FOLDER_MODE)
    return tmp


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; when the block succeeds, its files and
    folders are fsynced, it is renamed to `target` (an existing `target` is swapped out, and put
    back if the rename fails) and the parent is fsynced. When the block raises, nothing at
    `target` changes. The temporary folder never outlives the block."""
    target = Path(target)
    tmp = _temporary_folder(target.parent, target.name)
    try:
        yield tmp
        fsync_tree(tmp)
        swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(new: Path, target: Path) -> None:
    """Put the folder `new` at `target` by renames (the previous `target` moved aside to `<new>.old`
    and removed once `new` is in place, or put back if that fails), then fsync their parent."""
    if not target.exists():
        os.rename(new, target)
    else:
        old = new.with_name(f"{new.name}.old")  # unique: `new` is a fresh mkdtemp name
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


@contextmanager
def atomic_files(target: str | os.PathLike, *, last: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder inside the folder `target`; when the block succeeds,
    each file written into it is fsynced and replaces its namesake in `target` by one rename
    (the file named `last` after all others, so a reader that waits for it finds the rest), and
    `target` is fsynced. Other files of `target` stay. Each file is old or new, never
    half-written; the set of files is not swapped as one. When the block raises, `target` is
    untouched."""
    target = Path(target)
    tmp = _temporary_folder(target, "files")
    try:
        yield tmp
        files = sorted(tmp.iterdir(), key=lambda f: f.name == last)
        folders = [f.name for f in files if f.is_dir()]
        if folders:
            raise IsADirectoryError(f"atomic_files: {folders} in {target} are folders; only files are moved "
                                    "one by one (a whole folder is written with atomic_folder)")
        for file in files:
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(file, target / file.name)
        _fsync_dir(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to the file `path` atomically and durably. Returns `path`."""
    path = Path(path)
    with atomic_files(path.parent) as tmp:
        (tmp / path.name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path
