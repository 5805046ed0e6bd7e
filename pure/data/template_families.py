"""Jinja of the built-in chat templates beyond the core ones in `pure.data.templates`.

Each template is written from its model's public chat format (the `chat_template` of the official
`tokenizer_config.json`, and axolotl's template of the same name where that is what the name means).
Families that differ only by their marker strings are one generator and one table entry each:

- `[INST]` formats (Mistral v0.1 / v0.2 / v0.3 / Tekken): `inst_template(user_open, user_close,
  assistant_open)`; a leading system message is prepended to the first user message, as the official
  v0.3 template does;
- Gemma (1, 3, 3n): `gemma_template(media)`, "model" for the assistant role, a system message folded
  into the first user turn, media parts rendered as the model's placeholder token;
- Phi (3, 3.5): `phi_template(end_with_eos, skip_empty_system)`.

Multimodal templates (llama3_2_vision, llama4, pixtral, llava, qwen2_vl, gemma3, gemma3n,
mistral_v7_tekken, qwen3_5) render the text of content-part lists (`[{"type": "text", "text": ...},
{"type": "image"}]`) and an image/audio/video placeholder token per media part; the processor that
expands placeholders into patches is not part of puretune.

Deliberate differences from the official templates, all for deterministic training text:
- `mistral_v7_tekken` without a system message emits no `[SYSTEM_PROMPT]` block (the official
  template inserts a default prompt containing today's date);
- `llama3_2_vision` uses a fixed "Today Date" unless `chat_template_kwargs: {date_string: ...}`;
- `command_a` is not built in (its official template always prepends a long fixed preamble): use
  `chat_template: tokenizer_default` with a Command A tokenizer.
"""
from __future__ import annotations

from typing import Mapping

_ALTERNATE = (
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
)


def content_text(message: str, media: Mapping[str, str] | None = None, *, trim: bool = False) -> str:
    """Jinja rendering `{message}['content']`: a string as is, or a list of parts (text parts' text,
    each media part as `media[type]`, e.g. {"image": "<|image|>"}), trimmed with `trim`."""
    piece = "| trim " if trim else ""
    media_branches = "".join(
        f"{{% elif part['type'] == '{kind}' %}}{{{{ '{token}' }}}}" for kind, token in (media or {}).items()
    )
    return (
        f"{{% if {message}['content'] is string %}}{{{{ {message}['content'] {piece}}}}}"
        f"{{% else %}}{{% for part in {message}['content'] %}}"
        f"{{% if part['type'] == 'text' %}}{{{{ part['text'] {piece}}}}}{media_branches}{{% endif %}}"
        "{% endfor %}{% endif %}"
    )


def inst_template(user_open: str, user_close: str, assistant_open: str) -> str:
    """`{bos}{user_open}[system\\n\\n]user{user_close}{assistant_open}assistant{eos}...` (Mistral [INST])."""
    return (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}" + _ALTERNATE +
        "{% if message['role'] == 'user' %}"
        f"{{{{ '{user_open}' }}}}"
        "{% if loop.first and system_message %}{{ system_message + '\\n\\n' }}{% endif %}"
        f"{{{{ message['content'] + '{user_close}' }}}}"
        f"{{% elif message['role'] == 'assistant' %}}{{{{ '{assistant_open}' + message['content'] + eos_token }}}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{% endfor %}"
    )


def gemma_template(media: Mapping[str, str]) -> str:
    """Gemma turns `<start_of_turn>{user|model}\\n...<end_of_turn>\\n`, system folded into the first user turn."""
    return (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] if messages[0]['content'] is string else "
        "messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
        "{% set first_user_prefix = first_user_prefix + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}" + _ALTERNATE +
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
        + content_text("message", media, trim=True) +
        "{{ '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    )


def phi_template(*, end_with_eos: bool, skip_empty_system: bool) -> str:
    """Phi-3 / Phi-3.5: `<|{role}|>\\n{content}<|end|>\\n`; Phi-3 closes a text without a generation prompt with eos."""
    system_test = "message['role'] == 'system'" + (" and message['content']" if skip_empty_system else "")
    ending = "{% else %}{{ eos_token }}" if end_with_eos else ""
    return (
        "{% for message in messages %}"
        f"{{% if {system_test} %}}{{{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}}}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}" + ending + "{% endif %}"
    )


