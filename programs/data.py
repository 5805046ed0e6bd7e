"""The config's data keys as the plain values `backends/` takes: built here, once, at the edge.

    tokenizer = load_tokenizer(config.tokenizer_config or config.base_model)
    prepare_tokenizer(tokenizer, **tokenizer_edits(config))
    data = prepare_datasets(data_spec(config), tokenizer)
"""
from __future__ import annotations

from typing import Any

from backends.data_spec import DataSpec
from programs.config import data_settings, training_kind
from pure.data.stream import StreamBatching


def _entries(entries) -> tuple[dict, ...]:
    # A dataset entry as the user wrote it: keys not given stay out, so they do not change the cache key.
    return tuple(e.to_dict() if hasattr(e, "to_dict") else dict(e) for e in entries or ())


def stream_batching(config) -> StreamBatching:
    """How a streamed train set becomes micro-batches: `pretraining_dataset` is always packed (one
    attention segment per document unless `pretrain_multipack_attn: false`), `streaming` packs with
    `sample_packing`."""
    pretraining = bool(config.pretraining_dataset)
    packing = pretraining or bool(config.sample_packing)
    buffer = config.pretrain_multipack_buffer_size if pretraining else None
    return StreamBatching(
        sequence_len=int(config.sequence_len),
        micro_batch_size=config.micro_batch_size,
        packing=packing,
        buffer_size=int(buffer or config.streaming_multipack_buffer_size),
        pad_to_sequence_len=(config.pad_to_sequence_len is not False) if packing else bool(config.pad_to_sequence_len),
        max_per_bin=config.sample_packing_bin_size,
        sequential=bool(config.sample_packing_sequentially),
        bucket_by_length=bool(config.group_by_length),
        isolate_documents=not pretraining or config.pretrain_multipack_attn is not False,
    )


def data_spec(config) -> DataSpec:
    """Everything `backends.datasets`, `backends.data_cache` and `backends.streaming` read from a
    validated `programs.config.Config`."""
    return DataSpec(
        kind=training_kind(config),
        settings=data_settings(config),
        stream_batching=stream_batching(config),
        datasets=_entries(config.datasets),
        test_datasets=_entries(config.test_datasets),
        eval_sequence_len=config.eval_sequence_len,
        val_set_size=config.val_set_size or 0.0,
        # null means "unset" (the default, true), for the prepared and the streamed path alike
        shuffle_merged_datasets=config.shuffle_merged_datasets is not False,
        shuffle_before_merging_datasets=bool(config.shuffle_before_merging_datasets),
        dataset_exact_deduplication=bool(config.dataset_exact_deduplication),
        dataset_shard_num=config.dataset_shard_num,
        dataset_shard_idx=config.dataset_shard_idx or 0,
        dataset_prepared_path=config.dataset_prepared_path,
        skip_prepare_dataset=bool(config.skip_prepare_dataset),
        preprocess_iterable=bool(config.preprocess_iterable),
        dataset_num_proc=config.dataset_num_proc,
        transform_cfg=config.to_dict(),
        streaming=bool(config.streaming),
        pretraining_dataset=tuple(config.pretraining_dataset or ()),
        streaming_buffer_size=int(config.streaming_multipack_buffer_size or 10_000),
        max_steps=config.max_steps,
    )


def tokenizer_edits(config) -> dict[str, Any]:
    """The keyword arguments of `backends.tokenizer.prepare_tokenizer`: the config's token keys."""
    special = config.special_tokens
    if special is not None and hasattr(special, "model_dump"):
        special = special.model_dump(exclude_none=True)
    return dict(
        chat_template=config.chat_template,
        chat_template_jinja=config.chat_template_jinja,
        special_tokens=dict(special) if special is not None else None,
        tokens=list(config.tokens) if config.tokens else None,
        added_tokens_overrides=dict(config.added_tokens_overrides) if config.added_tokens_overrides else None,
    )
