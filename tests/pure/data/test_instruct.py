"""Instruct-family strategies: golden masking per type, written from axolotl's documented prompts."""
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from pure.data.instruct import KNOWN_INSTRUCT_TYPES, build_instruct_strategy
from pure.data.settings import IGNORE_INDEX, DataError, DataSettings

DS = {"path": "data.jsonl"}
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n")
CHAT_SYS = ("Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that "
            "appropriately and concisely completes the request.\n\n")

# (type, row, expected prompt text, expected response text before EOS)
GOLDEN = [
    ("alpaca", {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
     ALPACA_NO_INPUT + "### Instruction:\nAdd 2 and 3.\n\n### Response:\n", "5"),
    ("alpaca", {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
     ALPACA + "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n", "hello"),
    ("alpaca", {"instruction": "No input column.", "output": "ok"},
     ALPACA_NO_INPUT + "### Instruction:\nNo input column.\n\n### Response:\n", "ok"),
    ("alpaca:chat", {"instruction": "Hi", "input": "there", "output": "yo"},
     ALPACA + "USER: Hi\nthere\nASSISTANT:", "yo"),
    ("jeopardy", {"question": "This planet is red.", "category": "SPACE", "answer": "Mars"},
     ALPACA + "### Instruction:\nThis planet is red.\n\n### Input:\nSPACE\n\n### Response:\n", "what is Mars"),
    ("oasst", {"INSTRUCTION": "Tell a joke.", "RESPONSE": "No."},
     ALPACA_NO_INPUT + "### Instruction:\nTell a joke.\n\n### Response:\n", "No."),
    ("gpteacher", {"instruction": "Sum", "input": "1 1", "response": "2"},
     ALPACA + "### Instruction:\nSum\n\n### Input:\n1 1\n\n### Response:\n", "2"),
    ("explainchoice", {"question": "Best?", "choices": ["a", "b"], "solution": "a", "explanation": "because"},
     "Choose the answer that best answers the question. Explain your reasoning.\n"
     '### Instruction:\nBest?\n\n### Input:\n- "a"\n- "b"\n\n### Response:\n', "a"),
    ("concisechoice", {"question": "Best?", "choices": ["a"], "explanation": "because"},
     "Choose the answer that best answers the question. Be concise in your response.\n\n"
     'USER: Best?\n- "a"\nASSISTANT:', "because"),
    ("summarizetldr", {"article": "Long text.", "summary": "Short."},
     "USER: Summarize the following article as a TL;DR.\nLong text.\nASSISTANT:", "Short."),
    ("alpaca_chat", {"instruction": "Hi", "input": "", "response": "Hello"},
     ALPACA_NO_INPUT + "USER: Hi\nASSISTANT:", "Hello"),
    ("alpaca_chat.load_qa", {"question": "Why?", "answer": "Because."},
     CHAT_SYS + "USER: Why?\nASSISTANT:", "Because."),
    ("alpaca_chat.load_concise", {"instruction": "Why?", "response": "Because."},
     CHAT_SYS + "USER: Why?\nASSISTANT:", "Because."),
    ("alpaca_chat.load_camel_ai", {"message_1": "What is H2O?", "message_2": "Water."},
     CHAT_SYS + "USER: What is H2O?\nASSISTANT:", "Water."),
    ("alpaca_w_system.load_open_orca", {"system_prompt": "Be brief.", "question": "2+2?", "response": "4"},
     "### System:\nBe brief.\n### Human:\n2+2?\n### Assistant:\n", "4"),
    ("alpaca_w_system.load_open_orca", {"system_prompt": "", "question": "2+2?", "response": "4"},
     "### Human:\n2+2?\n### Assistant:\n", "4"),
    ("context_qa", {"article": "Sky is blue.", "question": "Color?", "answer": "Blue"},
     "Use the following contextual information to concisely answer the question.\n"
     "USER: Sky is blue.\n===\nColor?\nASSISTANT:", "Blue"),
    ("context_qa.load_v2", {"context": "Sky is blue.", "question": "Color?", "answer": "Blue"},
     "Context: Sky is blue.\nQuestion: Color?\n", "Answer: Blue"),
    ("context_qa.load_404", {"article": "Sky is blue.", "unanswerable_question": "Price?"},
     "Use the following contextual information to concisely answer the question.\n"
     "USER: Sky is blue.\n===\nPrice?\nASSISTANT:",
     "The context provided does not contain any information about your inquiry. "
     "Therefore, I'm unable to answer your question based on the given context."),
    ("creative_acr.load_answer", {"instruction": "Write a poem.", "revision": "Roses."},
     "Answer the following question in a comprehensive, in-depth, and creative way. Additionally your "
     "response should be relevant, accurate, and free of any ambiguity.\nUSER: Write a poem.\nASSISTANT:",
     "Roses."),
    ("orcamini", {"system_prompt": "Be kind.", "question": "Hi?", "response": "Hello"},
     "### System:\nBe kind.\n\n### User:\nHi?\n\n### Response:\n", "Hello"),
    ("reflection", {"instruction": "Q", "output": "o", "reflection": "r", "corrected": "c"},
     None, "### Thought:\no\n\n### Agent Reflection:\nr\n\n### Final Response:\nc"),
]


def _encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("type_name,row,prompt,response", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_prompt_is_masked_and_response_plus_eos_is_trained(smollm_tokenizer, type_name, row, prompt, response):
    tok = smollm_tokenizer
    [example] = build_instruct_strategy(type_name, DS, tok, DataSettings())(row, 0)
    target = _encode(tok, response) + [tok.eos_token_id]
    if prompt is not None:
        assert example["input_ids"] == _encode(tok, prompt) + target
    n_prompt = len(example["input_ids"]) - len(target)
    assert example["input_ids"][n_prompt:] == target
    assert example["labels"] == [IGNORE_INDEX] * n_prompt + target


@pytest.mark.parametrize("type_name,row,prompt,response", GOLDEN[:4], ids=[g[0] for g in GOLDEN[:4]])
def test_train_on_inputs_trains_every_token(smollm_tokenizer, type_name, row, prompt, response):
    rows = build_instruct_strategy(type_name, DS, smollm_tokenizer, DataSettings(train_on_inputs=True))
    [example] = rows(row, 0)
    assert example["labels"] == example["input_ids"]


def test_metharme_ends_with_three_eos(smollm_tokenizer):
    tok = smollm_tokenizer
    [ex] = build_instruct_strategy("metharme", DS, tok, DataSettings())({"prompt": "<|user|>Hi", "generation": "Yo"}, 0)
    eos = tok.eos_token_id
    assert ex["input_ids"] == _encode(tok, "<|user|>Hi") + _encode(tok, "Yo") + [eos] * 3
    target = _encode(tok, "Yo") + [eos] * 3
    assert ex["labels"] == [IGNORE_INDEX] * (len(ex["labels"]) - len(target)) + target


def test_user_defined_format(smollm_tokenizer):
    tok = smollm_tokenizer
    spec = {"system_prompt": "", "field_system": "system", "field_instruction": "input", "field_output": "output",
            "format": "[INST] {instruction} [/INST]", "no_input_format": "[INST] {instruction} [/INST]"}
    rows = build_instruct_strategy(spec, DS, tok, DataSettings())
    [ex] = rows({"input": "Hi", "output": "Hello"}, 0)
    prompt = _encode(tok, "[INST] Hi [/INST]")
    assert ex["input_ids"] == prompt + _encode(tok, "Hello") + [tok.eos_token_id]
    assert ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    [ex] = rows({"input": "Hi", "output": "Hello", "system": "SYS. "}, 0)
    assert ex["input_ids"][: len(_encode(tok, "SYS. [INST] Hi [/INST]"))] == _encode(tok, "SYS. [INST] Hi [/INST]")


def test_completion_trains_everything_and_splits_long_texts(smollm_tokenizer):
    tok = smollm_tokenizer
    text = "one two three four five six seven eight nine ten " * 3
    ids = _encode(tok, text) + [tok.eos_token_id]
    rows = build_instruct_strategy("completion", {"path": "c", "field": "body"}, tok, DataSettings(sequence_len=8))
    chunks = rows({"body": text}, 0)
    assert [c["input_ids"] for c in chunks] == [ids[i:i + 8] for i in range(0, len(ids), 8)]
    assert all(c["labels"] == c["input_ids"] for c in chunks)
    with pytest.raises(DataError, match="'body'"):
        rows({"text": text}, 4)


def test_input_output_concatenates_segments_verbatim(smollm_tokenizer):
    tok = smollm_tokenizer
    row = {"segments": [{"label": True, "text": "<|im_start|>Hello\n"}, {"label": True, "text": "hi there!. "},
                        {"label": False, "text": "goodbye "}, {"label": True, "text": "farewell<|im_end|>"}]}
    [ex] = build_instruct_strategy("input_output", DS, tok, DataSettings())(row, 0)
    parts = [_encode(tok, s["text"]) for s in row["segments"]]
    assert ex["input_ids"] == sum(parts, [])
    assert ex["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")  # written by the user, not added
    assert ex["labels"] == parts[0] + parts[1] + [IGNORE_INDEX] * len(parts[2]) + parts[3]


def test_pretokenized_rows_are_validated(smollm_tokenizer):
    rows = build_instruct_strategy(None, DS, smollm_tokenizer, DataSettings())
    row = {"input_ids": [271, 299, 99], "attention_mask": [1, 1, 1], "labels": [271, -100, 99]}
    assert rows(row, 0) == [{"input_ids": [271, 299, 99], "labels": [271, -100, 99]}]
    assert rows({"input_ids": [1, 2, 0], "attention_mask": [1, 1, 0]}, 0) == [{"input_ids": [1, 2], "labels": [1, 2]}]
    with pytest.raises(DataError, match="row 7.*'labels' has 2 entries"):
        rows({"input_ids": [1, 2, 3], "labels": [1, 2]}, 7)
    with pytest.raises(DataError, match="neither -100 nor the token id"):
        rows({"input_ids": [1, 2], "labels": [2, 3]}, 0)


def test_stepwise_supervised_labels_step_ends(smollm_tokenizer):
    tok = smollm_tokenizer
    row = {"prompt": "Which number is larger, 9.8 or 9.11?",
           "completions": ["The fractional part of 9.8 is 0.8.", "So 9.11 is larger."], "labels": [True, False]}
    [ex] = build_instruct_strategy("stepwise_supervised", DS, tok, DataSettings())(row, 0)
    # axolotl's strategy starts the prompt with the tokenizer's BOS whenever it has one (SmolLM2 does)
    prompt, sep = [tok.bos_token_id] + _encode(tok, row["prompt"]), _encode(tok, "\n")
    steps = [_encode(tok, s) + sep for s in row["completions"]]
    assert ex["input_ids"] == prompt + steps[0] + steps[1]
    expected = ([IGNORE_INDEX] * len(prompt) + [IGNORE_INDEX] * (len(steps[0]) - 1) + [1]
                + [IGNORE_INDEX] * (len(steps[1]) - 1) + [0])
    assert ex["labels"] == expected
    with pytest.raises(DataError, match="2 completions but 1 labels"):
        build_instruct_strategy("stepwise_supervised", DS, tok, DataSettings())({**row, "labels": [True]}, 0)


def test_pygmalion_masks_the_model_prefix(smollm_tokenizer):
    tok = smollm_tokenizer
    row = {"conversations": [{"role": "system", "value": "A cat.\n<START>"}, {"role": "human", "value": "Hi"},
                             {"role": "bot", "value": "Meow"}]}
    [ex] = build_instruct_strategy("pygmalion", DS, tok, DataSettings())(row, 0)
    bot = _encode(tok, "<|model|> Meow") + [tok.eos_token_id]
    head = _encode(tok, "<|system|>Persona: A cat.") + _encode(tok, "<|user|> Hi")
    assert ex["input_ids"] == head + bot
    n_prefix = len(_encode(tok, "<|model|>"))
    assert ex["labels"] == [IGNORE_INDEX] * (len(head) + n_prefix) + bot[n_prefix:]


def test_llama2_chat_trains_only_answers(smollm_tokenizer):
    tok = smollm_tokenizer
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Who?"},
                             {"from": "gpt", "value": "Me."}, {"from": "human", "value": "Why?"},
                             {"from": "gpt", "value": "So."}, {"from": "human", "value": "dropped"}]}
    [ex] = build_instruct_strategy("llama2_chat", DS, tok, DataSettings())(row, 0)
    eos = tok.eos_token_id
    turns = [(_encode(tok, "[INST] <<SYS>>\nS\n<</SYS>>\n\nWho? [/INST]"), False),
             (_encode(tok, " Me. ") + [eos], True), (_encode(tok, "[INST] Why? [/INST]"), False),
             (_encode(tok, " So. ") + [eos], True)]
    assert ex["input_ids"] == sum((t for t, _ in turns), [])
    assert ex["labels"] == sum((t if trained else [IGNORE_INDEX] * len(t) for t, trained in turns), [])


def test_missing_field_names_dataset_row_field_and_type(smollm_tokenizer):
    rows = build_instruct_strategy("jeopardy", {"path": "trivia.jsonl"}, smollm_tokenizer, DataSettings())
    with pytest.raises(DataError) as err:
        rows({"question": "q", "answer": "a"}, 12)
    message = str(err.value)
    for part in ("trivia.jsonl", "row 12", "'category'", "'jeopardy'"):
        assert part in message


def test_unknown_type_lists_known_types_and_closest_match(smollm_tokenizer):
    with pytest.raises(DataError) as err:
        build_instruct_strategy("alpaca_chat.load_q", DS, smollm_tokenizer, DataSettings())
    assert "Did you mean 'alpaca_chat.load_qa'?" in str(err.value)
    assert "context_qa.load_v2" in str(err.value)


def test_every_known_type_builds(smollm_tokenizer):
    for name in KNOWN_INSTRUCT_TYPES:
        assert callable(build_instruct_strategy(name, DS, smollm_tokenizer, DataSettings()))


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instruction=TEXT, input_text=TEXT, output=TEXT, train_on_inputs=st.booleans(),
       type_name=st.sampled_from(["alpaca", "alpaca:chat", "gpteacher", "alpaca_chat.load_concise"]))
