"""What the data layer reads from the config, as plain values: one frozen record built at the edge
(`programs.data.data_spec(config)`) and read by `backends.datasets`, `backends.data_cache` and
`backends.streaming`, which never see the config itself.

    spec = data_spec(config)                   # programs/
    data = prepare_datasets(spec, tokenizer)   # backends/
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from pure.data.settings import DataError, DataSettings
from pure.data.stream import StreamBatching

STREAMING_KINDS = ("sft",)


@dataclass(frozen=True)
class DataSpec:
    """The data keys of a config. Dataset entries are plain dicts, as the user wrote them."""

    kind: str  # "sft", a preference kind, "prm" or an online kind (pure.data.registry.KINDS)
    settings: DataSettings  # how rows are tokenised and masked
    stream_batching: StreamBatching  # micro-batches of a streamed train set (the pad id is the tokenizer's)
    datasets: tuple[dict, ...] = ()
    test_datasets: tuple[dict, ...] = ()
    eval_sequence_len: int | None = None  # None: settings.sequence_len
    val_set_size: float = 0.0  # a fraction (< 1) or a row count
    shuffle_merged_datasets: bool = True
    shuffle_before_merging_datasets: bool = False
    dataset_exact_deduplication: bool = False
    dataset_shard_num: int | None = None
    dataset_shard_idx: int = 0
    dataset_prepared_path: str | None = None  # None: ./last_run_prepared, rewritten every run
    skip_prepare_dataset: bool = False
    preprocess_iterable: bool = False
    dataset_num_proc: int | None = None  # None: every CPU
    # The whole config as plain data: axolotl hands it to user dataset transforms as `cfg`.
    transform_cfg: Mapping[str, Any] = field(default_factory=dict)
    # A streamed train set
    streaming: bool = False
    pretraining_dataset: tuple[Any, ...] = ()  # entries (dicts) or bare paths
    streaming_buffer_size: int = 10_000  # streaming_multipack_buffer_size
    max_steps: int | None = None


def is_streaming(spec: DataSpec) -> bool:
    """True when the train set is streamed: `streaming: true`, `pretraining_dataset:`, or every
    `datasets:` entry marked `streaming: true` (a mix of streamed and prepared entries is an error)."""
    if spec.streaming or spec.pretraining_dataset:
        return True
    marks = [bool(e.get("streaming")) for e in spec.datasets]
    if any(marks) and not all(marks):
        raise DataError("datasets: some entries set streaming: true and others do not; a train set is either "
                        "streamed or prepared: set streaming: true at the top level (or on every entry)")
    return bool(marks) and all(marks)


def check_streaming(spec: DataSpec) -> None:
    """The keys a stream cannot honour, each refused with what to do instead."""
    if spec.kind not in STREAMING_KINDS:
        raise DataError(f"streaming supports SFT and pretraining, not {spec.kind!r}; preprocess the dataset instead")
    refusals = {
        "val_set_size": (spec.val_set_size, "a held-out split needs the whole train set; use test_datasets "
                                            "(eval sets are not streamed)"),
        "dataset_shard_num": (spec.dataset_shard_num, "sharding needs the row count of the stream; "
                                                      "shard the files instead"),
        "dataset_exact_deduplication": (spec.dataset_exact_deduplication, "deduplicating a stream would keep every "
                                                                          "row seen; deduplicate the files"),
    }
    for key, (value, why) in refusals.items():
        if value:
            raise DataError(f"{key} cannot be used with a streamed train set: {why}")
