"""The built-in chat templates beyond the core ones: golden renders written from each model's public
format, media placeholders, tool calls, and label masking through `type: chat_template`.

The SmolLM2 tokenizer renders them: its bos_token is `<|im_start|>` (B) and eos_token `<|im_end|>` (E).
"""
import pytest

from pure.data.chat_template import build_chat_template_strategy
from pure.data.settings import IGNORE_INDEX, DataSettings
from pure.data.templates import CHAT_TEMPLATES, builtin_template, known_template_names, resolve_chat_template

B, E = "<|im_start|>", "<|im_end|>"
SYSTEM = {"role": "system", "content": "You are kind."}
USER = {"role": "user", "content": "Hi there"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}
FOLLOW_UP = {"role": "user", "content": "What is 2+2?"}
THREE_TURNS = [SYSTEM, USER, ASSISTANT]

LLAMA32_SYSTEM = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                  "Today Date: 26 Jul 2024\n\n")

# name -> (render of THREE_TURNS, render of THREE_TURNS + FOLLOW_UP with the generation prompt)
GOLDEN = {
    "mistral_v1": (f"{B} [INST] You are kind.\n\nHi there [/INST] Hello!{E}",
                   f"{B} [INST] You are kind.\n\nHi there [/INST] Hello!{E} [INST] What is 2+2? [/INST]"),
    "mistral_v2v3": (f"{B}[INST] You are kind.\n\nHi there[/INST] Hello!{E}",
                     f"{B}[INST] You are kind.\n\nHi there[/INST] Hello!{E}[INST] What is 2+2?[/INST]"),
    "mistral_v3_tekken": (f"{B}[INST]You are kind.\n\nHi there[/INST]Hello!{E}",
                          f"{B}[INST]You are kind.\n\nHi there[/INST]Hello!{E}[INST]What is 2+2?[/INST]"),
    "mistral_v7_tekken": (f"{B}[SYSTEM_PROMPT]You are kind.[/SYSTEM_PROMPT][INST]Hi there[/INST]Hello!{E}",
                          f"{B}[SYSTEM_PROMPT]You are kind.[/SYSTEM_PROMPT][INST]Hi there[/INST]Hello!{E}"
                          "[INST]What is 2+2?[/INST]"),
    # Pixtral puts the system message into the last user message, and only when it is the last message.
    "pixtral": (f"{B}[INST]Hi there[/INST]Hello!{E}",
                f"{B}[INST]Hi there[/INST]Hello!{E}[INST]You are kind.\n\nWhat is 2+2?[/INST]"),
    "gemma3": (f"{B}<start_of_turn>user\nYou are kind.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
               f"{B}<start_of_turn>user\nYou are kind.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
               "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"),
    "gemma3n": (f"{B}<start_of_turn>user\nYou are kind.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
                f"{B}<start_of_turn>user\nYou are kind.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"),
    "phi_35": ("<|system|>\nYou are kind.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n",
               "<|system|>\nYou are kind.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n"
               "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"),
    "phi_4": ("<|im_start|>system<|im_sep|>You are kind.<|im_end|><|im_start|>user<|im_sep|>Hi there<|im_end|>"
              "<|im_start|>assistant<|im_sep|>Hello!<|im_end|>",
              "<|im_start|>system<|im_sep|>You are kind.<|im_end|><|im_start|>user<|im_sep|>Hi there<|im_end|>"
              "<|im_start|>assistant<|im_sep|>Hello!<|im_end|><|im_start|>user<|im_sep|>What is 2+2?<|im_end|>"
              "<|im_start|>assistant<|im_sep|>"),
    "cohere": (f"{B}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are kind.<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi there<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello!<|END_OF_TURN_TOKEN|>",
               f"{B}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are kind.<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi there<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello!<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>What is 2+2?<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"),
    "deepseek_v2": (f"{B}You are kind.\n\n<｜User｜>Hi there<｜Assistant｜>Hello!{E}",
                    f"{B}You are kind.\n\n<｜User｜>Hi there<｜Assistant｜>Hello!{E}<｜User｜>What is 2+2?<｜Assistant｜>"),
    "deepseek_v3": (f"{B}You are kind.<｜User｜>Hi there<｜Assistant｜>Hello!<｜end▁of▁sentence｜>",
                    f"{B}You are kind.<｜User｜>Hi there<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
                    "<｜User｜>What is 2+2?<｜Assistant｜>"),
    "jamba": ("<|startoftext|><|bom|><|system|> You are kind.<|eom|><|bom|><|user|> Hi there<|eom|>"
              "<|bom|><|assistant|> Hello!<|eom|>",
              "<|startoftext|><|bom|><|system|> You are kind.<|eom|><|bom|><|user|> Hi there<|eom|>"
              "<|bom|><|assistant|> Hello!<|eom|><|bom|><|user|> What is 2+2?<|eom|><|bom|><|assistant|>"),
    "exaone": ("[|system|]You are kind.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n",
               "[|system|]You are kind.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n"
               "[|user|]What is 2+2?\n[|assistant|]"),
    # Metharme ends a text without a generation prompt with eos.
    "metharme": (f"{B}<|system|>You are kind.<|user|>Hi there<|model|>Hello!{E}",
                 f"{B}<|system|>You are kind.<|user|>Hi there<|model|>Hello!<|user|>What is 2+2?<|model|>"),
    "falcon_h1": (f"{B}<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                  "<|im_start|>assistant\nHello!<|im_end|>\n",
                  f"{B}<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                  "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
    "qwen2_vl": ("<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                 "<|im_start|>assistant\nHello!<|im_end|>\n",
                 "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                 "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
    "llava": ("You are kind. USER: Hi there ASSISTANT: Hello! ",
              "You are kind. USER: Hi there ASSISTANT: Hello! USER: What is 2+2? ASSISTANT:"),
    "llama3_2_vision": (f"{B}{LLAMA32_SYSTEM}You are kind.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
                        f"{B}{LLAMA32_SYSTEM}You are kind.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama4": (f"{B}<|header_start|>system<|header_end|>\n\nYou are kind.<|eot|>"
               "<|header_start|>user<|header_end|>\n\nHi there<|eot|><|header_start|>assistant<|header_end|>\n\nHello!<|eot|>",
               f"{B}<|header_start|>system<|header_end|>\n\nYou are kind.<|eot|>"
               "<|header_start|>user<|header_end|>\n\nHi there<|eot|><|header_start|>assistant<|header_end|>\n\nHello!<|eot|>"
               "<|header_start|>user<|header_end|>\n\nWhat is 2+2?<|eot|><|header_start|>assistant<|header_end|>\n\n"),
    # Qwen3.5 keeps a (here empty) <think> block only after the last user query, and its generation
    # prompt opens one.
    "qwen3_5": ("<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n",
                "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n"),
}

# Every built-in name CATALOG §3 lists, plus the rest of axolotl's `chat_template` choices.
DOCUMENTED_NAMES = (
    "alpaca", "inst", "chatml", "gemma", "cohere", "llama3", "phi_3", "phi_35", "deepseek_v2", "jamba", "qwen3",
    "qwen3_5", "llama4", "llama3_2_vision", "pixtral", "llava", "gemma3", "gemma3n", "qwen2_vl",
    "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "llama3_2", "qwen_25", "phi_4",
    "deepseek_v3", "exaone", "metharme", "falcon_h1", "aya",
)


@pytest.fixture(scope="module")
def tok():
    from backends.hf import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def render(tok, name, messages, **kwargs):
    return tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATES[name], tokenize=False, **kwargs)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_three_turns_render_like_the_official_format(tok, name):
    assert render(tok, name, THREE_TURNS) == GOLDEN[name][0]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_next_turn_with_generation_prompt(tok, name):
    assert render(tok, name, THREE_TURNS + [FOLLOW_UP], add_generation_prompt=True) == GOLDEN[name][1]


@pytest.mark.parametrize("name", DOCUMENTED_NAMES)
def test_every_documented_name_resolves(tok, name):
    assert name in known_template_names()
    assert resolve_chat_template(name, tok) == builtin_template(name)


def test_aliases_and_distinct_mistral_versions():
    assert builtin_template("aya") == CHAT_TEMPLATES["cohere"]
    assert builtin_template("inst") == CHAT_TEMPLATES["mistral"]
    assert len({CHAT_TEMPLATES[n] for n in ("mistral", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken")}) == 4


def test_phi_3_closes_with_eos_and_phi_35_does_not(tok):
    assert render(tok, "phi_3", THREE_TURNS).endswith(f"<|end|>\n{E}")
    assert render(tok, "phi_35", THREE_TURNS).endswith("Hello!<|end|>\n")
    assert render(tok, "phi_35", [{"role": "system", "content": ""}, USER]) == "<|user|>\nHi there<|end|>\n"


def test_defaults_when_there_is_no_system_message(tok):
    assert render(tok, "qwen2_vl", [USER]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert render(tok, "exaone", [USER]) == "[|system|][|endofturn|]\n[|user|]Hi there\n"
    assert render(tok, "jamba", [USER]) == "<|startoftext|><|bom|><|system|> <|eom|><|bom|><|user|> Hi there<|eom|>"
    assert render(tok, "metharme", [USER], add_generation_prompt=True).startswith(f"{B}<|system|>Enter RP mode.")
    assert render(tok, "llama4", [USER]) == f"{B}<|header_start|>user<|header_end|>\n\nHi there<|eot|>"
    assert render(tok, "mistral_v7_tekken", [USER]) == f"{B}[INST]Hi there[/INST]"


IMAGE_TURN = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
PLACEHOLDERS = {
    "qwen2_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n",
    "qwen3_5": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n",
    "gemma3": "<start_of_turn>user\n<start_of_image>What is this?<end_of_turn>\n",
    "gemma3n": "<start_of_turn>user\n<image_soft_token>What is this?<end_of_turn>\n",
    "llama4": "<|header_start|>user<|header_end|>\n\n<|image|>What is this?<|eot|>",
    "mistral_v7_tekken": "[INST][IMG]What is this?[/INST]",
    "pixtral": "[INST][IMG]What is this?[/INST]",
    "llava": "USER: <image>\nWhat is this? ",
}


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_media_parts_become_placeholder_tokens(tok, name):
    assert PLACEHOLDERS[name] in render(tok, name, [IMAGE_TURN])


def test_llama3_2_vision_drops_the_system_header_with_images(tok):
    text = render(tok, "llama3_2_vision", [IMAGE_TURN])
    assert text == f"{B}<|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"
    with pytest.raises(Exception, match="incompatible with system messages"):
        render(tok, "llama3_2_vision", [SYSTEM, IMAGE_TURN])


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Add 1 and 2"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
    {"role": "tool", "content": "3"},
    {"role": "assistant", "content": "It is 3."},
]


def test_deepseek_v3_tool_calls_and_outputs(tok):
    text = render(tok, "deepseek_v3", TOOL_CHAT)
    assert text == (f"{B}<｜User｜>Add 1 and 2<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n"
                    '```json\n{"a": 1, "b": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'
                    "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>3<｜tool▁output▁end｜>"
                    "<｜tool▁outputs▁end｜>It is 3.<｜end▁of▁sentence｜>")


def test_llama4_tools_go_into_the_first_user_message(tok):
    text = render(tok, "llama4", TOOL_CHAT, tools=TOOLS)
    assert text.startswith(f"{B}<|header_start|>user<|header_end|>\n\nGiven the following functions")
    assert '"name": "add"' in text and "Add 1 and 2<|eot|>" in text
    assert '<|python_start|><|python_end|>{"name": "add", "parameters": {"a": 1, "b": 2}}<|eot|>' in text
    assert "<|header_start|>ipython<|header_end|>\n\n3<|eot|>" in text


def test_jamba_lists_tools_in_the_system_block_and_calls_in_tool_calls(tok):
    text = render(tok, "jamba", TOOL_CHAT, tools=TOOLS)
    assert text.startswith("<|startoftext|><|bom|><|system|> <tool_definitions>\n# Tools\n\n## Functions\n\n{")
    assert '<|bom|><|assistant|> <tool_calls>[\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n]</tool_calls><|eom|>' in text


# --- masking through `type: chat_template` with the real tokenizer ----------------------------


def tokenize(tok, template, row, **settings):
    strategy = build_chat_template_strategy({"path": "test/ds", "chat_template": template}, tok, DataSettings(**settings))
    (example,) = strategy(row, 0)
    assert len(example["input_ids"]) == len(example["labels"])
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(example["input_ids"], example["labels"]))
    return example


def trained_runs(tok, example):
    runs, current = [], []
    for i, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


ROW = {"messages": [USER, ASSISTANT, FOLLOW_UP, {"role": "assistant", "content": "Four."}]}


def test_mistral_v7_tekken_trains_answers_and_their_eos(tok):
    # eos (<|im_end|> for SmolLM2) closes each assistant turn; train_on_eos: turn trains it.
    example = tokenize(tok, "mistral_v7_tekken", ROW)
    assert trained_runs(tok, example) == [f"Hello!{E}", f"Four.{E}"]


def with_tokens(*tokens):
    """A fresh SmolLM2 tokenizer with a template's markers added as single tokens, as its model has them."""
    from backends.hf import load_tokenizer
    from backends.tokenizer import prepare_tokenizer

    fresh = load_tokenizer("smollm2-135m-instruct")
    prepare_tokenizer(fresh, tokens=list(tokens))
    return fresh


def test_gemma3_masks_model_headers_and_trains_answers():
    tok = with_tokens("<start_of_turn>", "<end_of_turn>")
    # <end_of_turn> is not the eos: only the contents are trained unless it is an eot token.
    assert trained_runs(tok, tokenize(tok, "gemma3", ROW)) == ["Hello!", "Four."]
    example = tokenize(tok, "gemma3", ROW, eot_tokens=("<end_of_turn>",))
    assert trained_runs(tok, example) == ["Hello!<end_of_turn>", "Four.<end_of_turn>"]


def test_llama4_with_its_eot_token_added_trains_the_eot():
    tok = with_tokens("<|header_start|>", "<|header_end|>", "<|eot|>")
    example = tokenize(tok, "llama4", ROW, eot_tokens=("<|eot|>",))
    assert trained_runs(tok, example) == ["Hello!<|eot|>", "Four.<|eot|>"]
    eot = tok.convert_tokens_to_ids("<|eot|>")
    assert example["input_ids"].count(eot) == 4  # the user turns' <|eot|> are there, masked
