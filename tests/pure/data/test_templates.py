"""Built-in chat templates render like the official model templates; names resolve as documented."""
import pytest

from backends.templates import read_jinja
from pure.data.settings import DataError
from pure.data.templates import CHAT_TEMPLATES, known_template_names, resolve_chat_template


@pytest.fixture(scope="module")
def tok():
    from backends.hf import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


class NoTemplateTokenizer:
    chat_template = None


CONVERSATION = [
    {"role": "system", "content": "Sys"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
]

# bos_token of the SmolLM2 tokenizer is <|im_start|>, eos_token is <|im_end|>.
EXPECTED = {
    "chatml": "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n",
    "llama3": "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>",
    "llama3_2": "<|im_start|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nSys<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>",
    "mistral": "<|im_start|>[INST] Sys\n\nHi [/INST]Hello<|im_end|>",
    "gemma": "<|im_start|><start_of_turn>user\nSys\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n",
    "phi_3": "<|system|>\nSys<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|im_end|>",
    "qwen2_5": "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n",
    "qwen3": "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n",
    "alpaca": "<|im_start|>Sys\n\n### Instruction:\nHi\n\n### Response:\nHello<|im_end|>",
}

GENERATION_PROMPT = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama3_2": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "",
    "gemma": "<start_of_turn>model\n",
    "phi_3": "<|assistant|>\n",
    "qwen2_5": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n",
    "alpaca": "\n\n### Response:\n",
}


def render(tok, template, messages, **kwargs):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_renders_like_the_official_template(tok, name):
    assert render(tok, CHAT_TEMPLATES[name], CONVERSATION) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(GENERATION_PROMPT))
def test_generation_prompt_opens_the_assistant_turn(tok, name):
    prompt = render(tok, CHAT_TEMPLATES[name], CONVERSATION[:2], add_generation_prompt=True)
    without = render(tok, CHAT_TEMPLATES[name], CONVERSATION[:2])
    if name == "phi_3":  # without a generation prompt phi-3 ends the text with eos
        without = without[: -len("<|im_end|>")]
    assert prompt == without + GENERATION_PROMPT[name]


def test_qwen25_adds_its_default_system_message(tok):
    text = render(tok, CHAT_TEMPLATES["qwen2_5"], CONVERSATION[1:])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


def test_qwen3_keeps_reasoning_only_after_the_last_user_query(tok):
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "R2"},
    ]
    text = render(tok, CHAT_TEMPLATES["qwen3"], messages)
    assert "R1" not in text
    assert "<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n" in text


def test_tool_calls_render_in_qwen_format(tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
    ]
    text = render(tok, CHAT_TEMPLATES["qwen2_5"], messages, tools=tools)
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n' in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in text
    assert "<tools>\n" + '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}' in text


def test_tokenizer_default_is_the_tokenizers_own_template(tok):
    assert resolve_chat_template("tokenizer_default", tok) == tok.chat_template
    assert resolve_chat_template(None, tok) == tok.chat_template


def test_tokenizer_default_without_a_template_is_a_clear_error():
    with pytest.raises(DataError, match="tokenizer's chat_template is null"):
        resolve_chat_template("tokenizer_default", NoTemplateTokenizer())


def test_fallback_uses_the_tokenizer_template_when_there_is_one(tok):
    assert resolve_chat_template("tokenizer_default_fallback_gemma", tok) == tok.chat_template
    assert resolve_chat_template("tokenizer_default_fallback_gemma", NoTemplateTokenizer()) == CHAT_TEMPLATES["gemma"]


def test_builtin_names_and_aliases(tok):
    assert resolve_chat_template("chatml", tok) == CHAT_TEMPLATES["chatml"]
    assert resolve_chat_template("inst", tok) == CHAT_TEMPLATES["mistral"]
    assert resolve_chat_template("qwen_25", tok) == CHAT_TEMPLATES["qwen2_5"]


def test_jinja_string_and_file(tok, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template("jinja", tok, template) == template
    assert resolve_chat_template(None, tok, template) == template  # jinja is implied
    path = tmp_path / "t.jinja"
    path.write_text(template)
    # pure reads no file: backends turn the path into text first
    assert resolve_chat_template("jinja", tok, read_jinja(str(path), "chat_template_jinja")) == template


def test_jinja_without_a_template_is_an_error(tok):
    with pytest.raises(DataError, match="chat_template_jinja"):
        resolve_chat_template("jinja", tok)


def test_unknown_name_lists_the_known_ones(tok):
    with pytest.raises(DataError) as err:
        resolve_chat_template("chatmlx", tok)
    message = str(err.value)
    assert "chatmlx" in message
    for name in ("chatml", "llama3", "gemma", "tokenizer_default", "jinja"):
        assert name in message
    assert set(CHAT_TEMPLATES) <= set(known_template_names())
