"""Checkpoints of the whole `TrainState`: tensors as safetensors, the rest as JSON, written atomically.

A checkpoint is `output_dir/checkpoint-<step>/` with `state.safetensors` (trainable params,
optimizer state, RNG key, fp16 loss scaler, keyed by their pytree paths; a program's `carry` under
`carry/<name>`, restored as saved) and `state.json` (step, data cursor, the
tensor paths, anything extra). It is written into a temporary folder, fsynced, then renamed into
place: a kill during a save leaves the previous checkpoint as the latest one, never a broken one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from backends.atomic import atomic_folder
from pure.train import TrainState
from pure.tree import leaves_with_paths, replace_leaves, tree_leaves

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint's files


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be restored into the expected state."""


def _flatten(tree) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, values = {}, {}
    for name, leaf in leaves_with_paths(tree, none_is_leaf=True):
        if isinstance(leaf, torch.Tensor):
            tensors[name] = leaf.detach().contiguous().cpu()
        else:
            values[name] = leaf
    return tensors, values


CARRY = "carry"  # the state field restored as saved (its structure is not the template's)


def state_tree(state: TrainState) -> dict:
    """Every field of the state by name but `carry`: its tensor leaves go to the safetensors file,
    the other leaves (step, data cursor, hyperparameters in the optimizer state) to `values` in the JSON."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != CARRY}


def split_carry(carry: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`state.carry`'s tensors under `carry/<name>` in the safetensors file, its other values for the JSON."""
    bad = [k for k in carry if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"state.carry must be a flat dict with string names; got keys {bad[:3]}")
    tensors = {f"{CARRY}/{k}": v.detach().contiguous().cpu() for k, v in carry.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in carry.items() if not isinstance(v, torch.Tensor)}


def save_checkpoint(state: TrainState, output_dir: str | os.PathLike, extra: dict | None = None,
                    total_limit: int | None = None) -> Path:
    """Write `checkpoint-<step>` atomically and prune the oldest beyond `total_limit`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"checkpoint-{state.step}"
    tensors, values = _flatten(state_tree(state))
    carry_tensors, carry_values = split_carry(state.carry)
    tensors.update(carry_tensors)
    meta = {"step": state.step, "data_cursor": state.data_cursor, "values": values,
            "tensors": sorted(tensors), "carry": {"values": carry_values, "tensors": sorted(carry_tensors)},
            "extra": extra or {}}
    # Re-saving a step (a signal right after a scheduled save) swaps out the existing folder.
    with atomic_folder(target) as tmp:
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))
    if total_limit:
        prune_checkpoints(output_dir, total_limit)
    return target


def is_sharded_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds what `backends.distributed.save_sharded` writes (a multi-process run's
    checkpoint): DCP's `.metadata` and a `state.json`."""
    folder = Path(folder)
    return (folder / SHARDED_METADATA).is_file() and (folder / STATE_JSON).is_file()


def list_checkpoints(output_dir: str | os.PathLike, sharded_only: bool = False) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first: one-process ones (`save_checkpoint`) and
    sharded ones (`backends.distributed.save_sharded`), or only the sharded ones. Temporary folders
    are not checkpoints."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))
             and (is_sharded_checkpoint(p) or (not sharded_only and (p / STATE_JSON).is_file()
                                               and (p / STATE_TENSORS).is_file()))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int) -> None:
    """Remove the oldest checkpoints of `output_dir` beyond the newest `total_limit`."""
    for old in list_checkpoints(output_dir)[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, like: TrainState) -> tuple[TrainState, dict]:
    """Restore a state saved by `save_checkpoint`; `like` (a freshly initialised state of the same
    run) gives the structure. Returns the state and the `extra` dict saved with it."""
    path = Path(path)
    if not (path / STATE_JSON).is_file() or not (path / STATE_TENSORS).is_file():
        raise CheckpointError(f"{path} is not a puretune checkpoint (no {STATE_JSON} / {STATE_TENSORS})")
    meta = json.loads((path / STATE_JSON).read_text())
    try:
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{path / STATE_TENSORS} cannot be read ({e}); the file is damaged") from e
    carry_meta = meta.get("carry", {"values": {}, "tensors": []})
    carry = dict(carry_meta["values"])
    for name in carry_meta["tensors"]:
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is missing; the checkpoint is damaged")
        carry[name.split("/", 1)[1]] = tensors.pop(name)
    device = next((t.device for t in tree_leaves(like.trainable) if isinstance(t, torch.Tensor)), None)
    if device is not None:
        carry = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in carry.items()}
    template = state_tree(like)
    named = leaves_with_paths(template, none_is_leaf=True)
    restored = []
    for name, leaf in named:
        if isinstance(leaf, torch.Tensor):
            if name not in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} is missing; the checkpoint is from a different run setup")
            t = tensors[name]
            if t.shape != leaf.shape:
                raise CheckpointError(f"{path}: {name} has shape {list(t.shape)}, expected {list(leaf.shape)}")
            restored.append(t.to(device=leaf.device, dtype=leaf.dtype))
        else:
            if name not in meta["values"]:
                raise CheckpointError(f"{path}: value {name!r} is missing from {STATE_JSON}; the checkpoint is "
                                      "from a different run setup or an older puretune")
            restored.append(meta["values"][name])
    unexpected = set(tensors) - {name for name, _ in named}
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {sorted(unexpected)[:5]}; the checkpoint is from a different run setup")
    tree = replace_leaves(template, restored, none_is_leaf=True)
    state = like.replace(**tree, carry=carry)
    return state, meta.get("extra", {})
