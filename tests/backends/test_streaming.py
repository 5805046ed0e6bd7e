"""Streamed train sets (`streaming: true`, `pretraining_dataset`) from local files, with the real tokenizer."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch

import backends.data_sources as sources
from backends.data_sources import stream_dataset_entry
from backends.data_spec import is_streaming
from backends.datasets import prepare_datasets
from backends.streaming import prepare_eval_datasets, stream_examples, stream_micro_batches, stream_train_steps
from programs.config import validate
from programs.data import data_spec
from pure.data.settings import IGNORE_INDEX, DataError

ROWS = [{"instruction": f"Question {i}", "input": "", "output": "Answer " * (i % 7 + 1)} for i in range(40)]
TENSORS = ("input_ids", "labels", "positions", "segment_ids")


@pytest.fixture(scope="module")
def tokenizer():
    from backends.hf import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _local(tmp_path, monkeypatch):
    datasets.disable_progress_bars()
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", ROWS)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec_for(**keys):
    raw = {"base_model": "smollm2-135m-instruct", "learning_rate": 1e-4, "sequence_len": 96, "micro_batch_size": 2,
           "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "streaming": True, "max_steps": 5,
           "sample_packing": True, "streaming_multipack_buffer_size": 8, "dataset_prepared_path": "prepared", **keys}
    return data_spec(validate(raw))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in TENSORS)


def test_streamed_examples_equal_the_prepared_ones_in_file_order(tokenizer):
    streamed = list(stream_examples(spec_for(shuffle_merged_datasets=False), tokenizer))
    prepared = prepare_datasets(spec_for(streaming=False, shuffle_merged_datasets=False), tokenizer).train
    assert [e["input_ids"] for e in streamed] == prepared["input_ids"]
    assert [e["labels"] for e in streamed] == prepared["labels"]


def test_shuffled_stream_is_a_seeded_permutation_per_epoch(tokenizer):
    ordered = [e["input_ids"] for e in stream_examples(spec_for(shuffle_merged_datasets=False), tokenizer)]
    epoch0 = [e["input_ids"] for e in stream_examples(spec_for(), tokenizer, 0)]
    assert sorted(epoch0) == sorted(ordered) and epoch0 != ordered
    assert epoch0 == [e["input_ids"] for e in stream_examples(spec_for(), tokenizer, 0)]
    assert epoch0 != [e["input_ids"] for e in stream_examples(spec_for(), tokenizer, 1)]
    assert epoch0 != [e["input_ids"] for e in stream_examples(spec_for(seed=3), tokenizer, 0)]


def test_micro_batches_follow_the_packed_contract_and_hold_every_token(tokenizer):
    config = spec_for()
    batches = list(stream_micro_batches(config, tokenizer, 0))
    examples = list(stream_examples(config, tokenizer, 0))
    assert all(b["input_ids"].shape == (2, 96) for b in batches[:-1])
    assert sum(b["num_tokens"] for b in batches) == sum(len(e["input_ids"]) for e in examples)
    trained = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
    assert sum(b["num_trained"] for b in batches) == trained  # each document's first label is dropped
    assert all(set(b) == {*TENSORS, "num_tokens", "num_trained"} for b in batches)


def test_resume_by_skipping_is_bitwise_identical(tokenizer):
    config = spec_for()
    full = list(stream_micro_batches(config, tokenizer, 1))
    assert same(full[3:], list(stream_micro_batches(config, tokenizer, 1, skip=3)))


def test_train_steps_advance_the_cursor_and_roll_over_epochs(tokenizer):
    config = spec_for(shuffle_merged_datasets=False)
    per_epoch = len(list(stream_micro_batches(config, tokenizer, 0)))
    steps = stream_train_steps(config, tokenizer, {"epoch": 0, "batch": 0}, accumulation=3)
    taken = [next(steps) for _ in range(per_epoch // 3 + 2)]
    cursors = [cursor for cursor, _ in taken]
    assert cursors[: per_epoch // 3] == [{"epoch": 0, "batch": 3 * (i + 1)} for i in range(per_epoch // 3)]
    assert cursors[per_epoch // 3:] == [{"epoch": 1, "batch": 3}, {"epoch": 1, "batch": 6}]
    assert all(len(micro) == 3 for _, micro in taken)
    # resuming at any cursor continues with exactly the steps an uninterrupted run takes
    resumed = stream_train_steps(config, tokenizer, cursors[1], accumulation=3)
    for cursor, micro in taken[2:]:
        again_cursor, again = next(resumed)
        assert again_cursor == cursor and same(micro, again)


def test_training_a_stream_needs_max_steps_and_enough_batches(tokenizer):
    with pytest.raises(DataError, match="needs max_steps"):
        next(stream_train_steps(spec_for(max_steps=None), tokenizer, None, 1))
    with pytest.raises(DataError, match="fewer than gradient_accumulation_steps"):
        next(stream_train_steps(spec_for(), tokenizer, None, 1000))


@pytest.mark.parametrize("keys, message", [
    ({"val_set_size": 0.1}, "val_set_size cannot be used with a streamed train set"),
    ({"dataset_exact_deduplication": True}, "dataset_exact_deduplication cannot be used"),
    ({"dataset_shard_num": 2, "dataset_shard_idx": 0}, "dataset_shard_num cannot be used"),
    ({"datasets": [{"path": "data.jsonl", "type": "alpaca", "split": "train[:50%]"}]}, "sliced by row counts"),
    ({"datasets": [{"path": "data.jsonl", "type": "alpaca", "shards": 2}]}, "shards cannot be cut from a stream"),
    ({"rl": "dpo", "sample_packing": False}, "streaming supports SFT and pretraining, not 'dpo'"),
])
def test_what_a_stream_cannot_do_is_refused_with_the_reason(tokenizer, keys, message):
    with pytest.raises(DataError, match=message):
        next(iter(stream_examples(spec_for(**keys), tokenizer)))


def test_prepare_datasets_refuses_a_streamed_config(tokenizer):
    with pytest.raises(DataError, match="stream_train_steps"):
        prepare_datasets(spec_for(), tokenizer)


def test_streaming_on_every_entry_or_none(tokenizer):
    entry = {"path": "data.jsonl", "type": "alpaca"}
    assert is_streaming(spec_for(streaming=None, datasets=[{**entry, "streaming": True}] * 2))
    assert not is_streaming(spec_for(streaming=None))
    with pytest.raises(DataError, match="some entries set streaming: true"):
        is_streaming(spec_for(streaming=None, datasets=[{**entry, "streaming": True}, entry]))


def test_row_count_slices_and_saved_folders_stream(tmp_path):
    rows = [int(r["instruction"].split()[1]) for r in stream_dataset_entry({"path": "data.jsonl", "split": "train[5:9]"})[0]]
    assert rows == [5, 6, 7, 8]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                          "test": datasets.Dataset.from_list(ROWS[3:5])}).save_to_disk(str(tmp_path / "saved"))
    assert len(list(stream_dataset_entry({"path": str(tmp_path / "saved"), "split": "test"})[0])) == 2


def test_a_malformed_line_met_while_streaming_names_the_file_and_line(tokenizer, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:3])
    with open(tmp_path / "data.jsonl", "a") as fh:
        fh.write('{"instruction": "x", "output": \n')
    with pytest.raises(DataError, match=r"data.jsonl: line 4"):
        list(stream_examples(spec_for(shuffle_merged_datasets=False), tokenizer))


def test_pretraining_dataset_packs_every_token_of_each_text(tokenizer, tmp_path):
    texts = [{"text": " ".join(f"word{i}_{j}" for j in range(i * 7 % 60 + 5))} for i in range(30)]
    write_jsonl(tmp_path / "corpus.jsonl", texts)
    config = spec_for(datasets=None, streaming=None, sample_packing=None,
                        pretraining_dataset=[{"path": "corpus.jsonl", "type": "pretrain", "skip": 8}])
    examples = list(stream_examples(replace(config, shuffle_merged_datasets=False), tokenizer))
    text = tokenizer.encode(texts[8]["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(text) > 2 * 96  # `skip: 8` skips 8 rows; the 9th text is split at sequence_len
    chunks = -(-len(text) // 96)
    assert [t for e in examples[:chunks] for t in e["input_ids"]] == text
    assert [len(e["input_ids"]) for e in examples[:chunks]] == [96] * (chunks - 1) + [len(text) - 96 * (chunks - 1)]
    assert all(e["labels"] == e["input_ids"] for e in examples)  # every token trained
    batches = list(stream_micro_batches(config, tokenizer, 0))
    assert sum(b["num_tokens"] for b in batches) == sum(len(e["input_ids"]) for e in examples)
    assert max(int(b["segment_ids"].max()) for b in batches) > 1  # documents packed together, kept apart
    joined = list(stream_micro_batches(spec_for(datasets=None, streaming=None, pretrain_multipack_attn=False,
                                                  pretraining_dataset=[{"path": "corpus.jsonl"}]), tokenizer, 0))
    assert max(int(b["segment_ids"].max()) for b in joined) == 1


def test_eval_sets_are_prepared_not_streamed(tokenizer, tmp_path):
    write_jsonl(tmp_path / "eval.jsonl", ROWS[:4])
    evals = prepare_eval_datasets(spec_for(test_datasets=[{"path": "eval.jsonl", "type": "alpaca"}]), tokenizer)
    assert len(evals) == 4 and (tmp_path / "prepared").is_dir()
    assert prepare_eval_datasets(spec_for(), tokenizer) is None


def test_cached_hub_datasets_stream_and_uncached_ones_say_so(monkeypatch, tmp_path):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    write_jsonl(snapshot / "train.jsonl", ROWS[:4])
    monkeypatch.setattr(sources, "hub_snapshot", lambda entry: snapshot)
    assert len(list(stream_dataset_entry({"path": "org/cached-dataset"})[0])) == 4
    monkeypatch.setattr(sources, "hub_snapshot", lambda entry: None)
    with pytest.raises(DataError, match="'org/elsewhere' is not in the local Hugging Face cache"):
        stream_dataset_entry({"path": "org/elsewhere"})
    with pytest.raises(DataError, match="remote paths"):
        stream_dataset_entry({"path": "https://example.com/data.jsonl"})
