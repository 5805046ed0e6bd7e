"""`read_jinja`: one rule for "a Jinja string or the path of a .jinja file", global and per dataset."""
from __future__ import annotations

import pytest

from backends.hf import load_tokenizer
from backends.templates import read_jinja
from backends.user_code import entry_strategy
from pure.data.settings import DataError, DataSettings

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def test_inline_text_is_the_template_and_a_path_is_read(tmp_path):
    assert read_jinja(TEMPLATE, "chat_template_jinja") == TEMPLATE
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    assert read_jinja(str(tmp_path / "chat.jinja"), "chat_template_jinja") == TEMPLATE


def test_a_value_that_is_neither_template_nor_file_names_the_key_and_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"chat_template_jinja: './chat.jinja' is neither .*looked at "
                                         + str(tmp_path)):
        read_jinja("./chat.jinja", "chat_template_jinja")


def test_a_dataset_level_template_file_is_read_before_the_strategy_is_built(tmp_path):
    tok = load_tokenizer("smollm2-135m-instruct")
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    entry = {"path": "chat.jsonl", "type": "chat_template", "chat_template": "jinja",
             "chat_template_jinja": str(tmp_path / "chat.jinja")}
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    [example] = entry_strategy("sft", entry, tok, DataSettings())(row, 0)
    assert tok.decode(example["input_ids"]).startswith("[user] Hi\n[assistant] Hello")
    with pytest.raises(DataError, match=r"dataset 'chat.jsonl': chat_template_jinja: '\./chat\.jinja' is neither"):
        entry_strategy("sft", {**entry, "chat_template_jinja": "./chat.jinja"}, tok, DataSettings())
