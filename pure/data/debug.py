"""Human-readable views of prepared examples, as `axolotl preprocess --debug` prints them.

`format_labels` writes every token as `decoded(label, id)`, separated by spaces, e.g.
`<s>(1, 1) Hello(22557, 22557) good(-100, 1179)`: label -100 = masked, label == id = trained.
Each token is decoded on its own, as axolotl's `check_example_labels` does, so a byte-level BPE
token keeps its leading space (` good(-100, 1123)`) and a newline token prints a real newline.
`format_preference` prints the strings of a preference example field by field.
"""
from __future__ import annotations

from typing import Sequence

from pure.data.settings import IGNORE_INDEX, Example

_RED, _YELLOW, _GREEN, _RESET = "\033[31m", "\033[33m", "\033[32m", "\033[0m"
_FIELD_COLORS = {"prompt": "\033[94m", "chosen": "\033[92m", "rejected": "\033[91m", "completion": "\033[93m"}


def _ints(values: Sequence) -> list[int]:
    return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def format_labels(tokenizer, input_ids: Sequence[int], labels: Sequence[int], *, color: bool = False) -> str:
    """`decoded(label, id)` for every token, space-separated (color: red masked, green trained)."""
    input_ids, labels = _ints(input_ids), _ints(labels)
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} input ids but {len(labels)} labels")
    pieces = tokenizer.batch_decode([[token] for token in input_ids])
    out = []
    for piece, label, token in zip(pieces, labels, input_ids):
        text = f"{piece}({label}, {token})"
        if color:
            tint = _RED if label == IGNORE_INDEX else _YELLOW if label == 0 else _GREEN
            text = f"{tint}{text}{_RESET}"
        out.append(text)
    return " ".join(out)


def format_text(tokenizer, input_ids: Sequence[int]) -> str:
    """The decoded text of an example (`--debug-text-only`), special tokens included."""
    return tokenizer.decode(_ints(input_ids))


def format_preference(example: Example, color: bool = True) -> str:
    """The prompt / chosen / rejected (or completion and label) strings of an example, for --debug."""
    lines = []
    for name in ("prompt", "chosen", "rejected", "completion"):
        if name in example:
            text = example[name]
            lines.append(f"{_FIELD_COLORS[name]}{name}:{_RESET} {text}" if color else f"{name}: {text}")
    if "label" in example:
        lines.append(f"label: {example['label']}")
    if example.get("truncated"):
        lines.append("(truncated)")
    return "\n".join(lines)