# Mistral-7B-Instruct v0.1, v0.2/v0.3 and Nemo (Tekken): only the [INST] spacing differs.
MISTRAL_V1 = inst_template(" [INST] ", " [/INST]", " ")
MISTRAL_V2V3 = inst_template("[INST] ", "[/INST]", " ")
MISTRAL_V3_TEKKEN = inst_template("[INST]", "[/INST]", "")

# Mistral Small 3 (v7 Tekken): system prompts in [SYSTEM_PROMPT] blocks wherever they occur.
MISTRAL_V7_TEKKEN = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' }}" + content_text("message") + "{{ '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST]' }}"
    + content_text("message", {"image": "[IMG]", "image_url": "[IMG]"}) + "{{ '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}" + content_text("message") + "{{ eos_token }}"
    "{% else %}{{ raise_exception('Only user, system and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# Pixtral-12B: the system message goes into the last user message (only when that is the last message).
PIXTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}" + _ALTERNATE +
    "{% if message['role'] == 'user' %}"
    "{% if loop.last and system_message is defined %}{{ '[INST]' + system_message + '\\n\\n' }}"
    "{% else %}{{ '[INST]' }}{% endif %}"
    + content_text("message", {"image": "[IMG]"}) + "{{ '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}" + content_text("message", {"image": "[IMG]"}) + "{{ eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{% endif %}"
    "{% endfor %}"
)

GEMMA3 = gemma_template({"image": "<start_of_image>"})
GEMMA3N = gemma_template({"audio": "<audio_soft_token>", "image": "<image_soft_token>"})

PHI_35 = phi_template(end_with_eos=False, skip_empty_system=True)

# microsoft/phi-4: ChatML markers with <|im_sep|> after the role.
PHI_4 = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# Cohere Command-R / Aya: turn tokens, contents stripped, an optional leading system turn.
COHERE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + messages[0]['content'] + '<|END_OF_TURN_TOKEN|>' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}" + _ALTERNATE +
    "{% if message['role'] == 'user' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + message['content'] | trim + '<|END_OF_TURN_TOKEN|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + message['content'] | trim + '<|END_OF_TURN_TOKEN|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

# DeepSeek-V2.5 (axolotl's `deepseek_v2`): system text, then <｜User｜> / <｜Assistant｜> turns.
DEEPSEEK_V2 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

# DeepSeek-V3: all system messages joined first; reasoning before </think> is not kept; tool calls
# and tool outputs in DeepSeek's markers.
DEEPSEEK_V3 = """{%- set ns = namespace(system_prompt='', in_tool=false, first_output=true) %}
{%- for message in messages if message['role'] == 'system' %}
    {%- set ns.system_prompt = ns.system_prompt + ('\\n\\n' if not loop.first else '') + message['content'] %}
{%- endfor %}
{{- bos_token + ns.system_prompt }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {%- set ns.in_tool = false %}
        {{- '<｜User｜>' + message['content'] }}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] %}
        {%- set ns.in_tool = false %}
        {{- '<｜Assistant｜>' + (message['content'] or '') + '<｜tool▁calls▁begin｜>' }}
        {%- for call in message['tool_calls'] %}
            {%- set function = call['function'] if call['function'] is defined else call %}
            {%- set arguments = function['arguments'] if function['arguments'] is string else function['arguments'] | tojson %}
            {{- ('\\n' if not loop.first else '') + '<｜tool▁call▁begin｜>' + (call['type'] or 'function') + '<｜tool▁sep｜>' + function['name'] }}
            {{- '\\n```json\\n' + arguments + '\\n```<｜tool▁call▁end｜>' }}
        {%- endfor %}
        {{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}
    {%- elif message['role'] == 'assistant' %}
        {%- set content = message['content'] %}
        {%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}
        {%- if ns.in_tool %}
            {{- '<｜tool▁outputs▁end｜>' + content + '<｜end▁of▁sentence｜>' }}
            {%- set ns.in_tool = false %}
        {%- else %}
            {{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}
        {%- endif %}
    {%- elif message['role'] == 'tool' %}
        {%- if ns.first_output %}{{- '<｜tool▁outputs▁begin｜>' }}{%- set ns.first_output = false %}{%- endif %}
        {%- set ns.in_tool = true %}
        {{- '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}
    {%- endif %}
{%- endfor %}
{%- if ns.in_tool %}{{- '<｜tool▁outputs▁end｜>' }}{%- endif %}
{%- if add_generation_prompt and not ns.in_tool %}{{- '<｜Assistant｜>' }}{%- endif %}
"""

