"""`python -m programs.preprocess`, run in-process on a tiny alpaca file with the real tokenizer."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from programs.preprocess import format_example, main

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Add the numbers", "input": "1+1", "output": "2"},
    {"instruction": "Name a color", "input": "", "output": "Blue"},
]
PAIR = re.compile(r"\((-?\d+), (\d+)\)")


@pytest.fixture
def config_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": "smollm2-135m-instruct", "learning_rate": 1e-4, "sequence_len": 256,
        "datasets": [{"path": "alpaca.jsonl", "type": "alpaca"}], "shuffle_merged_datasets": False,
        "dataset_prepared_path": "prepared",
    }))
    return path


def test_preprocess_writes_the_cache_and_prints_counts(config_path, capsys):
    assert main(["--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "train: 3 rows -> alpaca.jsonl: kept 3 of 3 examples" in out
    assert "prepared 3 train and 0 eval examples; written to prepared/" in out
    assert len(list((config_path.parent / "prepared").glob("*/meta.json"))) == 1
    assert main(["--config", str(config_path)]) == 0
    assert "reused the prepared data" in capsys.readouterr().out


def test_debug_prints_token_label_id_triples(config_path, capsys):
    assert main(["--config", str(config_path), "--debug", "--debug-num-examples", "2"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("--- example ")[1:]
    assert len(blocks) == 2
    body = blocks[0].split("\n", 1)[1].rstrip("\n")
    pairs = [(int(label), int(token)) for label, token in PAIR.findall(body)]
    assert len(pairs) > 10
    assert all(label in (-100, token) for label, token in pairs)  # masked, or trained on itself
    assert pairs[0][0] == -100 and pairs[-1][0] != -100  # prompt masked, answer + EOS trained
    assert body.startswith("Below(-100, ")
    assert body.endswith("<|im_end|>(2, 2)")
    assert "Hi(" in body


def test_debug_text_only_prints_the_text(config_path, capsys):
    assert main(["--config", str(config_path), "--debug-text-only"]) == 0
    out = capsys.readouterr().out
    assert "### Instruction:\nSay hi\n\n### Response:\nHi!<|im_end|>" in out
    assert "(-100," not in out


def test_config_keys_are_options_too(config_path, capsys):
    assert main(["--config", str(config_path), "--sequence-len", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the train set is empty") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--learning-rte", "1"], "error: unknown option '--learning-rte'; did you mean 'learning_rate'?"),
    (["--micro-batch-size", "0"], "error: micro_batch_size: expected int (>= 1), got 0"),
    (["--load-in-4bit", "true"], "error: load_in_4bit quantises the frozen base, so it needs an adapter"),
    (["--gptq", "true"], "error: gptq is not supported yet by puretune"),
    (["--base-model", "no/such-model"], "error: model 'no/such-model'"),
])
def test_errors_are_one_line_on_stderr_with_exit_code_2(config_path, capsys, argv, message):
    assert main(["--config", str(config_path), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message)
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_bad_data_file_is_one_line_error(config_path, capsys):
    (config_path.parent / "alpaca.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    assert main(["--config", str(config_path)]) == 2
    assert "alpaca.jsonl: line 2: invalid JSON" in capsys.readouterr().err


def test_help_lists_the_program_and_the_keys(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Tokenise, mask and cache" in out and "--sequence-len" in out


def test_preference_rows_print_field_by_field():
    class Tok:
        def decode(self, ids):
            return " ".join(str(i) for i in ids)

        def batch_decode(self, seqs):
            return [self.decode(s) for s in seqs]

    text = format_example(Tok(), {"prompt": "Q?", "chosen": "yes", "rejected": "no"}, text_only=True)
    assert text == "prompt: Q?\nchosen: yes\nrejected: no"
    tokenised = format_example(Tok(), {"chosen_input_ids": [5, 6], "chosen_labels": [-100, 6]}, text_only=False)
    assert tokenised == "chosen: 5(-100, 5) 6(6, 6)"


def test_iterable_reads_rows_as_a_stream_into_the_same_cache(config_path, capsys):
    assert main(["--config", str(config_path), "--iterable"]) == 0
    out = capsys.readouterr().out
    assert "train: 3 rows -> alpaca.jsonl: kept 3 of 3 examples" in out
    (written,) = list((config_path.parent / "prepared").glob("*/meta.json"))
    assert main(["--config", str(config_path)]) == 0  # the same cache key: reused
    assert "reused the prepared data" in capsys.readouterr().out
    assert list((config_path.parent / "prepared").glob("*/meta.json")) == [written]


def test_a_streamed_config_caches_its_eval_set_and_previews_the_stream(config_path, capsys):
    raw = yaml.safe_load(config_path.read_text())
    raw.update({"streaming": True, "test_datasets": [{"path": "alpaca.jsonl", "type": "alpaca"}]})
    config_path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config_path), "--debug-text-only", "--debug-num-examples", "2"]) == 0
    out = capsys.readouterr().out
    assert "streaming: the train set is tokenised on the fly during training and not cached" in out
    assert "prepared 3 eval examples" in out
    blocks = out.split("--- example ")[1:]
    assert len(blocks) == 2 and "### Instruction:\nSay hi" in blocks[0]  # file order
