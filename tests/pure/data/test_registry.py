"""`resolve_strategy`: which builder a dataset entry's `type:` goes to, and user transforms (imported by
`backends.user_code.entry_strategy`, handed to pure as a callable)."""
from __future__ import annotations

import sys
import types

import pytest

from backends.user_code import entry_strategy
from pure.data import registry
from pure.data.registry import resolve_strategy
from pure.data.settings import DataError, DataSettings

SETTINGS = DataSettings(sequence_len=64)
TOKENIZER = object()


@pytest.fixture
def builders(monkeypatch):
    """Stand-in builder modules that record what they were asked for."""
    calls = []

    def module(name, fn_name, tag, known=None):
        mod = types.ModuleType(name)

        def build(*args):
            type_spec = args[1] if tag == "preference" else (args[0] if tag == "instruct" else "chat_template")
            if known is not None and type_spec not in known:
                raise DataError(f"unknown dataset type {type_spec!r}")
            calls.append((tag, args))
            return lambda row, index: [{"from": tag, "row": row}]

        setattr(mod, fn_name, build)
        monkeypatch.setitem(sys.modules, name, mod)

    module("pure.data.instruct", "build_instruct_strategy", "instruct", known={"alpaca", "completion", None})
    module("pure.data.chat_template", "build_chat_template_strategy", "chat_template")
    module("pure.data.preference", "build_preference_strategy", "preference",
           known={"chatml.intel", "passthrough", "stepwise_supervised"})
    return calls


@pytest.mark.parametrize("kind, type_spec, builder", [
    ("sft", "chat_template", "chat_template"),
    ("sft", "alpaca", "instruct"),
    ("sft", None, "instruct"),
    ("dpo", "chatml.intel", "preference"),
    ("kto", "chatml.intel", "preference"),
    ("rm", "chatml.intel", "preference"),
    ("prm", "stepwise_supervised", "preference"),
])
def test_dispatch_by_kind_and_type(builders, kind, type_spec, builder):
    row_fn = resolve_strategy(kind, {"path": "d.jsonl", "type": type_spec}, TOKENIZER, SETTINGS)
    assert row_fn({"x": 1}, 0) == [{"from": builder, "row": {"x": 1}}]
    tag, args = builders[-1]
    assert tag == builder and TOKENIZER in args and SETTINGS in args
    if builder == "preference":
        assert args[0] == kind


def test_unknown_type_that_is_not_importable_keeps_the_builder_error(builders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="unknown dataset type 'alpacca'"):
        entry_strategy("sft", {"path": "d", "type": "alpacca"}, TOKENIZER, SETTINGS)
    with pytest.raises(DataError, match="unknown dataset type 'nowhere.fn'"):
        entry_strategy("sft", {"path": "d", "type": "nowhere.fn"}, TOKENIZER, SETTINGS)


def test_unknown_kind():
    with pytest.raises(DataError, match="unknown training kind 'pretrain'"):
        resolve_strategy("pretrain", {"type": "alpaca"}, TOKENIZER, SETTINGS)


TRANSFORMS = '''
def prompt_answer(cfg, *args, **kwargs):
    assert cfg.sequence_len == 64 and cfg.missing_key is None
    seen_index.append(kwargs.get("dataset_idx"))

    def map_fn(example, tokenizer=None):
        return {"prompt": [{"role": "user", "content": example["question"]}], "tok": tokenizer is not None}

    return map_fn, {"remove_columns": ["question"]}


def strip_all(cfg):
    return (lambda example: {"prompt": example["question"].upper()}), {"remove_columns": "__all__"}


def dpo_texts(cfg, **kwargs):
    return lambda example: {"prompt": example["q"], "chosen": "a", "rejected": "b"}


seen_index = []
'''


@pytest.fixture
def transforms_module(tmp_path, monkeypatch):
    (tmp_path / "my_transforms.py").write_text(TRANSFORMS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_transforms", raising=False)
    yield
    sys.modules.pop("my_transforms", None)


def test_dotted_transform_from_the_working_directory_keeps_unremoved_columns(builders, transforms_module):
    row_fn = entry_strategy("grpo", {"path": "d", "type": "my_transforms.prompt_answer"}, "tok", SETTINGS,
                              dataset_index=3)
    out = row_fn({"question": "2+2?", "answer": "4"}, 0)
    assert out == [{"answer": "4", "prompt": [{"role": "user", "content": "2+2?"}], "tok": True}]
    assert sys.modules["my_transforms"].seen_index == [3]


def test_transform_remove_all_columns(builders, transforms_module):
    row_fn = entry_strategy("sft", {"path": "d", "type": "my_transforms.strip_all"}, TOKENIZER, SETTINGS)
    assert row_fn({"question": "hi", "answer": "x"}, 0) == [{"prompt": "HI"}]


def test_preference_transform_output_is_tokenised_by_the_passthrough_strategy(builders, transforms_module):
    row_fn = entry_strategy("dpo", {"path": "d", "type": "my_transforms.dpo_texts"}, TOKENIZER, SETTINGS)
    out = row_fn({"q": "why?"}, 0)
    assert out == [{"from": "preference", "row": {"q": "why?", "prompt": "why?", "chosen": "a", "rejected": "b"}}]
    assert builders[-1][1][1] == "passthrough"


def test_transform_failure_names_the_row(builders, transforms_module):
    row_fn = entry_strategy("sft", {"path": "d.jsonl", "type": "my_transforms.strip_all"}, TOKENIZER, SETTINGS)
    with pytest.raises(DataError, match=r"dataset 'd.jsonl' row 5: transform 'my_transforms.strip_all' failed: KeyError"):
        row_fn({"other": 1}, 5)


def test_a_transform_callable_is_used_without_importing_anything(builders):
    def upper(cfg, dataset_idx=0):
        assert dataset_idx == 2
        return lambda example: {"prompt": example["q"].upper()}

    row_fn = resolve_strategy("grpo", {"path": "d", "type": "not.a.module"}, TOKENIZER, SETTINGS,
                              dataset_index=2, transform=upper)
    assert row_fn({"q": "hi"}, 0) == [{"q": "hi", "prompt": "HI"}]
    assert "not" not in sys.modules and not builders


def test_the_working_directory_is_on_sys_path_only_for_the_import(builders, transforms_module, tmp_path):
    entry_strategy("sft", {"path": "d", "type": "my_transforms.strip_all"}, TOKENIZER, SETTINGS)
    assert str(tmp_path) not in sys.path and "my_transforms" in sys.modules


def test_online_kinds_without_type_pass_rows_through(builders):
    assert resolve_strategy("ebft", {"path": "d"}, TOKENIZER, SETTINGS)({"prompt": "p"}, 0) == [{"prompt": "p"}]
    with pytest.raises(DataError, match="rl: grpo datasets need `type:` to be a transform"):
        resolve_strategy("grpo", {"path": "d", "type": "alpaca"}, TOKENIZER, SETTINGS)


def test_dict_default_reads_missing_keys_as_none():
    cfg = registry._to_dict_default({"a": {"b": 1}})
    assert cfg.a.b == 1 and cfg.nothing is None and cfg["nothing"] is None
