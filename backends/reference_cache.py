"""The cache of precomputed reference log-probs (`precompute_ref_log_probs`): one safetensors file
per split next to the prepared data, holding `ref_logps` [pairs, 2] (chosen, rejected), so a rerun
or a resume of the same data and model runs no reference pass."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save

from backends.atomic import atomic_write

KEY = "ref_logps"


def load_reference_logps(path: Path, num_pairs: int) -> torch.Tensor | None:
    """The cached [num_pairs, 2] log-probs at `path`; None when there is no file yet or it holds
    another number of pairs (the data changed), so the caller computes them again."""
    if not path.is_file():
        return None
    values = load_file(str(path))[KEY]
    return values if values.shape == (num_pairs, 2) else None


def save_reference_logps(path: Path, values: torch.Tensor) -> None:
    """Write `values` [pairs, 2] to `path` atomically (`backends.atomic.atomic_write`), so a kill
    mid-write never leaves a truncated cache to be read."""
    atomic_write(path, save({KEY: values.contiguous()}))