# AI21 Jamba 1.5: <|bom|><|role|> content<|eom|> per message; the system block (possibly empty, with
# the tool definitions) is always there.
JAMBA = """{{- '<|startoftext|>' }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}{%- set loop_messages = messages %}
{%- endif %}
{{- '<|bom|><|system|> ' + system_message }}
{%- if tools %}
    {{- ('\\n\\n' if system_message else '') + '<tool_definitions>\\n# Tools\\n\\n## Functions' }}
    {%- for tool in tools %}
        {{- '\\n\\n' + ((tool['function'] if tool['type'] == 'function' else tool) | tojson(indent=2)) }}
    {%- endfor %}
    {{- '\\n</tool_definitions>' }}
{%- endif %}
{{- '<|eom|>' }}
{%- for message in loop_messages %}
    {%- set content = message['content'] or '' %}
    {{- '<|bom|><|' + message['role'] + '|> ' + (content if content is string else content | tojson) }}
    {%- if message['role'] == 'assistant' and message['tool_calls'] %}
        {{- '<tool_calls>[\\n' }}
        {%- for call in message['tool_calls'] %}
            {%- set function = call['function'] if call['function'] is defined else call %}
            {%- set arguments = function['arguments'] if function['arguments'] is string else function['arguments'] | tojson %}
            {{- '{"name": "' + function['name'] + '", "arguments": ' + arguments + '}' + (',' if not loop.last else '') }}
        {%- endfor %}
        {{- '\\n]</tool_calls>' }}
    {%- endif %}
    {{- '<|eom|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|bom|><|assistant|>' }}{%- endif %}
"""

# LG EXAONE 3.5: [|role|]content, user turns end with a newline, others with [|endofturn|]\n.
EXAONE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

# Pygmalion Metharme: <|system|>, <|user|>, <|model|> markers, a default role-play system prompt.
METHARME = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = 'Enter RP mode. You shall reply to the user while staying in character. "
    "Your responses must be detailed, creative, immersive, and drive the scenario forward.' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{{ '<|system|>' + system_message }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] | trim }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|model|>' + message['content'] | trim }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|model|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# TII Falcon-H1: ChatML after a BOS; tools described in the system turn.
