"""GRPO prompt datasets: a user transform maps each row as `datasets.map` would (output over the row,
`remove_columns` dropped), every row must end up with a prompt, and prompts tokenise as TRL
tokenises them (chat template with the generation prompt; plain text as is)."""
import json
import sys

import pytest

from backends.prompt_data import load_prompt_rows, split_prompt_rows, tokenize_prompts
from pure.data.settings import DataError

TRANSFORMS = '''
SEEN = []


def question_prompt(cfg, *args, **kwargs):
    SEEN.append((cfg["rl"], kwargs.get("dataset_idx")))

    def map_fn(example, tokenizer=None):
        return {"prompt": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": example["question"]}],
                "answer": example["answer"].strip()}

    return map_fn, {"remove_columns": ["question"]}


def only_prompt(cfg):
    return lambda example: {"prompt": "Q: " + example["question"]}, {"remove_columns": "__all__"}


def bare_map_fn(cfg):
    return lambda example: {"prompt": example["question"]}


def fails_on_row_2(cfg):
    def map_fn(example, tokenizer=None):
        return {"prompt": example["question"], "length": 1 / (example["id"] - 2)}

    return map_fn, {}


def no_prompt(cfg):
    return lambda example: {"text": example["question"]}, {"remove_columns": "__all__"}
'''

ROWS = [{"id": i, "question": f"What is {i}+{i}?", "answer": f" {2 * i} ", "source": "gsm"} for i in range(4)]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "my_transforms.py").write_text(TRANSFORMS)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_transforms", raising=False)
    yield tmp_path
    sys.modules.pop("my_transforms", None)


def test_transform_output_goes_over_the_row_less_its_removed_columns(workdir):
    rows = load_prompt_rows([{"path": "rows.jsonl", "type": "my_transforms.question_prompt"}],
                            config={"rl": "grpo"})
    assert len(rows) == 4
    assert rows[1] == {"id": 1, "answer": "2", "source": "gsm",
                       "prompt": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 1+1?"}]}
    assert sys.modules["my_transforms"].SEEN == [("grpo", 0)]  # cfg and dataset_idx reach the transform


def test_remove_all_columns_and_a_bare_map_fn(workdir):
    entries = [{"path": "rows.jsonl", "type": "my_transforms.only_prompt", "split": "train[:2]"},
               {"path": "rows.jsonl", "type": "my_transforms.bare_map_fn", "split": "train[:1]"}]
    rows = load_prompt_rows(entries)
    assert rows == [{"prompt": "Q: What is 0+0?"}, {"prompt": "Q: What is 1+1?"},
                    {**ROWS[0], "prompt": "What is 0+0?"}]


def test_rows_that_already_hold_prompts_load_as_they_are(workdir):
    (workdir / "prompts.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "x": 1}) + "\n")
    assert load_prompt_rows([{"path": "prompts.jsonl"}]) == [{"prompt": [{"role": "user", "content": "hi"}], "x": 1}]


def test_a_row_without_a_prompt_names_the_dataset_and_row(workdir):
    with pytest.raises(DataError, match=r"^dataset rows.jsonl row 0: no 'prompt' column \(found \['answer', 'id', "
                                        r"'question', 'source'\]\); a GRPO row needs prompt"):
        load_prompt_rows([{"path": "rows.jsonl"}])
    with pytest.raises(DataError, match=r"dataset rows.jsonl row 0: no 'prompt' column \(found \['text'\]\)"):
        load_prompt_rows([{"path": "rows.jsonl", "type": "my_transforms.no_prompt"}])


def test_a_prompt_of_the_wrong_shape_names_the_row(workdir):
    (workdir / "bad.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "ok"}) + "\n"
                                       + json.dumps({"prompt": [{"text": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"dataset bad.jsonl row 2: 'prompt' is a list whose message 0 has keys "):
        load_prompt_rows([{"path": "bad.jsonl"}])


def test_a_failing_map_fn_names_the_dataset_and_row(workdir):
    with pytest.raises(DataError, match=r"dataset 'rows.jsonl' row 2: transform 'my_transforms.fails_on_row_2' "
                                        r"failed: ZeroDivisionError"):
        load_prompt_rows([{"path": "rows.jsonl", "type": "my_transforms.fails_on_row_2"}])


@pytest.mark.parametrize("type_spec, message", [
    ("nowhere.transform", r"dataset rows.jsonl: dataset transform 'nowhere.transform': module 'nowhere' not found"),
    ("my_transforms.absent", r"dataset rows.jsonl: dataset transform 'my_transforms.absent': module 'my_transforms' "
                             r"\(.*\) has no attribute 'absent'"),
])
def test_a_transform_that_does_not_resolve_says_why(workdir, type_spec, message):
    with pytest.raises(DataError, match=message):
        load_prompt_rows([{"path": "rows.jsonl", "type": type_spec}])


# ---------------------------------------------------------------------------------------------
# Tokenising prompts


@pytest.fixture(scope="module")
def tokenizer():
    from backends.hf import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


CHAT = [{"role": "user", "content": "What is 2+2?"}]


def test_chat_prompts_get_the_generation_prompt_and_plain_prompts_their_text(tokenizer):
    rows = tokenize_prompts([{"prompt": CHAT, "answer": "4"}, {"prompt": "Q: 2+2\nA:"}], tokenizer)
    chat_ids = rows[0]["prompt_ids"]
    assert rows[0]["answer"] == "4"
    assert chat_ids == list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])
    assert tokenizer.decode(chat_ids).endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert rows[1]["prompt_ids"] == tokenizer("Q: 2+2\nA:")["input_ids"]
    assert tokenizer.decode(rows[1]["prompt_ids"]) == "Q: 2+2\nA:"


def test_chat_template_kwargs_reach_the_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ answer_tag }}{% endif %}")
    (row,) = tokenize_prompts([{"prompt": CHAT}], tok, chat_template_kwargs={"answer_tag": " Answer:"})
    assert tok.decode(row["prompt_ids"]) == "What is 2+2? Answer:"


def test_a_prompt_over_max_prompt_length_is_an_error_unless_truncated_from_the_left(tokenizer):
    rows = [{"prompt": "short"}, {"prompt": "one two three four five six seven"}]
    full = tokenizer(rows[1]["prompt"])["input_ids"]
    with pytest.raises(DataError, match=rf"prompt row 1 has {len(full)} tokens, more than max_prompt_length=4"):
        tokenize_prompts(rows, tokenizer, max_prompt_length=4)
    kept = tokenize_prompts(rows, tokenizer, max_prompt_length=4, truncate=True)
    assert kept[1]["prompt_ids"] == full[-4:]


def test_a_tokenizer_without_a_chat_template_names_the_row(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"prompt row 0: could not tokenise the prompt: ValueError"):
        tokenize_prompts([{"prompt": CHAT}], tok)


def test_split_prompt_rows_is_seeded_and_disjoint():
    rows = [{"prompt": str(i)} for i in range(10)]
    train, evals = split_prompt_rows(rows, 0.2, seed=3)
    assert (len(train), len(evals)) == (8, 2)
    assert sorted(r["prompt"] for r in train + evals) == sorted(r["prompt"] for r in rows)
    assert split_prompt_rows(rows, 0.2, seed=3) == (train, evals)
    assert split_prompt_rows(rows, 0, seed=3) == (rows, [])
    with pytest.raises(DataError, match="leaving none to train on"):
        split_prompt_rows(rows, 10, seed=3)
