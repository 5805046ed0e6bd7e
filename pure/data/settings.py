"""The few plain values a prompt strategy needs, taken from the validated config at the edge."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# The label of an untrained token (cross-entropy's `ignore_index`); pure.losses imports it from here.
IGNORE_INDEX = -100

# One prepared example: at least `input_ids` and `labels` (lists of ints, same length) for SFT;
# preference rows carry their own fields (see pure/data/preference.py).
Example = dict[str, Any]
# A prompt strategy turns one raw row (and its index in its dataset, for error messages) into zero or
# more examples (`completion` splits long texts into several).
RowFn = Callable[[dict, int], list[Example]]


class DataError(ValueError):
    """Bad input data: the message names the dataset/file, row (or line) and field, and what was expected."""


@dataclass(frozen=True)
class DataSettings:
    """Global (non per-dataset) settings that change how rows are tokenised and masked."""

    sequence_len: int = 512
    train_on_inputs: bool = False
    chat_template: str | None = None  # global `chat_template:` key
    chat_template_jinja: str | None = None
    chat_template_kwargs: dict = field(default_factory=dict)
    default_system_message: str | None = None
    eot_tokens: tuple[str, ...] | None = None
    max_prompt_len: int | None = None
    excess_length_strategy: str = "drop"  # drop | truncate | raise
    min_sample_len: int = 2
    seed: int = 42