FALCON_H1 = """{{- bos_token }}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
    {{- "You are a function calling AI model. You are provided with function signature within <tools> </tools> XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about what values to plug into functions.\\n<tools>\\n" }}
    {%- for tool in tools %}{{- '[' + (tool | tojson) + ']' }}{%- endfor %}
    {{- "\\n</tools>\\nFor each function call, return a json object with function name and arguments within <tool_call> </tool_call> tags with the following schema:\\n<tool_call>\\n{'arguments': <args-dict>, 'name': <function-name>}\\n</tool_call>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages if message['role'] != 'system' %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Qwen2-VL: ChatML with a default system message and vision placeholders.
QWEN2_VL = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + content_text("message", {"image": "<|vision_start|><|image_pad|><|vision_end|>",
                               "video": "<|vision_start|><|video_pad|><|vision_end|>"})
    + "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# llava-1.5: "USER: <image>\\ntext ASSISTANT: text " (images before the text of a message).
LLAVA = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_LLAMA_TOOL_INSTRUCTIONS = (
    "{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}"
    "{{- 'Do not use variables.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
)


def _llama_tools_in_system() -> str:
    """Tool definitions inside the system header (`chat_template_kwargs: {tools_in_user_message: false}`)."""
    return (
        "{%- if tools is not none and not tools_in_user_message %}"
        "{{- 'You have access to the following functions. To call a function, please respond with JSON for a function call.' }}"
        + _LLAMA_TOOL_INSTRUCTIONS + "{%- endif %}"
    )


def _llama_tools_in_user(header_open: str, header_close: str, eot: str) -> str:
    """Tool definitions prepended to the first user message (the Llama default)."""
    return (
        "{%- if tools_in_user_message and tools is not none %}"
        "{%- if messages | length == 0 %}"
        "{{- raise_exception('Cannot put tools in the first user message when there is no first user message!') }}"
        "{%- endif %}"
        f"{{{{- '{header_open}user{header_close}\\n\\n' }}}}"
        "{{- 'Given the following functions, please respond with a JSON for a function call ' }}"
        "{{- 'with its proper arguments that best answers the given prompt.\\n\\n' }}"
        + _LLAMA_TOOL_INSTRUCTIONS +
        f"{{{{- messages[0]['content'] | trim + '{eot}' }}}}{{%- set messages = messages[1:] %}}"
        "{%- endif %}"
    )


_LLAMA_SETUP = (
    "{{- bos_token }}"
    "{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}"
    "{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
)

# Llama-3.2-Vision-Instruct: Llama 3.2 turns; the dated system header only when there is no image.
LLAMA3_2_VISION = (
    _LLAMA_SETUP +
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages if message['content'] is not string %}"
    "{%- for part in message['content'] if part['type'] == 'image' %}{%- set image_ns.has_images = true %}{%- endfor %}"
    "{%- endfor %}"
    "{%- if image_ns.has_images and system_message %}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') }}{%- endif %}"
    "{%- if not image_ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    + _llama_tools_in_system() +
    "{{- system_message + '<|eot_id|>' }}"
    "{%- endif %}"
    + _llama_tools_in_user("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>") +
    "{%- for message in messages %}"
    "{%- if message['role'] in ['tool', 'ipython'] %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] if message['content'] is string else message['content'] | tojson }}{{- '<|eot_id|>' }}"
    "{%- elif message['tool_calls'] %}"
    "{%- if message['tool_calls'] | length != 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
    "{%- set call = message['tool_calls'][0]['function'] %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{{- '{\"name\": \"' + call['name'] + '\", \"parameters\": ' + call['arguments'] | tojson + '}<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    + content_text("message", {"image": "<|image|>"}) +
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Llama 4: <|header_start|>role<|header_end|>\n\n ... <|eot|>; a system header only when one is given;
# tool calls after a <|python_start|>...<|python_end|> block.
LLAMA4 = (
    _LLAMA_SETUP +
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] %}"
    "{{- '<|header_start|>system<|header_end|>\\n\\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    + _llama_tools_in_system() +
    "{{- system_message | trim + '<|eot|>' }}{%- set messages = messages[1:] %}"
    "{%- endif %}"
    + _llama_tools_in_user("<|header_start|>", "<|header_end|>", "<|eot|>") +
    "{%- for message in messages %}"
    "{%- if message['role'] in ['tool', 'ipython'] %}"
    "{{- '<|header_start|>ipython<|header_end|>\\n\\n' }}"
    "{{- message['content'] if message['content'] is string else message['content'] | tojson }}{{- '<|eot|>' }}"
    "{%- elif message['tool_calls'] %}"
    "{{- '<|header_start|>assistant<|header_end|>\\n\\n<|python_start|>' }}"
    + content_text("message", {"image": "<|image|>"}) +
    "{{- '<|python_end|>' }}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '{\"name\": \"' + call['function']['name'] + '\", \"parameters\": ' + call['function']['arguments'] | tojson + '}' }}"
    "{%- endfor %}"
    "{{- '<|eot|>' }}"
    "{%- else %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    + content_text("message", {"image": "<|image|>"}) +
    "{{- '<|eot|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)

FAMILY_TEMPLATES: dict[str, str] = {
    "mistral_v1": MISTRAL_V1,
    "mistral_v2v3": MISTRAL_V2V3,
    "mistral_v3_tekken": MISTRAL_V3_TEKKEN,
    "mistral_v7_tekken": MISTRAL_V7_TEKKEN,
    "pixtral": PIXTRAL,
    "gemma3": GEMMA3,
    "gemma3n": GEMMA3N,
    "phi_35": PHI_35,
    "phi_4": PHI_4,
    "cohere": COHERE,
    "deepseek_v2": DEEPSEEK_V2,
    "deepseek_v3": DEEPSEEK_V3,
    "jamba": JAMBA,
    "exaone": EXAONE,
    "metharme": METHARME,
    "falcon_h1": FALCON_H1,
    "qwen2_vl": QWEN2_VL,
    "llava": LLAVA,
    "llama3_2_vision": LLAMA3_2_VISION,
    "llama4": LLAMA4,
}
# Same format under another name.
FAMILY_ALIASES: dict[str, str] = {"aya": "cohere"}
