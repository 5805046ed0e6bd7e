"""`type: chat_template` masking, written from the documented rules, with the real SmolLM2 tokenizer.

SmolLM2's own template is ChatML and inserts a default system turn when the conversation has none;
its eos token is `<|im_end|>`.
"""
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from pure.data.chat_template import build_chat_template_strategy, split_thinking_content
from pure.data.settings import IGNORE_INDEX, DataError, DataSettings

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tok():
    from backends.hf import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def tokenize(tok, row, settings=None, **ds_cfg):
    ds_cfg.setdefault("path", "test/ds")
    strategy = build_chat_template_strategy(ds_cfg, tok, settings or DataSettings())
    (example,) = strategy(row, 7)
    assert len(example["input_ids"]) == len(example["labels"])
    return example


def pieces(tok, example):
    """[(decoded token, trained?)]"""
    return [(tok.decode([i]), label != IGNORE_INDEX) for i, label in zip(example["input_ids"], example["labels"])]


def trained_text(tok, example):
    return tok.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def trained_runs(tok, example):
    """Decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for i, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def header(role):
    if role == "assistant":
        return [("<|im_start|>", False), ("ass", False), ("istant", False), ("\n", False)]
    return [("<|im_start|>", False), (role, False), ("\n", False)]


ONE_TURN = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}
MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
}


def test_chatml_golden_masking(tok):
    example = tokenize(tok, ONE_TURN)
    system = [(t, False) for t in ("<|im_start|>", "system", "\n")]
    assert pieces(tok, example) == [
        *system,
        *[(tok.decode([i]), False) for i in tok.encode(SMOL_SYSTEM, add_special_tokens=False)],
        ("<|im_end|>", False), ("\n", False),
        *header("user"), ("Hi", False), ("<|im_end|>", False), ("\n", False),
        *header("assistant"), ("Hello", True), (" there", True), ("<|im_end|>", True), ("\n", False),
    ]
    assert example["input_ids"] == tok(tok.apply_chat_template(ONE_TURN["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
    trained = [(i, label) for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert all(i == label for i, label in trained)


def test_multi_turn_train_on_eos_turn_trains_each_trained_turns_eos(tok):
    example = tokenize(tok, MULTI_TURN)
    assert trained_runs(tok, example) == ["Hello<|im_end|>", "Goodbye<|im_end|>"]


def test_train_on_eos_all_trains_every_eos(tok):
    example = tokenize(tok, MULTI_TURN, train_on_eos="all")
    assert trained_runs(tok, example) == ["<|im_end|>", "<|im_end|>", "Hello<|im_end|>", "<|im_end|>", "Goodbye<|im_end|>"]


def test_train_on_eos_last_trains_only_the_final_eos(tok):
    example = tokenize(tok, MULTI_TURN, train_on_eos="last")
    assert trained_runs(tok, example) == ["Hello", "Goodbye<|im_end|>"]


def test_roles_to_train_with_user(tok):
    example = tokenize(tok, MULTI_TURN, roles_to_train=["user", "assistant"])
    assert trained_runs(tok, example) == ["Hi<|im_end|>", "Hello<|im_end|>", "Bye<|im_end|>", "Goodbye<|im_end|>"]


def test_train_on_inputs_trains_every_turns_content_but_no_header(tok):
    example = tokenize(tok, MULTI_TURN, settings=DataSettings(train_on_inputs=True))
    assert trained_runs(tok, example) == ["Be brief.<|im_end|>", "Hi<|im_end|>", "Hello<|im_end|>", "Bye<|im_end|>", "Goodbye<|im_end|>"]


def test_legacy_empty_roles_and_eos_train_only_the_last_message(tok):
    example = tokenize(tok, MULTI_TURN, roles_to_train=None, train_on_eos=None)
    assert trained_runs(tok, example) == ["Goodbye<|im_end|>\n"]


def test_sharegpt_mapping_with_default_roles(tok):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    example = tokenize(tok, row, field_messages="conversations", message_property_mappings={"role": "from", "content": "value"})
    assert trained_runs(tok, example) == ["Hello<|im_end|>"]
    assert "<|im_start|>user\nHi<|im_end|>" in tok.decode(example["input_ids"])


def test_legacy_message_field_role_and_content(tok):
    row = {"turns": [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Yo"}]}
    example = tokenize(tok, row, field_messages="turns", message_field_role="speaker", message_field_content="text")
    assert trained_runs(tok, example) == ["Yo<|im_end|>"]


def test_custom_roles_mapping(tok):
    row = {"messages": [{"role": "person", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}
    example = tokenize(tok, row, roles={"user": ["person"], "assistant": ["bot"]})
    assert "<|im_start|>user\nHi" in tok.decode(example["input_ids"])
    assert trained_runs(tok, example) == ["Yo<|im_end|>"]


DOC_DETAIL_ROW = {
    "conversations": [
        {"from": "system", "value": "You are an AI assistant.", "train": False},
        {"from": "human", "value": "Hello", "train": False},
        {"from": "assistant", "value": "Hello", "train": True},
        {"from": "human", "value": "How are you?", "train": True},
        {
            "from": "assistant",
            "value": "I'm doing very well, thank you!",
            "train_detail": [
                {"begin_offset": 0, "end_offset": 8, "train": False},
                {"begin_offset": 9, "end_offset": 18, "train": True},
                {"begin_offset": 19, "end_offset": 30, "train": False},
            ],
        },
        {"from": "human", "value": "I'm doing very well, thank you!", "train": True},
        {"from": "assistant", "value": "Hi there!", "train": True},
    ]
}


def test_message_field_training_and_training_detail_from_the_docs(tok):
    example = tokenize(
        tok, DOC_DETAIL_ROW, field_messages="conversations", message_property_mappings={"role": "from", "content": "value"},
        roles_to_train=[], train_on_eos="turn", message_field_training="train", message_field_training_detail="train_detail",
    )
    assert trained_runs(tok, example) == [
        "Hello<|im_end|>",
        "How are you?<|im_end|>",
        " very well",  # only the train: true span of the detailed turn ...
        "<|im_end|>",  # ... whose eos is trained because the turn has a detail
        "I'm doing very well, thank you!<|im_end|>",
        "Hi there!<|im_end|>",
    ]


def test_training_detail_character_spans_map_to_overlapping_tokens(tok):
    row = {"messages": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "alpha beta gamma", "detail": [{"begin_offset": 6, "end_offset": 9, "train": True}]},
    ]}
    example = tokenize(tok, row, message_field_training_detail="detail")
    assert trained_runs(tok, example) == [" beta", "<|im_end|>"]


def test_drop_system_message(tok):
    example = tokenize(tok, MULTI_TURN, drop_system_message=True)
    text = tok.decode(example["input_ids"])
    assert "Be brief." not in text
    assert text.startswith(f"<|im_start|>system\n{SMOL_SYSTEM}")  # the template's own default stays


def test_default_system_message_and_system_field(tok):
    example = tokenize(tok, ONE_TURN, settings=DataSettings(default_system_message="Custom sys"))
    assert tok.decode(example["input_ids"]).startswith("<|im_start|>system\nCustom sys<|im_end|>\n<|im_start|>user")
    example = tokenize(tok, {**ONE_TURN, "system": "Row sys"}, settings=DataSettings(default_system_message="Custom sys"))
    assert tok.decode(example["input_ids"]).startswith("<|im_start|>system\nRow sys<|im_end|>\n")


def test_per_dataset_chat_template_overrides_the_global_one(tok):
    example = tokenize(tok, ONE_TURN, settings=DataSettings(chat_template="gemma"), chat_template="chatml")
    assert tok.decode(example["input_ids"]).startswith("<|im_start|>user\nHi")
    example = tokenize(tok, ONE_TURN, settings=DataSettings(chat_template="gemma"))
    assert "<start_of_turn>model\nHello there<end_of_turn>" in tok.decode(example["input_ids"])


def test_template_that_trims_content_trains_the_trimmed_text(tok):
    row = {"messages": [{"role": "user", "content": "  Hi  "}, {"role": "assistant", "content": "  Hello  \n"}]}
    example = tokenize(tok, row, chat_template="llama3")
    assert trained_runs(tok, example) == ["Hello"]  # <|eot_id|> is not a token of this tokenizer; eos is absent


def test_eot_tokens_follow_train_on_eot(tok):
    # user turns end with <|endoftext|> (an EOT token), assistant turns with eos <|im_end|>
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'U:\n' + m['content'] + '<|endoftext|>' }}"
        "{% else %}{{ 'A:\n' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    settings = DataSettings(eot_tokens=("<|endoftext|>",), chat_template="jinja", chat_template_jinja=template)
    example = tokenize(tok, row, settings=settings, train_on_eot="all", train_on_eos="turn")
    assert trained_runs(tok, example) == ["<|endoftext|>", "Yo<|im_end|>", "<|endoftext|>", "Ciao<|im_end|>"]
    example = tokenize(tok, row, settings=settings, train_on_eot="turn", train_on_eos="last")
    assert trained_runs(tok, example) == ["Yo", "Ciao<|im_end|>"]


def test_multi_token_eot_is_rejected(tok):
    with pytest.raises(DataError, match="single token"):
        tokenize(tok, ONE_TURN, settings=DataSettings(eot_tokens=("[/INST]",)))


def test_conflicting_eos_and_eot_policies_are_rejected(tok):
    with pytest.raises(DataError, match="must agree"):
        tokenize(tok, ONE_TURN, settings=DataSettings(eot_tokens=("<|im_end|>",)), train_on_eos="turn", train_on_eot="all")


def test_unknown_train_on_eos_is_rejected(tok):
    with pytest.raises(DataError, match="train_on_eos"):
        tokenize(tok, ONE_TURN, train_on_eos="sometimes")


def test_missing_field_messages_names_dataset_row_and_field(tok):
    with pytest.raises(DataError) as err:
        tokenize(tok, {"conversations": []})
    assert "test/ds" in str(err.value) and "row 7" in str(err.value) and "'messages'" in str(err.value)


def test_unlocatable_turn_names_row_and_turn(tok):
    users_only = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    with pytest.raises(DataError) as err:
        tokenize(tok, ONE_TURN, chat_template="jinja", chat_template_jinja=users_only)
    assert "row 7, turn 1" in str(err.value) and "test/ds" in str(err.value)


def test_chat_template_kwargs_from_settings_and_dataset(tok):
    template = "{{ greeting }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    settings = DataSettings(chat_template="jinja", chat_template_jinja=template, chat_template_kwargs={"greeting": "G1 "})
    assert tok.decode(tokenize(tok, ONE_TURN, settings=settings)["input_ids"]).startswith("G1 Hi")
    example = tokenize(tok, ONE_TURN, settings=settings, chat_template_kwargs={"greeting": "G2 "})
    assert tok.decode(example["input_ids"]).startswith("G2 Hi")
    assert trained_runs(tok, example) == ["Hello there<|im_end|>"]


def test_tool_calls_are_trained_and_tool_results_masked(tok):
    row = {
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": '{"type": "object"}'}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ],
    }
    example = tokenize(tok, row, chat_template="qwen2_5")
    assert trained_runs(tok, example) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is sunny.<|im_end|>",
    ]
    assert "<tools>\n" in tok.decode(example["input_ids"])


def test_split_thinking_with_qwen3(tok):
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>add them</think>The answer is 4."}]}
    example = tokenize(tok, row, chat_template="qwen3", split_thinking=True)
    assert trained_runs(tok, example) == ["<think>\nadd them\n</think>\n\nThe answer is 4.<|im_end|>"]
    assert split_thinking_content("<think> r </think>\n c") == ("r", "c")


def test_reasoning_field_is_passed_to_the_template(tok):
    row = {"messages": [{"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A", "thoughts": "R"}]}
    example = tokenize(tok, row, chat_template="qwen3", field_thinking="thoughts")
    assert trained_runs(tok, example) == ["<think>\nR\n</think>\n\nA<|im_end|>"]


# ----------------------------------------------------------------------------- properties

_text = st.text(
    alphabet=st.one_of(st.characters(min_codepoint=32, max_codepoint=0x2FFF, blacklist_categories=("Cs", "Cc", "Zl", "Zp")),
                       st.sampled_from(["\n", " ", "é", "日", "🎉"])),
    min_size=1, max_size=40,
).map(str.strip).filter(lambda s: s and "<|" not in s and "\ue000" not in s)


@st.composite
def conversations(draw):
    n = draw(st.integers(1, 3))
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_text)})
    for _ in range(n):
        messages.append({"role": "user", "content": draw(_text)})
        messages.append({"role": "assistant", "content": draw(_text)})
    return {"messages": messages}


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=conversations(), eos=st.sampled_from(["turn", "all", "last"]),
       roles=st.sampled_from([["assistant"], ["user", "assistant"], ["user"]]))
def test_labels_are_ids_or_masked_and_trained_turns_decode_to_their_content(tok, row, eos, roles):
    example = tokenize(tok, row, train_on_eos=eos, roles_to_train=roles)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    assert all(label == IGNORE_INDEX or label == i for i, label in zip(ids, labels))
    eos_id = tok.eos_token_id
    content_ids = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX and i != eos_id]
    expected = "".join(m["content"] for m in row["messages"] if m["role"] in roles)
    assert tok.decode(content_ids) == expected
    trained_eos = sum(1 for i, label in zip(ids, labels) if label != IGNORE_INDEX and i == eos_id)
    n_trained_turns = sum(1 for m in row["messages"] if m["role"] in roles)
    # "all" counts the conversation's turns, not the system text SmolLM's template adds on its own
    assert trained_eos == {"turn": n_trained_turns, "all": len(row["messages"]), "last": 1}[eos]
