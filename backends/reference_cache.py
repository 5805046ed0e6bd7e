"""The cache of precomputed reference log-probs (`precompute_ref_log_probs`): one safetensors file
per split next to the prepared data, holding `ref_logps` [pairs, 2] (chosen, rejected), so a rerun
or a resume of the same data and model runs no reference pass."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KEY = "ref_logps"


def load_reference_logps(path: Path, num_pairs: int) -> torch.Tensor | None:
    """The cached [num_pairs, 2] log-probs at `path`; None when there is no file yet or it holds
    another number of pairs (the data changed), so the caller computes them again."""
    if not path.is_file():
        return None
    values = load_file(str(path))[KEY]
    return values if values.shape == (num_pairs, 2) else None


def save_reference_logps(path: Path, values: torch.Tensor) -> None:
    """Write `values` [pairs, 2] to `path` atomically: a temporary file in the same folder, fsynced,
    then renamed over `path`, so a kill mid-write never leaves a truncated cache to be read."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file({KEY: values.contiguous()}, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