def test_labels_align_with_ids(smollm_tokenizer, instruction, input_text, output, train_on_inputs, type_name):
    row = {"instruction": instruction, "input": input_text, "output": output, "response": output}
    rows = build_instruct_strategy(type_name, DS, smollm_tokenizer, DataSettings(train_on_inputs=train_on_inputs))
    [ex] = rows(row, 0)
    assert len(ex["labels"]) == len(ex["input_ids"])
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(ex["labels"], ex["input_ids"]))
    target = smollm_tokenizer(output, add_special_tokens=False)["input_ids"] + [smollm_tokenizer.eos_token_id]
    assert ex["input_ids"][len(ex["input_ids"]) - len(target):] == target
    assert ex["labels"][len(ex["labels"]) - len(target):] == target


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(st.tuples(st.booleans(), TEXT), max_size=5))
def test_input_output_labels_align_with_ids(smollm_tokenizer, segments):
    row = {"segments": [{"label": label, "text": text} for label, text in segments]}
    [ex] = build_instruct_strategy("input_output", DS, smollm_tokenizer, DataSettings())(row, 0)
    assert len(ex["labels"]) == len(ex["input_ids"])
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(ex["labels"], ex["input_ids"]))


def test_sft_and_prm_kinds_tokenise_stepwise_rows_alike(smollm_tokenizer):
    from pure.data.preference import build_preference_strategy

    row = {"prompt": "Is 7 prime?", "completions": ["7 has no divisor but 1 and 7.", "So yes."] * 4,
           "labels": ["true", "false"] * 4}
    cfg = {**DS, "max_completion_length": 30}
    settings = DataSettings(sequence_len=24)
    [sft] = build_instruct_strategy("stepwise_supervised", cfg, smollm_tokenizer, settings)(row, 0)
    [prm] = build_preference_strategy("prm", "stepwise_supervised", cfg, smollm_tokenizer, settings)(row, 0)
    assert sft == prm
    assert len(sft["input_ids"]) == 24 and sft["truncated"] and sft["input_ids"][0] == smollm_tokenizer.bos_token_id
