"""Dataset loading, preparation and the prepared-data cache, on small files and the real tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

import backends.data_sources as sources
import backends.datasets as bd
from backends.data_cache import prepared_fingerprint, tokenizer_fingerprint
from backends.data_sources import load_dataset_entry
from backends.datasets import prepare_datasets
from backends.hf import load_tokenizer
from backends.tokenizer import prepare_tokenizer
from programs.config import validate
from programs.data import data_spec, tokenizer_edits
from pure.data.settings import DataError
from tests.tiny import TINY

ROWS = [{"instruction": f"Question {i}", "input": "" if i % 2 else f"context {i}", "output": f"Answer {i}"}
        for i in range(20)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _quiet_and_local(tmp_path, monkeypatch):
    datasets.disable_progress_bars()
    monkeypatch.chdir(tmp_path)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_for(tmp_path: Path, **keys):
    raw = {"base_model": "smollm2-135m-instruct", "learning_rate": 1e-4, "sequence_len": 128,
           "dataset_prepared_path": str(tmp_path / "prepared"),
           "datasets": [{"path": str(tmp_path / "data.jsonl"), "type": "alpaca"}], **keys}
    return validate(raw)


def spec_for(tmp_path: Path, **keys):
    return data_spec(config_for(tmp_path, **keys))


# --- loading ---------------------------------------------------------------------------------


def test_loads_jsonl_json_csv_parquet_and_arrow_files(tmp_path):
    source = datasets.Dataset.from_list(ROWS)
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    source.to_csv(str(tmp_path / "d.csv"), index=False)
    source.to_parquet(str(tmp_path / "d.parquet"))
    source.save_to_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", str(arrow_file)):
        ds = load_dataset_entry({"path": str(tmp_path / name)})
        assert len(ds) == 20, name
        assert ds[3]["instruction"] == "Question 3", name


def test_ds_type_overrides_the_extension(tmp_path):
    write_jsonl(tmp_path / "rows.data", ROWS)
    ds = load_dataset_entry({"path": str(tmp_path / "rows.data"), "ds_type": "json"})
    assert len(ds) == 20
    with pytest.raises(DataError, match="set ds_type"):
        load_dataset_entry({"path": str(tmp_path / "rows.data")})


def test_save_to_disk_folder_loads_with_load_from_disk(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:5]),
                          "test": datasets.Dataset.from_list(ROWS[5:8])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_dataset_entry({"path": str(tmp_path / "dd")})) == 5
    assert len(load_dataset_entry({"path": str(tmp_path / "dd"), "split": "test"})) == 3
    with pytest.raises(DataError, match="no split 'validation'; it has train, test"):
        load_dataset_entry({"path": str(tmp_path / "dd"), "split": "validation"})


def test_folder_of_files_and_data_files(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    datasets.Dataset.from_list(ROWS[:10]).to_parquet(str(folder / "a.parquet"))
    datasets.Dataset.from_list(ROWS[10:]).to_parquet(str(folder / "b.parquet"))
    assert len(load_dataset_entry({"path": str(folder)})) == 20
    assert len(load_dataset_entry({"path": str(folder), "ds_type": "parquet", "data_files": ["b.parquet"]})) == 10
    assert len(load_dataset_entry({"path": str(folder), "data_files": "a.parquet"})) == 10


@pytest.mark.parametrize("split, expected", [
    ("train[:10%]", [0, 1]),
    ("train[2:5]", [2, 3, 4]),
    ("train[-2:]", [18, 19]),
    ("train[90%:]", [18, 19]),
    ("train", list(range(20))),
])
def test_split_slicing(tmp_path, split, expected):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds = load_dataset_entry({"path": str(tmp_path / "d.jsonl"), "split": split})
    assert [int(r["instruction"].split()[1]) for r in ds] == expected


def test_shards_pick_one_contiguous_piece(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds = load_dataset_entry({"path": str(tmp_path / "d.jsonl"), "shards": 4, "shards_idx": 1})
    assert [r["instruction"] for r in ds] == [f"Question {i}" for i in range(5, 10)]


def test_malformed_json_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'
                    '{"instruction": "e", "output": \n{"instruction": "g", "output": "h"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: invalid JSON"):
        load_dataset_entry({"path": str(path)})


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2 "b": 3},\n  {"a": 3}\n]\n')
    with pytest.raises(DataError, match=r"bad.json: line 3"):
        load_dataset_entry({"path": str(path)})


def test_hub_id_not_cached_says_so_and_how_to_use_a_local_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError) as info:
        load_dataset_entry({"path": "nobody-here/not-a-cached-dataset"})
    message = str(info.value)
    assert "'nobody-here/not-a-cached-dataset' is not in the local Hugging Face cache" in message
    assert "path: ./data/not-a-cached-dataset.jsonl" in message


def test_missing_local_file_and_remote_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_entry({"path": "./nothing/here.jsonl"})
    with pytest.raises(DataError, match="remote paths .* not supported yet"):
        load_dataset_entry({"path": "s3://bucket/data.jsonl"})


def test_hub_id_found_in_the_local_cache_loads_offline(monkeypatch, tmp_path):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    write_jsonl(snapshot / "train.jsonl", ROWS[:4])
    monkeypatch.setattr(sources, "hub_snapshot", lambda entry: snapshot)
    assert len(load_dataset_entry({"path": "org/cached-dataset"})) == 4


# --- preparing ---------------------------------------------------------------------------------


def test_prepare_alpaca_gives_masked_examples_and_counts(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    data = prepare_datasets(spec_for(tmp_path, shuffle_merged_datasets=False), tokenizer)
    assert len(data.train) == 20 and data.eval is None
    row = data.train[0]
    assert len(row["input_ids"]) == len(row["labels"])
    assert row["labels"][0] == -100 and row["labels"][-1] == row["input_ids"][-1]
    assert data.stats[0]["rows"] == 20 and data.stats[0]["kept"] == 20
    assert (data.path / "meta.json").is_file() and data.path.parent == tmp_path / "prepared"


def test_prepare_datasets_takes_plain_values_not_the_config(tmp_path, tokenizer):
    from backends.data_spec import DataSpec
    from pure.data.settings import DataSettings
    from pure.data.stream import StreamBatching

    write_jsonl(tmp_path / "data.jsonl", ROWS)
    spec = DataSpec(kind="sft", settings=DataSettings(sequence_len=128),
                    stream_batching=StreamBatching(sequence_len=128, micro_batch_size=1),
                    datasets=({"path": str(tmp_path / "data.jsonl"), "type": "alpaca"},), val_set_size=3,
                    dataset_prepared_path=str(tmp_path / "prepared"))
    by_hand = prepare_datasets(spec, tokenizer)
    from_config = prepare_datasets(spec_for(tmp_path, val_set_size=3), tokenizer)
    assert by_hand.fingerprint == from_config.fingerprint and from_config.from_cache
    assert by_hand.eval["input_ids"] == from_config.eval["input_ids"] and len(by_hand.eval) == 3


def test_several_datasets_are_merged_in_order_without_shuffle(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:5])
    write_jsonl(tmp_path / "more.jsonl", ROWS[10:13])
    c = config_for(tmp_path, shuffle_merged_datasets=False,
                   datasets=[{"path": str(tmp_path / "data.jsonl"), "type": "alpaca"},
                             {"path": str(tmp_path / "more.jsonl"), "type": "alpaca"}])
    data = prepare_datasets(data_spec(c), tokenizer)
    texts = [tokenizer.decode(r["input_ids"]) for r in data.train]
    assert len(texts) == 8
    assert "Question 0" in texts[0] and "Question 4" in texts[4] and "Question 10" in texts[5]
    shuffled = prepare_datasets(spec_for(tmp_path, datasets=c.to_dict()["datasets"]), tokenizer)
    assert sorted(map(tuple, shuffled.train["input_ids"])) == sorted(map(tuple, data.train["input_ids"]))


@pytest.mark.parametrize("val_set_size, n_eval", [(0.25, 5), (3, 3)])
def test_val_set_size_fraction_or_count(tmp_path, tokenizer, val_set_size, n_eval):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    data = prepare_datasets(spec_for(tmp_path, val_set_size=val_set_size), tokenizer)
    assert len(data.eval) == n_eval and len(data.train) == 20 - n_eval
    train = {tuple(r) for r in data.train["input_ids"]}
    assert not train & {tuple(r) for r in data.eval["input_ids"]}


def test_test_datasets_become_the_eval_set(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:10])
    write_jsonl(tmp_path / "test.jsonl", ROWS[10:14])
    c = config_for(tmp_path, test_datasets=[{"path": str(tmp_path / "test.jsonl"), "type": "alpaca"}])
    data = prepare_datasets(data_spec(c), tokenizer)
    assert len(data.train) == 10 and len(data.eval) == 4


def test_exact_deduplication(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:6] + ROWS[:3])
    data = prepare_datasets(spec_for(tmp_path, dataset_exact_deduplication=True), tokenizer)
    assert len(data.train) == 6
    assert any(s.get("duplicates_removed") == 3 for s in data.stats)
    assert len(prepare_datasets(spec_for(tmp_path), tokenizer).train) == 9


def test_empty_after_filtering_says_which_filter_removed_what(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:4])
    with pytest.raises(DataError, match=r"train set is empty.*4 longer than 8 tokens dropped"):
        prepare_datasets(spec_for(tmp_path, sequence_len=8), tokenizer)


def test_strategy_errors_name_the_dataset_and_row(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:2] + [{"question": "no instruction here"}])
    with pytest.raises(DataError, match="row 2"):
        prepare_datasets(spec_for(tmp_path), tokenizer)


def test_parallel_processing_gives_the_same_examples_in_order(monkeypatch):
    monkeypatch.setattr(bd, "PARALLEL_MIN_ROWS", 1)
    ds = datasets.Dataset.from_list([{"n": i} for i in range(40)])

    def row_fn(row, index):
        return [{"input_ids": [row["n"], index], "labels": [row["n"]] * (row["n"] % 3)}]

    assert bd._run_strategy(ds, row_fn, 2) == bd._run_strategy(ds, row_fn, 1)


# --- the cache -----------------------------------------------------------------------------------


def test_fingerprint_is_stable_for_the_same_inputs(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    other_tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(other_tokenizer)
    assert prepared_fingerprint(spec_for(tmp_path), tokenizer) == \
        prepared_fingerprint(spec_for(tmp_path, num_epochs=3, learning_rate=5e-5), other_tokenizer)


def test_fingerprint_changes_with_template_data_and_sequence_len(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    base = prepared_fingerprint(spec_for(tmp_path), tokenizer)
    assert prepared_fingerprint(spec_for(tmp_path, sequence_len=256), tokenizer) != base
    assert prepared_fingerprint(spec_for(tmp_path, train_on_inputs=True), tokenizer) != base
    assert prepared_fingerprint(spec_for(tmp_path, chat_template="chatml"), tokenizer) != base
    assert prepared_fingerprint(spec_for(tmp_path, chat_template_jinja="{{ x }}"), tokenizer) != base
    changed = load_tokenizer("smollm2-135m-instruct")
    changed.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert prepared_fingerprint(spec_for(tmp_path), changed) != base
    prepare_tokenizer(added := load_tokenizer("smollm2-135m-instruct"), tokens=["<new>"])
    assert prepared_fingerprint(spec_for(tmp_path), added) != base
    write_jsonl(tmp_path / "data.jsonl", ROWS[:-1])
    assert prepared_fingerprint(spec_for(tmp_path), tokenizer) != base
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    assert prepared_fingerprint(spec_for(tmp_path), tokenizer) == base
    options = config_for(tmp_path, datasets=[{"path": str(tmp_path / "data.jsonl"), "type": "alpaca", "split": "train[:50%]"}])
    assert prepared_fingerprint(data_spec(options), tokenizer) != base


def test_cache_is_reused_when_dataset_prepared_path_is_set(tmp_path, tokenizer, monkeypatch):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    first = prepare_datasets(spec_for(tmp_path, val_set_size=0.1), tokenizer)
    assert not first.from_cache

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(bd, "_build", fail)
    second = prepare_datasets(spec_for(tmp_path, val_set_size=0.1), tokenizer)
    assert second.from_cache and second.path == first.path
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.eval["input_ids"] == first.eval["input_ids"]
    assert not list(first.path.parent.glob(".*"))  # no temporary folders left behind


def test_default_prepared_path_is_rewritten_every_run(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    c = validate({**config_for(tmp_path).to_dict(), "dataset_prepared_path": None})
    first = prepare_datasets(data_spec(c), tokenizer)
    assert first.path.parent.resolve() == (tmp_path / "last_run_prepared").resolve()
    again = prepare_datasets(data_spec(c), tokenizer)
    assert not again.from_cache and again.train["input_ids"] == first.train["input_ids"]


def test_skip_prepare_dataset_writes_no_cache(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:3])
    data = prepare_datasets(spec_for(tmp_path, skip_prepare_dataset=True), tokenizer)
    assert len(data.train) == 3 and data.path is None
    assert not (tmp_path / "prepared").exists()


# --- the tokenizer ---------------------------------------------------------------------------


def test_prepare_tokenizer_adds_tokens_and_reports_how_many():
    tok = load_tokenizer("smollm2-135m-instruct")
    before = len(tok)
    added = prepare_tokenizer(tok, special_tokens={"pad_token": "<|pad|>", "additional_special_tokens": ["<x>"]},
                              tokens=["<tool_call>", "hello"])
    assert added == 3 and len(tok) == before + 3
    assert tok.pad_token == "<|pad|>"
    assert tok.convert_ids_to_tokens(tok.encode("a <tool_call>"))[-1] == "<tool_call>"


def test_prepare_tokenizer_keeps_an_existing_pad_and_renames_added_tokens():
    tok = load_tokenizer("smollm2-135m-instruct")
    pad = tok.pad_token
    assert prepare_tokenizer(tok, **tokenizer_edits(validate({"base_model": "m", "learning_rate": 1,
                                                              "added_tokens_overrides": {4: "<think>"}}))) == 0
    assert tok.pad_token == pad
    assert tok.encode("<think>") == [4] and tok.decode([4]) == "<think>"
    with pytest.raises(DataError, match="token id 300 is not an added token"):
        prepare_tokenizer(tok, added_tokens_overrides={300: "<y>"})


def test_missing_pad_token_becomes_eos():
    tok = load_tokenizer("smollm2-135m-instruct")
    tok.pad_token = None
    assert prepare_tokenizer(tok) == 0
    assert tok.pad_token == tok.eos_token


# --- other kinds through the real strategies --------------------------------------------------


def test_preference_and_chat_template_datasets_prepare_end_to_end(tmp_path, tokenizer):
    write_jsonl(tmp_path / "dpo.jsonl", [{"question": f"Q{i}?", "chosen": "yes", "rejected": "no"} for i in range(3)])
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Hi {i}"},
                                                        {"role": "assistant", "content": "Hello!"}]} for i in range(3)])
    dpo = prepare_datasets(spec_for(tmp_path, rl="dpo", datasets=[{"path": str(tmp_path / "dpo.jsonl"),
                                                                     "type": "chatml.intel"}]), tokenizer)
    assert len(dpo.train) == 3 and {"prompt", "chosen", "rejected"} <= set(dpo.train.column_names)
    chat = prepare_datasets(spec_for(tmp_path, datasets=[{"path": str(tmp_path / "chat.jsonl"),
                                                            "type": "chat_template"}]), tokenizer)
    assert len(chat.train) == 3 and any(label != -100 for label in chat.train[0]["labels"])


# --- the global chat_template goes into the tokenizer --------------------------------------------


def test_global_chat_template_is_written_into_the_tokenizer():
    from pure.data.templates import CHAT_TEMPLATES

    tok = load_tokenizer("smollm2-135m-instruct")
    own = tok.chat_template
    prepare_tokenizer(tok)
    assert tok.chat_template == own  # no chat_template key: the tokenizer's own stays
    prepare_tokenizer(tok, **tokenizer_edits(validate({"base_model": "m", "learning_rate": 1, "chat_template": "llama3"})))
    assert tok.chat_template == CHAT_TEMPLATES["llama3"]
    prepare_tokenizer(tok, **tokenizer_edits(validate({"base_model": "m", "learning_rate": 1, "chat_template_jinja": "{{ messages[0]['content'] }}"})))
    assert tok.chat_template == "{{ messages[0]['content'] }}"  # chat_template: jinja is implied
    prepare_tokenizer(tok, chat_template="tokenizer_default_fallback_chatml")
    assert tok.chat_template == "{{ messages[0]['content'] }}"  # the tokenizer has one: it is kept
    with pytest.raises(DataError, match="unknown chat_template 'chatmlx'"):
        prepare_tokenizer(tok, chat_template="chatmlx")


def test_exported_tokenizer_carries_the_training_template(tmp_path):
    from backends.hf import save_pretrained
    from pure import rng
    from pure.data.templates import CHAT_TEMPLATES
    from pure.models import llama

    tok = load_tokenizer("smollm2-135m-instruct")
    prepare_tokenizer(tok, **tokenizer_edits(validate({"base_model": "m", "learning_rate": 1, "chat_template": "gemma3"})))
    config = TINY
    folder = save_pretrained(llama.init(config, rng.key(0)), config, tok, tmp_path / "export")
    reloaded = load_tokenizer(folder)
    assert reloaded.chat_template == CHAT_TEMPLATES["gemma3"]
    chat = [{"role": "user", "content": "Hi"}]
    assert reloaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_prepared_chats_use_the_template_now_in_the_tokenizer(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello!"}]}
            for i in range(3)]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    config = config_for(tmp_path, chat_template="phi_3",
                        datasets=[{"path": str(tmp_path / "chat.jsonl"), "type": "chat_template"}])
    tok = load_tokenizer("smollm2-135m-instruct")
    prepare_tokenizer(tok, **tokenizer_edits(config))
    data = prepare_datasets(data_spec(config), tok)
    assert all(tok.decode(ids).startswith("<|user|>\nHi ") for ids in data.train["input_ids"])


# --- preprocess --iterable: rows read as a stream, same examples ---------------------------------


def test_iterable_preparation_gives_the_same_examples_and_cache_key(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    write_jsonl(tmp_path / "more.jsonl", ROWS[:7])
    keys = dict(shuffle_before_merging_datasets=True, val_set_size=3, skip_prepare_dataset=True,
                datasets=[{"path": str(tmp_path / "data.jsonl"), "type": "alpaca", "split": "train[2:18]"},
                          {"path": str(tmp_path / "more.jsonl"), "type": "alpaca"}])
    plain = prepare_datasets(spec_for(tmp_path, **keys), tokenizer)
    iterable = prepare_datasets(spec_for(tmp_path, preprocess_iterable=True, **keys), tokenizer)
    assert iterable.train["input_ids"] == plain.train["input_ids"] and len(plain.train) == 20
    assert iterable.eval["input_ids"] == plain.eval["input_ids"]
    assert iterable.fingerprint == plain.fingerprint
    assert [s["summary"] for s in iterable.stats] == [s["summary"] for s in plain.stats]
