"""Built-in chat templates (jinja strings) and the `chat_template:` name -> template resolution.

Each built-in renders like the official template of its model family, so a model fine-tuned with one
chats correctly with its stock tokenizer. The core formats live here; the other families (Mistral
v1..v7, Gemma 3/3n, Phi 3.5/4, Cohere, DeepSeek, Jamba, EXAONE, Metharme, Falcon-H1, the vision
models, Llama 4) in `pure.data.template_families`. Deliberate differences, for determinism:
`llama3_2` uses a fixed "Today Date" (override with `chat_template_kwargs: {date_string: ...}`) instead
of the clock, and `gemma` folds a system message into the first user turn (as Gemma 3 does) instead
of raising.
"""
from __future__ import annotations

from pure.data.settings import DataError
from pure.data.template_families import (
    FAMILY_ALIASES,
    FAMILY_TEMPLATES,
    content_text,
    gemma_template,
    inst_template,
    phi_template,
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-Instruct.
LLAMA3 = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] | trim %}"
    "{% else %}{% set text = message['content'] | selectattr('text', 'defined') | map(attribute='text')"
    " | join('') | trim %}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + text + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-3.2-Instruct (text): always a system header with the knowledge/today dates, tools as JSON.
LLAMA3_2 = """{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content'] | trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls | length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or (message.content is iterable and message.content is not string) %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

# Mistral-7B-Instruct v0.2 ("[INST]" format); a leading system message is prepended to the first
# user message, as the v0.3 template does.
MISTRAL = inst_template("[INST] ", " [/INST]", "")

# Gemma instruction-tuned ("model" is the assistant role).
GEMMA = gemma_template({})

# Phi-3-mini-instruct.
PHI_3 = phi_template(end_with_eos=True, skip_empty_system=False)

_QWEN_TOOLS_HEADER = (
    '{{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}\n'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
)

_QWEN_TOOL_RESPONSE = """    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
"""

# Qwen2.5-Instruct.
QWEN2_5 = (
    "{%- if tools %}\n"
    "{{- '<|im_start|>system\\n' }}\n"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}\n"
    '{{- "\\n\\n" }}\n' + _QWEN_TOOLS_HEADER + "{%- else %}\n"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- endif %}\n"
    """{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
"""
    + _QWEN_TOOL_RESPONSE
    + "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

_QWEN_VISION = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
                "video": "<|vision_start|><|video_pad|><|vision_end|>"}


def qwen3_template(*, multimodal: bool, think_on_generation: bool) -> str:
    """Qwen3 (text; the generation prompt opens no <think> block) and Qwen3.5 (content-part lists with
    vision placeholders; the generation prompt opens "<think>\\n\\n" unless enable_thinking is false).
    Reasoning is kept only for assistant turns after the last user query."""
    system_text = ("(messages[0].content if messages[0].content is string else messages[0].content"
                   " | selectattr('text', 'defined') | map(attribute='text') | join(''))") if multimodal else "messages[0].content"
    if multimodal:
        user_body = content_text("message", _QWEN_VISION)
        assistant_text = ("{%- set content = message.content if message.content is string else message.content"
                          " | selectattr('text', 'defined') | map(attribute='text') | join('') %}")
        is_query = "message.role == \"user\" and (message.content is not string or not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')))"
    else:
        user_body = "{{- content }}"
        assistant_text = ""
        is_query = "message.role == \"user\" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>'))"
    if think_on_generation:
        open_think = ("    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                      "{%- else %}{{- '<think>\\n\\n' }}{%- endif %}\n")
    else:
        open_think = "    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}\n"
    return (
        "{%- if tools %}\n"
        "{{- '<|im_start|>system\\n' }}\n"
        f"{{%- if messages[0].role == 'system' %}}{{{{- {system_text} + '\\n\\n' }}}}{{%- endif %}}\n"
        + _QWEN_TOOLS_HEADER
        + "{%- else %}\n"
        f"{{%- if messages[0].role == 'system' %}}{{{{- '<|im_start|>system\\n' + {system_text} + '<|im_end|>\\n' }}}}{{%- endif %}}\n"
        "{%- endif %}\n"
        "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
        "{%- for message in messages[::-1] %}\n"
        "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
        f"    {{%- if ns.multi_step_tool and {is_query} %}}\n"
        "        {%- set ns.multi_step_tool = false %}\n"
        "        {%- set ns.last_query_index = index %}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- set last_index = real_last_index if real_last_index is defined and real_last_index is not none "
        "else messages|length - 1 %}\n"
        "{%- for message in messages %}\n"
        "    {%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}\n"
        "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' }}" + user_body + "{{- '<|im_end|>' + '\\n' }}\n"
        "    {%- elif message.role == \"assistant\" %}\n"
        + ("        " + assistant_text + "\n" if assistant_text else "")
        + """        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.index0 == last_index or reasoning_content %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}
                {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
"""
        + _QWEN_TOOL_RESPONSE
        + "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|im_start|>assistant\\n' }}\n"
        + open_think
        + "{%- endif %}\n"
    )


# Qwen3: reasoning in <think> blocks, kept only for assistant turns after the last user query.
QWEN3 = qwen3_template(multimodal=False, think_on_generation=False)
QWEN3_5 = qwen3_template(multimodal=True, think_on_generation=True)

# Alpaca: a leading system message verbatim, then "### Instruction:" / "### Response:" blocks.
ALPACA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% if not loop.last %}{{ '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\n### Response:\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "llama3_2": LLAMA3_2,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "phi_3": PHI_3,
    "qwen2_5": QWEN2_5,
    "qwen3": QWEN3,
    "qwen3_5": QWEN3_5,
    "alpaca": ALPACA,
    **FAMILY_TEMPLATES,
}
TEMPLATE_ALIASES: dict[str, str] = {"inst": "mistral", "qwen_25": "qwen2_5", **FAMILY_ALIASES}

TOKENIZER_DEFAULT = "tokenizer_default"
FALLBACK_PREFIX = "tokenizer_default_fallback_"
JINJA = "jinja"


def known_template_names() -> list[str]:
    """Every name `chat_template:` accepts (besides `tokenizer_default_fallback_<name>`)."""
    return sorted([TOKENIZER_DEFAULT, JINJA, *CHAT_TEMPLATES, *TEMPLATE_ALIASES])


def builtin_template(name: str) -> str:
    """The jinja string of a built-in template by name or alias."""
    key = TEMPLATE_ALIASES.get(name, name)
    if key not in CHAT_TEMPLATES:
        raise DataError(
            f"unknown chat_template {name!r}; known: {', '.join(known_template_names())}, "
            f"or {FALLBACK_PREFIX}<name>"
        )
    return CHAT_TEMPLATES[key]


def _tokenizer_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers keep several named templates
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def resolve_chat_template(name: str | None, tokenizer, jinja: str | None = None) -> str:
    """The jinja template string for a `chat_template:` choice.

    `tokenizer_default` is the tokenizer's own template (an error if it has none);
    `tokenizer_default_fallback_<name>` is the tokenizer's template, else the built-in `<name>`;
    `jinja` (implied when only `jinja` is given) is `chat_template_jinja` as template text (a file
    path is read in backends, `backends.templates.read_jinja`); any other name is a built-in
    (`known_template_names()`).
    """
    if not name:
        name = JINJA if jinja else TOKENIZER_DEFAULT
    if name == JINJA:
        if not jinja:
            raise DataError("chat_template: jinja needs chat_template_jinja (a template string or a file path)")
        return jinja
    if name == TOKENIZER_DEFAULT:
        template = _tokenizer_template(tokenizer)
        if template is None:
            raise DataError(
                "chat_template choice is tokenizer_default but the tokenizer's chat_template is null; "
                f"set chat_template to a built-in ({', '.join(sorted(CHAT_TEMPLATES))}) or to jinja"
            )
        return template
    if name.startswith(FALLBACK_PREFIX):
        return _tokenizer_template(tokenizer) or builtin_template(name[len(FALLBACK_PREFIX):])
    return builtin_template(name)
