"""Preference formats produce the documented prompt/chosen/rejected strings; ids follow TRL's rules."""
import pytest

from pure.data.debug import format_preference
from pure.data.preference import build_preference_strategy, truncate_keep_end
from pure.data.settings import IGNORE_INDEX, DataError, DataSettings


@pytest.fixture(scope="module")
def tok():
    from backends.hf import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def run(tok, kind, type_spec, row, settings=None, **ds_cfg):
    ds_cfg.setdefault("path", "test/prefs")
    (example,) = build_preference_strategy(kind, type_spec, ds_cfg, tok, settings or DataSettings())(row, 3)
    return example


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


CHATML_SYS = "<|im_start|>system\nSys<|im_end|>\n"
CHATML_USER = "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
L3_SYS = "<|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>"
L3_USER = "<|start_header_id|>user<|end_header_id|>\n\nQ?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
PAIR = {"chosen": "Good", "rejected": "Bad"}
CHAT_PAIR = {
    "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Good"}],
    "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Bad"}],
}

DPO_ROWS = {  # format: (row with a system, row without)
    "argilla": ({"system": "Sys", "instruction": "Q?", "chosen_response": "Good", "rejected_response": "Bad"},
                {"instruction": "Q?", "chosen_response": "Good", "rejected_response": "Bad"}),
    "icr": ({"system": "Sys", "input": "Q?", **PAIR}, {"input": "Q?", **PAIR}),
    "intel": ({"system": "Sys", "question": "Q?", **PAIR}, {"question": "Q?", **PAIR}),
    "prompt_pairs": ({"system": "Sys", "prompt": "Q?", **PAIR}, {"prompt": "Q?", **PAIR}),
    "ultra": ({"system": "Sys", "prompt": "Q?", **CHAT_PAIR}, {"prompt": "Q?", **CHAT_PAIR}),
}
FAMILY = {"chatml": (CHATML_SYS, CHATML_USER, "<|im_end|>"), "llama3": (L3_SYS, L3_USER, "<|eot_id|>")}


@pytest.mark.parametrize("family", sorted(FAMILY))
@pytest.mark.parametrize("fmt", sorted(DPO_ROWS))
def test_dpo_formats_render_the_documented_strings(tok, family, fmt):
    system, user, eot = FAMILY[family]
    with_system, without = DPO_ROWS[fmt]
    example = run(tok, "dpo", f"{family}.{fmt}", with_system)
    assert example["prompt"] == system + user
    assert (example["chosen"], example["rejected"]) == ("Good" + eot, "Bad" + eot)
    assert run(tok, "dpo", f"{family}.{fmt}", without)["prompt"] == user


def test_chatml_intel_ids_are_prompt_then_completion_only(tok):
    example = run(tok, "dpo", "chatml.intel", {"system": "Sys", "question": "Q?", **PAIR})
    assert example["prompt"] == "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert example["chosen"] == "Good<|im_end|>"
    assert example["prompt_ids"] == ids(tok, example["prompt"])
    assert example["chosen_ids"] == ids(tok, "Good<|im_end|>")  # ends with eos already: none appended
    assert example["rejected_ids"] == ids(tok, "Bad<|im_end|>")
    assert example["truncated"] is False


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_argilla_chat_takes_the_prompt_from_the_conversation(tok, family):
    _, user, eot = FAMILY[family]
    example = run(tok, "dpo", f"{family}.argilla_chat", CHAT_PAIR)
    assert (example["prompt"], example["chosen"], example["rejected"]) == (user, "Good" + eot, "Bad" + eot)


def test_ipo_and_simpo_use_the_dpo_formats(tok):
    for kind in ("ipo", "simpo"):
        example = run(tok, kind, "chatml.intel", {"question": "Q?", **PAIR})
        assert example["prompt"] == CHATML_USER and example["chosen"] == "Good<|im_end|>"


def test_chat_template_default_with_field_names_and_mappings(tok):
    row = {
        "conv": [{"from": "system", "value": "Sys"}, {"from": "human", "value": "Q?"}],
        "good": {"from": "gpt", "value": "Good"},
        "bad": {"from": "gpt", "value": "Bad"},
    }
    example = run(tok, "dpo", "chat_template.default", row, field_messages="conv", field_chosen="good", field_rejected="bad",
                  message_property_mappings={"role": "from", "content": "value"},
                  roles={"user": ["human"], "assistant": ["gpt"], "system": ["system"]})
    assert example["prompt"] == CHATML_SYS + CHATML_USER
    assert (example["chosen"], example["rejected"]) == ("Good<|im_end|>", "Bad<|im_end|>")


def test_chat_template_uses_the_tokenizer_default(tok):
    example = run(tok, "dpo", "chat_template.argilla_chat", CHAT_PAIR)
    smol_system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert example["prompt"] == smol_system + CHATML_USER
    assert example["chosen"] == "Good<|im_end|>"


