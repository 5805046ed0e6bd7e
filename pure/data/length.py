"""The length policy applied to prepared examples before packing/batching.

In order, for each example of one dataset:
1. longer than `sequence_len` -> `excess_length_strategy`: `drop` (default), `truncate` (every per-token
   list cut to `sequence_len`), or `raise` (a DataError naming the dataset and row);
2. shorter than `min_sample_len` -> dropped;
3. no trained label (all -100) -> dropped: such a row adds nothing to the loss but costs compute and
   would make a token-weighted mean divide by zero.
"""
from __future__ import annotations

from dataclasses import dataclass

from pure.data.settings import IGNORE_INDEX, DataError, DataSettings, Example

EXCESS_LENGTH_STRATEGIES = ("drop", "truncate", "raise")


@dataclass(frozen=True)
class LengthStats:
    """What the length policy did to one dataset."""

    dataset: str
    total: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_too_short: int = 0
    dropped_untrained: int = 0
    sequence_len: int = 0
    min_sample_len: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_too_long + self.dropped_too_short + self.dropped_untrained

    def summary(self) -> str:
        parts = []
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} longer than {self.sequence_len} tokens dropped")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {self.sequence_len} tokens")
        if self.dropped_too_short:
            parts.append(f"{self.dropped_too_short} shorter than {self.min_sample_len} tokens dropped")
        if self.dropped_untrained:
            parts.append(f"{self.dropped_untrained} with no trained token dropped")
        detail = f" ({'; '.join(parts)})" if parts else ""
        return f"{self.dataset}: kept {self.kept} of {self.total} examples{detail}"


def _truncate(example: Example, length: int) -> Example:
    n = len(example["input_ids"])
    return {key: (value[:length] if isinstance(value, (list, tuple)) and len(value) == n else value)
            for key, value in example.items()}


def apply_length_policy(examples: list[Example], settings: DataSettings,
                        dataset_name: str) -> tuple[list[Example], LengthStats]:
    """Keep the examples that fit (see the module docstring); returns (kept, stats)."""
    strategy = settings.excess_length_strategy or "drop"
    if strategy not in EXCESS_LENGTH_STRATEGIES:
        raise DataError(f"excess_length_strategy {strategy!r}: expected one of {EXCESS_LENGTH_STRATEGIES}")
    max_len, min_len = settings.sequence_len, settings.min_sample_len or 0
    kept: list[Example] = []
    too_long = truncated = too_short = untrained = 0
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        if n > max_len:
            if strategy == "raise":
                raise DataError(f"dataset {dataset_name!r} row {row}: {n} tokens is longer than "
                                f"sequence_len={max_len} (excess_length_strategy: raise)")
            if strategy == "drop":
                too_long += 1
                continue
            example, n = _truncate(example, max_len), max_len
            truncated += 1
        if n < min_len:
            too_short += 1
            continue
        if all(label == IGNORE_INDEX for label in example["labels"]):
            untrained += 1
            continue
        kept.append(example)
    stats = LengthStats(dataset_name, len(examples), len(kept), too_long, truncated, too_short, untrained,
                        max_len, min_len)
    return kept, stats
