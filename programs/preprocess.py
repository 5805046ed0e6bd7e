"""Prepare (tokenise, mask, filter, split) the datasets of a config and cache them, without training.

    python -m programs.preprocess --config x.yaml [--debug] [--debug-text-only] [--debug-num-examples N]
                                  [--iterable]

Prints the example counts per dataset and where the cache was written; `--debug` prints the first
N prepared rows as `token(label, id)`, `--debug-text-only` their text (preference rows: prompt,
chosen, rejected). Any config key is an option too (`--sequence-len 1024`).

`--iterable` (axolotl's `preprocess --iterable`, config key `preprocess_iterable`) reads the raw
datasets as streams (`datasets` IterableDataset) instead of loading each one whole first; the
prepared examples and the cache are the same. A streamed config (`streaming: true` or
`pretraining_dataset`) has no train cache (its rows are tokenised during training): preprocess
prepares and caches its `test_datasets` only, and `--debug` shows the stream's first examples
(in file order).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace

from backends.data_spec import DataSpec, check_streaming, is_streaming
from backends.datasets import prepare_datasets
from backends.hf import ModelLoadError, load_tokenizer
from backends.streaming import prepare_eval_datasets, stream_examples
from backends.tokenizer import prepare_tokenizer
from programs.config import ConfigError, parse_cli
from programs.data import data_spec, tokenizer_edits
from pure.data.settings import DataError

DESCRIPTION = "Tokenise, mask and cache the datasets of a config (axolotl's `preprocess`)."
PROGRAM_FLAGS = {"--debug": False, "--debug-text-only": False, "--debug-num-examples": True, "--iterable": False}
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "completion", "label")


def _program_args(extra: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="programs.preprocess", add_help=False)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--debug-text-only", action="store_true")
    parser.add_argument("--debug-num-examples", type=int, default=1)
    parser.add_argument("--iterable", action="store_true")
    args = parser.parse_args(extra)
    if args.debug_num_examples < 0:
        raise ConfigError(f"--debug-num-examples: expected a count >= 0, got {args.debug_num_examples}")
    return args


def format_example(tokenizer, row: dict, *, text_only: bool) -> str:
    """One prepared row for `--debug`: labels per token, or text; preference rows field by field."""
    from pure.data.debug import format_labels, format_text

    if "input_ids" in row and row["input_ids"] is not None and "labels" in row:
        if text_only:
            return format_text(tokenizer, row["input_ids"])
        return format_labels(tokenizer, row["input_ids"], row["labels"])
    lines, shown = [], set()
    for name in PREFERENCE_FIELDS:
        value = row.get(name)
        if value is not None and not isinstance(value, (list, dict)):
            lines.append(f"{name}: {value}")
            shown.add(name)
    for key, value in row.items():  # tokenised preference rows: chosen_input_ids / chosen_labels ...
        if not key.endswith("input_ids") or key == "input_ids" or not value:
            continue
        name = key[: -len("input_ids")].rstrip("_") or key
        labels = row.get(f"{name}_labels")
        if name in shown and (text_only or labels is None):
            continue
        if text_only or labels is None:
            lines.append(f"{name}: {format_text(tokenizer, value)}")
        else:
            lines.append(f"{name}: {format_labels(tokenizer, value, labels)}")
    if not lines:
        lines = [f"{k}: {v}" for k, v in row.items()]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    config, extra = parse_cli(argv, DESCRIPTION, program_flags=PROGRAM_FLAGS)
    args = _program_args(extra)
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # progress bars are cosmetic
        pass
    if args.iterable:
        config = config.model_copy(update={"preprocess_iterable": True})
    tokenizer = load_tokenizer(config.tokenizer_config or config.base_model)
    added = prepare_tokenizer(tokenizer, **tokenizer_edits(config))
    if added:
        print(f"tokenizer: added {added} tokens (the model's embeddings grow to {len(tokenizer)})")
    spec = data_spec(config)
    if is_streaming(spec):
        return _preview_stream(spec, tokenizer, args)
    data = prepare_datasets(spec, tokenizer)
    if data.from_cache:
        print(f"reused the prepared data in {data.path}")
    for info in data.stats:
        print(info.get("summary", info))
    n_eval = len(data.eval) if data.eval is not None else 0
    where = f"; written to {data.path}" if data.path is not None and not data.from_cache else ""
    print(f"prepared {len(data.train)} train and {n_eval} eval examples{where}")
    if args.debug or args.debug_text_only:
        count = min(args.debug_num_examples, len(data.train))
        for i in range(count):
            print(f"--- example {i} ---")
            print(format_example(tokenizer, data.train[i], text_only=args.debug_text_only))
    return 0


def _preview_stream(spec: DataSpec, tokenizer, args: argparse.Namespace) -> int:
    """A streamed config: cache the eval set, and show the first streamed examples with --debug."""
    check_streaming(spec)
    evals = prepare_eval_datasets(spec, tokenizer)
    n_eval = len(evals) if evals is not None else 0
    print("streaming: the train set is tokenised on the fly during training and not cached "
          f"(micro-batches from streaming_multipack_buffer_size={spec.streaming_buffer_size} "
          f"examples at a time); prepared {n_eval} eval examples")
    if args.debug or args.debug_text_only:
        in_file_order = replace(spec, shuffle_merged_datasets=False, shuffle_before_merging_datasets=False)
        stream = stream_examples(in_file_order, tokenizer, 0)  # unshuffled: no buffer to fill first
        for i, example in enumerate(itertools.islice(stream, args.debug_num_examples)):
            print(f"--- example {i} ---")
            print(format_example(tokenizer, example, text_only=args.debug_text_only))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: errors in the config, the data or the model are one line on stderr, exit 2."""
    try:
        return run(argv)
    except (ConfigError, DataError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a tokenizer folder or data file that cannot be read
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