def test_chat_template_with_a_builtin_template(tok):
    example = run(tok, "dpo", "chat_template.default", {"messages": "Q?", "chosen": "Good", "rejected": "Bad"}, chat_template="llama3")
    assert example["prompt"] == "<|im_start|>" + L3_USER  # llama3's bos_token is this tokenizer's bos
    assert example["chosen"] == "Good<|eot_id|>"


def test_orpo_chat_template_argilla(tok):
    row = {"system": "Sys", "prompt": "Q?", **CHAT_PAIR}
    example = run(tok, "orpo", "chat_template.argilla", row, settings=DataSettings(chat_template="chatml"))
    assert example["prompt"] == CHATML_SYS + CHATML_USER
    assert (example["chosen"], example["rejected"]) == ("Good<|im_end|>", "Bad<|im_end|>")
    # without `prompt`, the conversation before the last turn is the prompt
    example = run(tok, "orpo", "chat_template.argilla", CHAT_PAIR, settings=DataSettings(chat_template="chatml"))
    assert example["prompt"] == CHATML_USER


def test_zephyr_nectar_prefers_the_best_ranked_answer(tok):
    row = {"prompt": "Q?", "answers": [{"answer": "ok", "rank": 2}, {"answer": "best", "rank": 1}, {"answer": "bad", "rank": 3}]}
    example = run(tok, "dpo", "zephyr.nectar", row)
    assert example["prompt"] == "<|system|>\n</s>\n<|user|>\nQ?</s>\n<|assistant|>\n"
    assert (example["chosen"], example["rejected"]) == ("best", "ok")
    assert example["chosen_ids"] == ids(tok, "best") + [tok.eos_token_id]  # eos appended as TRL does


def test_passthrough(tok):
    example = run(tok, "dpo", "passthrough", {"prompt": "P", "chosen": "C", "rejected": "R"})
    assert (example["prompt"], example["chosen"], example["rejected"]) == ("P", "C", "R")


def test_user_defined_dpo(tok):
    spec = {"field_prompt": "q", "field_system": "sys", "field_chosen": "a", "field_rejected": "b",
            "prompt_format": "[{system}] {prompt} ->", "chosen_format": "{chosen}.", "rejected_format": "{rejected}?"}
    example = run(tok, "dpo", spec, {"q": "Q", "sys": "S", "a": "A", "b": "B"})
    assert (example["prompt"], example["chosen"], example["rejected"]) == ("[S] Q ->", "A.", "B?")
    plain = run(tok, "dpo", {}, {"prompt": "Q", **PAIR})
    assert (plain["prompt"], plain["chosen"], plain["rejected"]) == ("Q", "Good", "Bad")


KTO_ROWS = {
    "argilla": {"system": "Sys", "instruction": "Q?", "completion": "Good"},
    "intel": {"system": "Sys", "question": "Q?", "completion": "Good"},
    "prompt_pairs": {"system": "Sys", "prompt": "Q?", "completion": "Good"},
    "ultra": {"system": "Sys", "prompt": "Q?", "completion": "Good"},
}


@pytest.mark.parametrize("family", sorted(FAMILY))
@pytest.mark.parametrize("fmt", sorted(KTO_ROWS))
def test_kto_formats(tok, family, fmt):
    system, user, eot = FAMILY[family]
    example = run(tok, "kto", f"{family}.{fmt}", {**KTO_ROWS[fmt], "label": True})
    assert (example["prompt"], example["completion"], example["label"]) == (system + user, "Good" + eot, True)
    assert example["prompt_ids"] == ids(tok, system + user)
    assert set(example) >= {"prompt_ids", "completion_ids", "label", "prompt", "completion", "truncated"}


