"""backends/atomic.py: a folder or file is the previous one or the complete new one, durably."""
import os
from pathlib import Path

import pytest

from backends.atomic import atomic_files, atomic_folder, atomic_write, fsync_tree


def make_folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path: Path) -> dict[str, str]:
    return {f.name: f.read_text() for f in sorted(path.iterdir())}


def test_a_write_replaces_the_folder_and_leaves_no_temporaries(tmp_path):
    target = make_folder(tmp_path / "model", {"weights": "old", "stale.txt": "from the previous save"})
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "weights").write_text("new")
    assert contents(target) == {"weights": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert target.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


@pytest.mark.parametrize("writer", [atomic_folder, atomic_files])
def test_a_failing_write_leaves_the_previous_folder_intact(tmp_path, writer):
    target = make_folder(tmp_path / "model", {"weights": "old"})
    with pytest.raises(KeyboardInterrupt):
        with writer(target) as tmp:
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt("killed mid-save")
    assert contents(target) == {"weights": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failing_first_write_creates_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out" / "model") as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failed_swap_restores_the_previous_folder(tmp_path, monkeypatch):
    target = make_folder(tmp_path / "model", {"weights": "old"})
    rename = os.rename

    def fail_on_the_new_folder(src, dst):
        if Path(dst) == target and ".tmp-" in Path(src).name and not Path(src).name.endswith(".old"):
            raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_on_the_new_folder)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_folder(target) as tmp:
            (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert contents(target) == {"weights": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def fsynced_paths(monkeypatch) -> list[Path]:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced file descriptors")
    seen: list[Path] = []
    fsync = os.fsync

    def record(fd):
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def test_a_folder_write_fsyncs_every_file_the_folder_and_the_parent(tmp_path, monkeypatch):
    seen = fsynced_paths(monkeypatch)
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a").write_text("a")
        (tmp / "b").write_text("b")
    # The files were fsynced under the temporary name, before the rename made them visible.
    names = {p.relative_to(tmp_path).as_posix().replace(tmp.name, "<tmp>") for p in seen}
    assert names == {"<tmp>", "<tmp>/sub", "<tmp>/sub/a", "<tmp>/b", "."}


def test_fsync_tree_fsyncs_nested_files_and_folders(tmp_path, monkeypatch):
    make_folder(tmp_path / "x" / "y", {"f": "1"})
    (tmp_path / "x" / "g").write_text("2")
    seen = fsynced_paths(monkeypatch)
    fsync_tree(tmp_path / "x")
    assert {p.relative_to(tmp_path).as_posix() for p in seen} == {"x", "x/y", "x/y/f", "x/g"}


def test_atomic_files_replace_namesakes_keep_other_files_and_move_last_last(tmp_path, monkeypatch):
    target = make_folder(tmp_path / "run", {"config.json": "old", "checkpoint.txt": "keep"})
    order = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(Path(dst).name), replace(src, dst)))
    with atomic_files(target, last="config.json") as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "weights").write_text("w")
        (tmp / "vocab").write_text("v")
    assert contents(target) == {"checkpoint.txt": "keep", "config.json": "new", "vocab": "v", "weights": "w"}
    assert order[-1] == "config.json" and sorted(order) == ["config.json", "vocab", "weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_files_refuse_a_folder_before_moving_any_file(tmp_path):
    target = make_folder(tmp_path / "run", {"config.json": "old"})
    with pytest.raises(IsADirectoryError, match="sub"):
        with atomic_files(target) as tmp:
            (tmp / "config.json").write_text("new")
            (tmp / "sub").mkdir()
    assert contents(target) == {"config.json": "old"}


def test_atomic_write_writes_text_and_bytes_and_a_failed_replace_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out" / "config.yaml"
    atomic_write(path, "a: 1\n")
    assert path.read_text() == "a: 1\n"
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"

    def fail(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write(path, "a: 2\n")
    monkeypatch.undo()
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
