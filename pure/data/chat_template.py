"""`type: chat_template`: a conversation rendered by a jinja chat template, with per-turn label masking.

How turns are found: the conversation is rendered twice with the tokenizer's own jinja renderer, once
as it is and once with every text field (content, reasoning, tool-call names) replaced by a unique
sentinel. The template text between sentinels is the same in both renders, so walking the two
strings side by side gives each field's exact CHARACTER span in the real render (also when the
template trims or strips the content). The real render is tokenised once with offsets, and a
character span becomes the tokens that overlap it. Fragments are never re-tokenised, so token
merges across a turn boundary cannot shift the mask.

Labels (`IGNORE_INDEX` = masked):
- a trained turn keeps the ids of its content, and of whatever the template emits between the content
  and the turn's end-of-turn token (tool calls, the `</think>` block); role headers are masked, and for
  an assistant turn any template text after the generation prompt (`<think>\\n`) is trained;
- the end-of-turn token closing a turn follows `train_on_eos` (EOS) / `train_on_eot` (other
  `eot_tokens`): `turn` trains the one closing each trained turn, `all` every one, `last` the final one;
- everything else (system/user turns by default, the `\\n` after `<|im_end|>`) is masked.
"""
from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from pure.data.settings import IGNORE_INDEX, DataError, DataSettings, Example, RowFn
from pure.data.templates import resolve_chat_template

DEFAULT_ROLES: dict[str, list[str]] = {
    "user": ["human", "user"],
    "assistant": ["gpt", "assistant"],
    "system": ["system"],
    "tool": ["tool"],
}
EOS_POLICIES = ("turn", "all", "last")
_THINKING_PAIRS = (("<think>", "</think>"), ("<reasoning>", "</reasoning>"), ("<|begin_of_thought|>", "<|end_of_thought|>"))
_SOLUTION_PAIRS = (("<|begin_of_solution|>", "<|end_of_solution|>"),)
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use code points: no template touches them
_SENTINEL_RE = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


@dataclass(frozen=True)
class ChatOptions:
    """Everything a `chat_template` dataset entry decides, validated once when the strategy is built."""

    template: str
    dataset: str = "<dataset>"
    field_messages: str = "messages"
    field_system: str = "system"
    field_tools: str = "tools"
    property_mappings: tuple[tuple[str, str], ...] = (("role", "role"), ("content", "content"))
    role_map: Mapping[str, str] = field(default_factory=dict)  # source role -> template role
    roles_to_train: frozenset[str] = frozenset({"assistant"})
    train_on_eos: str | None = "turn"
    train_on_eot: str | None = "turn"
    eos_id: int | None = None
    eot_ids: frozenset[int] = frozenset()
    field_training: str | None = None
    field_training_detail: str | None = None
    drop_system_message: bool = False
    default_system_message: str | None = None
    split_thinking: bool = False
    thinking_key: str = "reasoning_content"
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    train_on_inputs: bool = False
    generation_prompt: str = ""  # what add_generation_prompt appends (the assistant header)

    @property
    def legacy_last_message(self) -> bool:
        """Empty `roles_to_train:` and `train_on_eos:` (and no per-turn fields): train only the last message."""
        return not (
            self.roles_to_train or self.train_on_eos or self.train_on_eot or self.field_training or self.field_training_detail
        )


def role_map_from_config(roles: Mapping[str, list[str]] | None) -> dict[str, str]:
    """`roles: {target: [source, ...]}` inverted to {source: target}; the documented defaults when unset."""
    roles = roles or DEFAULT_ROLES
    out: dict[str, str] = {}
    for target, sources in roles.items():
        for source in [sources] if isinstance(sources, str) else sources:
            out[source] = target
    return out


def template_choice(ds_cfg: Mapping[str, Any], settings: DataSettings) -> tuple[str | None, str | None]:
    """(chat_template name, chat_template_jinja): the dataset's own if it sets one, else the global one."""
    if ds_cfg.get("chat_template") or ds_cfg.get("chat_template_jinja"):
        return ds_cfg.get("chat_template"), ds_cfg.get("chat_template_jinja")
    return settings.chat_template, settings.chat_template_jinja