def test_kto_argilla_chat_both_documented_layouts(tok):
    convo = {"completion": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Good"}], "label": False}
    example = run(tok, "kto", "chatml.argilla_chat", convo)
    assert (example["prompt"], example["completion"], example["label"]) == (CHATML_USER, "Good<|im_end|>", False)
    split = {"chosen": [{"role": "user", "content": "Q?"}], "completion": [{"role": "assistant", "content": "Good"}], "label": "true"}
    example = run(tok, "kto", "chatml.argilla_chat", split)
    assert (example["prompt"], example["completion"], example["label"]) == (CHATML_USER, "Good<|im_end|>", True)


def test_kto_user_defined_and_labels(tok):
    spec = {"field_prompt": "q", "field_completion": "c", "field_label": "ok",
            "prompt_format": "Q: {prompt}\nA: ", "completion_format": "{completion}"}
    example = run(tok, "kto", spec, {"q": "1+1", "c": "2", "ok": 1})
    assert (example["prompt"], example["completion"], example["label"]) == ("Q: 1+1\nA: ", "2", True)
    with pytest.raises(DataError, match="row 3.*label"):
        run(tok, "kto", spec, {"q": "1+1", "c": "2", "ok": "maybe"})


def test_kto_rejects_pair_only_types(tok):
    with pytest.raises(DataError, match="unknown kto dataset type"):
        run(tok, "kto", "chatml.icr", {"input": "Q", "completion": "C", "label": True})


def test_reward_model_bradley_terry_chat_template(tok):
    row = {"system": "Sys", "input": "Q?", **PAIR}
    example = run(tok, "rm", "bradley_terry.chat_template", row, settings=DataSettings(chat_template="chatml"))
    assert example["chosen"] == CHATML_SYS + CHATML_USER + "Good<|im_end|>"
    assert example["rejected"] == CHATML_SYS + CHATML_USER + "Bad<|im_end|>"
    assert example["chosen_input_ids"] == ids(tok, example["chosen"])
    assert example["rejected_input_ids"] == ids(tok, example["rejected"])


def test_reward_model_llama3_icr(tok):
    example = run(tok, "rm", "bradley_terry.llama3.icr", {"input": "Q?", **PAIR})
    assert example["chosen"] == L3_USER + "Good<|eot_id|>"
    assert example["rejected_input_ids"] == ids(tok, L3_USER + "Bad<|eot_id|>")


def test_process_reward_model_labels_sit_on_each_steps_last_token(tok):
    row = {"prompt": "Which is larger?", "completions": ["9.8 is larger", "so 9.11 is smaller"], "labels": [True, False]}
    example = run(tok, "prm", "stepwise_supervised", row)
    step1, step2 = ids(tok, "9.8 is larger") + ids(tok, "\n"), ids(tok, "so 9.11 is smaller") + ids(tok, "\n")
    prompt = [tok.bos_token_id] + ids(tok, "Which is larger?")
    assert example["input_ids"] == prompt + step1 + step2
    expected = [IGNORE_INDEX] * (len(prompt) + len(step1) - 1) + [1] + [IGNORE_INDEX] * (len(step2) - 1) + [0]
    assert example["labels"] == expected
    last_only = run(tok, "prm", "stepwise_supervised", row, train_on_last_step_only=True)
    assert [label for label in last_only["labels"] if label != IGNORE_INDEX] == [0]


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_completions(tok):
    question = " ".join(f"w{i}" for i in range(60))
    answer = " ".join(f"a{i}" for i in range(60))
    row = {"question": question, "chosen": answer, "rejected": "short"}
    full = run(tok, "dpo", "chatml.intel", row)
    settings = DataSettings(max_prompt_len=20, sequence_len=50)
    cut = run(tok, "dpo", "chatml.intel", row, settings=settings)
    assert cut["truncated"] is True and full["truncated"] is False
    assert cut["prompt_ids"] == full["prompt_ids"][-20:]
    assert cut["chosen_ids"] == full["chosen_ids"][:30]
    assert cut["rejected_ids"] == full["rejected_ids"]  # fits: untouched
    assert len(cut["prompt_ids"]) + len(cut["chosen_ids"]) <= 50


def test_truncate_keep_end_rules():
    prompt, (a, b), cut = truncate_keep_end(list(range(10)), [[1] * 3, [2] * 8], max_prompt_len=6, sequence_len=10)
    assert (prompt, a, b, cut) == (list(range(4, 10)), [1] * 3, [2] * 4, True)
    prompt, (a,), cut = truncate_keep_end([1, 2], [[3]], max_prompt_len=None, sequence_len=10)
    assert (prompt, a, cut) == ([1, 2], [3], False)
    prompt, (a,), cut = truncate_keep_end(list(range(12)), [[3, 3]], max_prompt_len=None, sequence_len=10)
    assert prompt == list(range(7, 12)) and a == [3, 3] and cut


def test_missing_field_names_dataset_row_and_field(tok):
    with pytest.raises(DataError) as err:
        run(tok, "dpo", "chatml.intel", {"question": "Q?", "chosen": "Good"})
    message = str(err.value)
    assert "test/prefs" in message and "row 3" in message and "rejected" in message


def test_unknown_type_lists_known_types(tok):
    with pytest.raises(DataError) as err:
        run(tok, "dpo", "chatml.nope", {})
    assert "chatml.intel" in str(err.value) and "chat_template.default" in str(err.value)
    with pytest.raises(DataError, match="unknown preference kind"):
        build_preference_strategy("ppo", "chatml.intel", {}, tok, DataSettings())


def test_format_preference_prints_prompt_chosen_rejected(tok):
    example = run(tok, "dpo", "chatml.intel", {"question": "Q?", **PAIR})
    text = format_preference(example, color=False)
    assert text == f"prompt: {CHATML_USER}\nchosen: Good<|im_end|>\nrejected: Bad<|im_end|>"
    assert "\033[" in format_preference(example)
    kto = run(tok, "kto", "chatml.intel", {"question": "Q?", "completion": "C", "label": False})
    assert "completion: C<|im_end|>" in format_preference(kto, color=False)
    assert "label: False" in format_preference(kto, color=False)