def single_token_id(tokenizer, token: str, what: str) -> int:
    """The id of a token that must encode to exactly one token (EOT tokens)."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise DataError(
            f"{what} {token!r} is encoded as {len(ids)} tokens {ids}; each must be a single token "
            "(add it under `tokens:` or override an unused added token via `added_tokens_overrides:`)"
        )
    return ids[0]


def render(tokenizer, template: str, messages: list[dict], *, add_generation_prompt: bool = False,
           tools: list | None = None, template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The template applied to `messages` by the tokenizer's jinja renderer (text, not ids)."""
    kwargs = dict(template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def generation_prompt(tokenizer, template: str, template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The text `add_generation_prompt=True` appends after a user turn ("" if the template adds none)."""
    probe = [{"role": "user", "content": f"{_OPEN}probe{_CLOSE}"}]
    try:
        without = render(tokenizer, template, probe, template_kwargs=template_kwargs)
        with_prompt = render(tokenizer, template, probe, add_generation_prompt=True, template_kwargs=template_kwargs)
    except Exception:  # noqa: BLE001 - templates may reject a lone user turn; then no header extension
        return ""
    common = 0
    for a, b in zip(without, with_prompt):
        if a != b:
            break
        common += 1
    return with_prompt[common:]


def chat_options(ds_cfg: Mapping[str, Any], tokenizer, settings: DataSettings) -> ChatOptions:
    """Validate a `type: chat_template` dataset entry (a plain dict) into ChatOptions."""
    dataset = str(ds_cfg.get("path") or "<dataset>")
    name, jinja = template_choice(ds_cfg, settings)
    template = resolve_chat_template(name, tokenizer, jinja)

    mappings = dict(ds_cfg.get("message_property_mappings") or {})
    if not mappings:
        mappings = {"role": "role", "content": "content"}
    if ds_cfg.get("message_field_role"):  # legacy keys win over the default mapping
        mappings["role"] = ds_cfg["message_field_role"]
    if ds_cfg.get("message_field_content"):
        mappings["content"] = ds_cfg["message_field_content"]
    thinking_key = ds_cfg.get("template_thinking_key") or "reasoning_content"
    field_thinking = ds_cfg.get("field_thinking") or "reasoning_content"
    mappings.setdefault(thinking_key, field_thinking)

    role_map = role_map_from_config(ds_cfg.get("roles"))
    roles_to_train = ds_cfg.get("roles_to_train", ["assistant"])
    roles_to_train = frozenset(role_map.get(r, r) for r in (roles_to_train or []))

    train_on_eos = ds_cfg.get("train_on_eos", "turn")
    train_on_eot = ds_cfg.get("train_on_eot")
    if train_on_eot is None:
        train_on_eot = train_on_eos
    for key, value in (("train_on_eos", train_on_eos), ("train_on_eot", train_on_eot)):
        if value not in (None, *EOS_POLICIES):
            raise DataError(f"dataset {dataset}: {key} must be one of {EOS_POLICIES}, got {value!r}")

    eos_token = getattr(tokenizer, "eos_token", None)
    eot_tokens = list(settings.eot_tokens) if settings.eot_tokens else ([eos_token] if eos_token else [])
    eot_ids = frozenset(single_token_id(tokenizer, t, "eot_tokens entry") for t in eot_tokens)
    if eos_token in eot_tokens and "train_on_eot" in ds_cfg and ds_cfg["train_on_eot"] != train_on_eos:
        raise DataError(
            f"dataset {dataset}: eos_token {eos_token!r} is in eot_tokens, so train_on_eos ({train_on_eos!r}) "
            f"and train_on_eot ({ds_cfg['train_on_eot']!r}) must agree"
        )

    template_kwargs = {**(settings.chat_template_kwargs or {}), **(ds_cfg.get("chat_template_kwargs") or {})}
    return ChatOptions(
        template=template,
        dataset=dataset,
        field_messages=ds_cfg.get("field_messages") or "messages",
        field_system=ds_cfg.get("field_system") or "system",
        field_tools=ds_cfg.get("field_tools") or "tools",
        property_mappings=tuple(mappings.items()),
        role_map=role_map,
        roles_to_train=roles_to_train,
        train_on_eos=train_on_eos,
        train_on_eot=train_on_eot,
        eos_id=getattr(tokenizer, "eos_token_id", None),
        eot_ids=eot_ids,
        field_training=ds_cfg.get("message_field_training"),
        field_training_detail=ds_cfg.get("message_field_training_detail"),
        drop_system_message=bool(ds_cfg.get("drop_system_message", False)),
        default_system_message=settings.default_system_message,
        split_thinking=bool(ds_cfg.get("split_thinking", False)),
        thinking_key=thinking_key,
        template_kwargs=template_kwargs,
        train_on_inputs=settings.train_on_inputs,
        generation_prompt=generation_prompt(tokenizer, template, template_kwargs),
    )


# ----------------------------------------------------------------------------- rows -> messages


@dataclass(frozen=True)
class Turn:
    """One message as the template sees it, plus how it is trained."""

    message: dict
    train: bool
    detail: list | None = None  # [{begin_offset, end_offset (inclusive), train}] over the content


def _where(opts: ChatOptions, index: int, turn: int | None = None) -> str:
    at = f"dataset {opts.dataset}, row {index}"
    return at if turn is None else f"{at}, turn {turn}"


def _parse_json(value, what: str, where: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: {what} is not valid JSON ({err}): {value[:80]!r}") from err


def split_thinking_content(content: str) -> tuple[str | None, str]:
    """Split "<think>r</think>c" (or <reasoning>, <|begin_of_thought|>) into (reasoning, content)."""
    for open_tag, close_tag in _THINKING_PAIRS:
        if open_tag in content and close_tag in content:
            start, end = content.find(open_tag), content.find(close_tag)
            reasoning = content[start + len(open_tag) : end].strip()
            rest = content[end + len(close_tag) :].lstrip()
            for sol_open, sol_close in _SOLUTION_PAIRS:
                if sol_open in rest and sol_close in rest:
                    rest = rest[rest.find(sol_open) + len(sol_open) : rest.find(sol_close)].strip()
                    break
            return reasoning, rest
    return None, content


def to_message(raw: Any, opts: ChatOptions, where: str) -> dict:
    """A dataset message mapped to the template's keys (role, content, reasoning, tool_calls, ...)."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a message must be a mapping, got {type(raw).__name__}")
    message: dict = {}
    used = set()
    for key, source in opts.property_mappings:
        if raw.get(source) is not None:
            message[key] = raw[source]
            used.add(source)
    skip = used | {opts.field_training, opts.field_training_detail}
    for key, value in raw.items():  # unmapped properties (tool_calls, name, tool_call_id, ...) pass through
        if key not in skip and value is not None and key not in message:
            message[key] = value
    role_source = dict(opts.property_mappings).get("role", "role")
    if "role" not in message:
        raise DataError(f"{where}: message has no role field {role_source!r} (keys: {sorted(raw)})")
    message["role"] = opts.role_map.get(message["role"], message["role"])
    if message.get("content") is None:
        message["content"] = ""
    if opts.split_thinking and message["role"] == "assistant" and isinstance(message["content"], str):
        reasoning, content = split_thinking_content(message["content"])
        if reasoning is not None:
            message[opts.thinking_key], message["content"] = reasoning, content
    if message.get("tool_calls"):
        calls = []
        for call in _parse_json(message["tool_calls"], "tool_calls", where):
            call = dict(call)
            if isinstance(call.get("function"), dict):
                function = dict(call["function"])
                if "arguments" in function:
                    function["arguments"] = _parse_json(function["arguments"], "tool call arguments", where)
                call["function"] = function
            calls.append(call)
        message["tool_calls"] = calls
    return message


def _tools(row: dict, opts: ChatOptions, where: str) -> list | None:
    tools = _parse_json(row.get(opts.field_tools), opts.field_tools, where)
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise DataError(f"{where}: field {opts.field_tools!r} must be a list of JSON-schema tools")
    out = []
    for tool in tools:
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            function = dict(tool["function"])
            if "parameters" in function:
                function["parameters"] = _parse_json(function["parameters"], "tool parameters", where)
            tool = {**tool, "function": function}
        out.append(tool)
    return out


def conversation_turns(row: dict, index: int, opts: ChatOptions) -> list[Turn]:
    """The row's messages as Turns: mapped, system added/dropped, each with its training flag."""
    where = _where(opts, index)
    if opts.field_messages not in row or row[opts.field_messages] is None:
        raise DataError(f"{where}: missing field {opts.field_messages!r} (field_messages); row keys: {sorted(row)}")
    raw_messages = row[opts.field_messages]
    if not isinstance(raw_messages, list) or not raw_messages:
        raise DataError(f"{where}: field {opts.field_messages!r} must be a non-empty list of messages")

    turns: list[Turn] = []
    for i, raw in enumerate(raw_messages):
        message = to_message(raw, opts, _where(opts, index, i))
        flag = raw.get(opts.field_training) if opts.field_training else None
        detail = raw.get(opts.field_training_detail) if opts.field_training_detail else None
        if flag is not None:
            train = bool(flag)
        elif detail is not None:
            train = bool(detail)
        else:
            train = opts.train_on_inputs or message["role"] in opts.roles_to_train
        turns.append(Turn(message, train, detail or None))

    if turns[0].message["role"] != "system":
        system = row.get(opts.field_system) if opts.field_system != opts.field_messages else None
        if not isinstance(system, str):
            system = opts.default_system_message
        if system is not None:
            train = opts.train_on_inputs or "system" in opts.roles_to_train
            turns.insert(0, Turn({"role": "system", "content": system}, train))
    if opts.drop_system_message and turns[0].message["role"] == "system":
        turns = turns[1:]
    return turns


# ----------------------------------------------------------------------------- locating fields


@dataclass
class _Fields:
    """Sentinel bookkeeping: the text values replaced by sentinels and which turn owns each."""

    values: list[str] = field(default_factory=list)
    owners: list[tuple[int, str]] = field(default_factory=list)  # (turn index, "content"|"reasoning"|"tool")

    def mark(self, text: str, turn: int, kind: str) -> str:
        self.values.append(text)
        self.owners.append((turn, kind))
        return f"{_OPEN}{len(self.values) - 1}{_CLOSE}"


def _with_sentinels(messages: list[dict], opts: ChatOptions) -> tuple[list[dict], _Fields]:
    fields_ = _Fields()
    out = []
    for i, message in enumerate(messages):
        m = dict(message)
        content = m.get("content")
        if isinstance(content, str) and content:
            m["content"] = fields_.mark(content, i, "content")
        elif isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str) and part["text"]:
                    part = {**part, "text": fields_.mark(part["text"], i, "content")}
                parts.append(part)
            m["content"] = parts
        reasoning = m.get(opts.thinking_key)
        if isinstance(reasoning, str) and reasoning:
            m[opts.thinking_key] = fields_.mark(reasoning, i, "reasoning")
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                call = dict(call)
                if isinstance(call.get("function"), dict):
                    function = dict(call["function"])
                    if isinstance(function.get("name"), str) and function["name"]:
                        function["name"] = fields_.mark(function["name"], i, "tool")
                    call["function"] = function
                elif isinstance(call.get("name"), str) and call["name"]:
                    call["name"] = fields_.mark(call["name"], i, "tool")
                calls.append(call)
            m["tool_calls"] = calls
        out.append(m)
    return out, fields_


def _candidates(value: str) -> list[str]:
    """The forms a template may render a value in: as is, or trimmed."""
    forms = [value, value.strip(), value.strip("\n"), value.lstrip("\n"), value.rstrip("\n"), value.lstrip(), value.rstrip()]
    return list(dict.fromkeys(forms))


def _align(sentinel_text: str, text: str, values: list[str]) -> list[tuple[int, int] | None] | None:
    """Character span in `text` of each value (its first rendering), walking both renders in step.

    None when the two renders differ outside the sentinels (the template branched on the content).
    """
    pieces = _SENTINEL_RE.split(sentinel_text)  # scaffold, key, scaffold, key, ..., scaffold
    spans: list[tuple[int, int] | None] = [None] * len(values)
    pos = 0
    for j in range(0, len(pieces) - 1, 2):
        scaffold, key, following = pieces[j], int(pieces[j + 1]), pieces[j + 2]
        if not text.startswith(scaffold, pos):
            return None
        pos += len(scaffold)
        width = next(
            (len(c) for c in _candidates(values[key]) if text.startswith(c, pos) and text.startswith(following, pos + len(c))),
            None,
        )
        if width is None:  # the template transformed the value (e.g. tojson): it ends where the scaffold resumes
            if not following:
                return None
            found = text.find(following, pos)
            if found < 0:
                return None
            width = found - pos
        if spans[key] is None:
            spans[key] = (pos, pos + width)
        pos += width
    return spans if text[pos:] == pieces[-1] else None


def _search(text: str, values: list[str], order) -> list[tuple[int, int] | None]:
    """Fallback: find each value (keys in rendering `order`) in `text`, each after the previous one."""
    spans: list[tuple[int, int] | None] = [None] * len(values)
    cursor = 0
    for key in order:
        if spans[key] is not None:
            continue
        for cand in _candidates(values[key]):
            found = text.find(cand, cursor) if cand else -1
            if found >= 0:
                spans[key] = (found, found + len(cand))
                cursor = found + len(cand)
                break
    return spans


def locate_fields(tokenizer, opts: ChatOptions, messages: list[dict], tools, text: str) -> tuple[_Fields, list]:
    """Character spans in the rendered `text` of every content/reasoning/tool-name field."""
    sentinel_messages, fields_ = _with_sentinels(messages, opts)
    if any(_OPEN in v or _CLOSE in v for v in fields_.values):
        return fields_, _search(text, fields_.values, range(len(fields_.values)))  # text holds sentinel chars
    sentinel_text = render(tokenizer, opts.template, sentinel_messages, tools=tools, template_kwargs=opts.template_kwargs)
    spans = _align(sentinel_text, text, fields_.values)
    if spans is None:
        order = [int(m.group(1)) for m in _SENTINEL_RE.finditer(sentinel_text)]
        spans = _search(text, fields_.values, order)
    return fields_, spans


# ----------------------------------------------------------------------------- labels


def _overlapping(starts: list[int], ends: list[int], lo: int, hi: int) -> range:
    """Indices of the tokens whose characters overlap [lo, hi)."""
    if hi <= lo:
        return range(0)
    return range(bisect.bisect_right(ends, lo), bisect.bisect_left(starts, hi))


def _first_token(ids, starts, lo: int, hi: int, wanted) -> int | None:
    """The first token starting in [lo, hi) whose id is in `wanted`."""
    for t in range(bisect.bisect_left(starts, lo), len(ids)):
        if starts[t] >= hi:
            return None
        if ids[t] in wanted:
            return t
    return None


def _render_or_raise(tokenizer, opts: ChatOptions, messages, where: str, **kwargs) -> str:
    try:
        return render(tokenizer, opts.template, messages, template_kwargs=opts.template_kwargs, **kwargs)
    except DataError:
        raise
    except Exception as err:  # jinja raise_exception / TypeError from bad content
        raise DataError(f"{where}: the chat template failed to render this conversation: {err}") from err


def tokenize_conversation(row: dict, index: int, tokenizer, opts: ChatOptions) -> Example:
    """One row -> {input_ids, labels} with the masking rules in the module docstring."""
    where = _where(opts, index)
    turns = conversation_turns(row, index, opts)
    tools = _tools(row, opts, where)
    messages = [t.message for t in turns]
    text = _render_or_raise(tokenizer, opts, messages, where, tools=tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    starts = [s for s, _ in encoded["offset_mapping"]]
    ends = [max(e, s + 1) for s, e in encoded["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)

    if opts.train_on_inputs and opts.legacy_last_message:
        return {"input_ids": ids, "labels": list(ids)}
    if opts.legacy_last_message:
        prefix = _render_or_raise(tokenizer, opts, messages[:-1], where, tools=tools, add_generation_prompt=True) if len(messages) > 1 else ""
        if not text.startswith(prefix):
            raise DataError(f"{where}: the conversation without its last message is not a prefix of the whole render")
        for t in _overlapping(starts, ends, len(prefix), len(text)):
            labels[t] = ids[t]
        return {"input_ids": ids, "labels": labels}

    fields_, spans = locate_fields(tokenizer, opts, messages, tools, text)
    per_turn: list[list[tuple[int, int, str]]] = [[] for _ in turns]
    for (turn, kind), span in zip(fields_.owners, spans):
        if span is not None:
            per_turn[turn].append((span[0], span[1], kind))
    first_start = [min((s for s, _, _ in f), default=None) for f in per_turn]
    last_end = [max((e for _, e, _ in f), default=None) for f in per_turn]

    eos_ids = frozenset() if opts.eos_id is None else frozenset({opts.eos_id})
    policies = (("eot", opts.eot_ids, opts.train_on_eot), ("eos", eos_ids, opts.train_on_eos))
    any_all = "all" in (opts.train_on_eos, opts.train_on_eot)
    last_closing: dict[str, int] = {}
    previous_end = 0
    for i, turn in enumerate(turns):
        if first_start[i] is None:
            if turn.train and any(owner == i for owner, _ in fields_.owners):
                raise DataError(
                    f"{_where(opts, index, i)}: could not find the content of this {turn.message['role']!r} turn "
                    "in the rendered conversation (does the chat template render it?)"
                )
            continue
        start, end = first_start[i], last_end[i]
        if not (turn.train or any_all):
            previous_end = max(previous_end, end)
            continue
        if turn.message["role"] == "assistant" and opts.generation_prompt:
            header = text.rfind(opts.generation_prompt, previous_end, start)
            if header >= 0:  # train what the template emits after the assistant header (e.g. "<think>\n")
                start = header + len(opts.generation_prompt)
        next_start = next((s for s in first_start[i + 1 :] if s is not None), len(text))
        closing = {kind: _first_token(ids, starts, end, next_start, wanted) for kind, wanted, _ in policies}
        found = [t for t in closing.values() if t is not None]
        body_end = starts[min(found)] if found else end

        if turn.train:
            if turn.detail:
                _label_detail(turn, text, per_turn[i], ids, starts, ends, labels, where=_where(opts, index, i))
            else:
                for t in _overlapping(starts, ends, start, body_end):
                    labels[t] = ids[t]
        for kind, _, policy in policies:
            t = closing[kind]
            if t is None:
                continue
            last_closing[kind] = t
            if policy == "all" or (policy == "turn" and turn.train):
                labels[t] = ids[t]
        previous_end = max(previous_end, end)

    for kind, _, policy in policies:
        if policy == "last" and kind in last_closing:
            labels[last_closing[kind]] = ids[last_closing[kind]]
    return {"input_ids": ids, "labels": labels}


def _label_detail(turn: Turn, text: str, located, ids, starts, ends, labels, where: str) -> None:
    """`message_field_training_detail`: train the tokens overlapping spans with train: true.

    Offsets are characters of the message content, `end_offset` inclusive.
    """
    content = turn.message.get("content")
    if not isinstance(content, str):
        raise DataError(f"{where}: message_field_training_detail needs a string content")
    spans = [(s, e) for s, e, kind in located if kind == "content"]
    if not spans:
        raise DataError(f"{where}: could not find the content of this turn for message_field_training_detail")
    begin, finish = spans[0]
    shift = max(content.find(text[begin:finish]), 0)  # the template may have trimmed the content
    for detail in turn.detail:
        try:
            lo, hi, train = int(detail["begin_offset"]), int(detail["end_offset"]), bool(detail["train"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{where}: a training detail needs begin_offset, end_offset and train: {detail!r}") from err
        if not train:
            continue
        lo_char = max(begin, begin + lo - shift)
        hi_char = min(finish, begin + hi + 1 - shift)
        for t in _overlapping(starts, ends, lo_char, hi_char):
            labels[t] = ids[t]


def build_chat_template_strategy(ds_cfg: Mapping[str, Any], tokenizer, settings: DataSettings) -> RowFn:
    """The RowFn of a `type: chat_template` dataset: row -> [{input_ids, labels}]."""
    opts = chat_options(ds_cfg, tokenizer, settings)

    def chat_template_row(row: dict, index: int) -> list[Example]:
        return [tokenize_conversation(row, index, tokenizer, opts)]

    chat_template_row.options = opts  # type: ignore[attr-defined]  # for --debug and tests
    return chat_template_row
