"""Preference datasets (DPO/IPO/SimPO/ORPO pairs, KTO singles, reward-model pairs, PRM steps).

A row goes through three small steps:

1. *extract*: the row's columns -> a `Conversation` (system, prompt messages, chosen/rejected or a
   labelled completion). Formats that differ only by column names are rows of `FORMATS`;
2. *render*: the conversation -> prompt and completion strings, by a `TextFamily` (the fixed ChatML /
   Llama-3 strings of axolotl's `chatml.*` / `llama3.*` types) or by a jinja chat template
   (`chat_template.*`, `bradley_terry.chat_template`). The prompt ends with the assistant header; a
   completion is its text plus the end-of-turn string;
3. *tokenize*: prompt and completions are tokenised separately (as TRL does), the EOS token is
   appended to a completion that does not already end with it, and lengths follow TRL's
   `keep_end` truncation: the prompt is cut from the left to `max_prompt_len`, then completions from
   the right so that prompt + completion <= `sequence_len`. Examples that were cut carry
   `truncated: True`.

Example fields: paired kinds (dpo, ipo, simpo, orpo) `prompt_ids`, `chosen_ids`, `rejected_ids`
(completion ids only) and the strings `prompt`, `chosen`, `rejected`; kto `prompt_ids`,
`completion_ids`, `label`, `prompt`, `completion`; rm `chosen_input_ids`, `rejected_input_ids` (whole
sequences) and `chosen`, `rejected`; prm (`stepwise_supervised`) `input_ids`, `labels` (the step's
class on its last token). Every example has `truncated`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pure.data.chat_template import render, role_map_from_config, template_choice
from pure.data.settings import IGNORE_INDEX, DataError, DataSettings, Example, RowFn
from pure.data.templates import resolve_chat_template

PAIRED_KINDS = ("dpo", "ipo", "simpo", "orpo")
KINDS = (*PAIRED_KINDS, "kto", "rm", "prm")


@dataclass(frozen=True)
class Conversation:
    """A preference row reduced to what every format shares."""

    system: str | None
    history: tuple[dict, ...]  # the prompt messages, {"role", "content"}
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None


@dataclass(frozen=True)
class FieldSpec:
    """Where a format keeps its parts. The first present column of each tuple is used.

    The prompt is the `prompt` column (a string is one user message, a list is the messages); if
    none is present, the messages of the first present `history_from` column before its last one.
    Responses may be strings, a message, or a message list (its last message is the response).
    """

    prompt: tuple[str, ...] = ("prompt",)
    chosen: tuple[str, ...] = ("chosen",)
    rejected: tuple[str, ...] = ("rejected",)
    completion: tuple[str, ...] = ("completion",)
    history_from: tuple[str, ...] = ()
    system: str | None = "system"


FORMATS: dict[str, FieldSpec] = {
    # argilla also reads ORPO's {system?, prompt?, chosen: [msgs], rejected: [msgs]}
    "argilla": FieldSpec(
        prompt=("prompt", "input", "question", "instruction"),
        chosen=("chosen", "chosen_response"),
        rejected=("rejected", "rejected_response"),
        history_from=("chosen", "completion"),
    ),
    "argilla_chat": FieldSpec(prompt=(), history_from=("chosen", "completion"), system=None),
    "icr": FieldSpec(prompt=("input",)),
    "intel": FieldSpec(prompt=("question",)),
    "prompt_pairs": FieldSpec(prompt=("prompt",)),
    "ultra": FieldSpec(prompt=("prompt",)),
}
FORMATS["default"] = FORMATS["argilla"]
KTO_FORMATS = ("argilla", "argilla_chat", "intel", "prompt_pairs", "ultra", "default")


@dataclass(frozen=True)
class TextFamily:
    """A fixed chat format: `turn` per message, `generation` opens the assistant turn, `eot` closes it."""

    turn: str
    generation: str
    eot: str

    def prompt(self, conv: Conversation) -> str:
        system = [{"role": "system", "content": conv.system}] if conv.system else []
        turns = "".join(self.turn.format(role=m["role"], content=m["content"]) for m in [*system, *conv.history])
        return turns + self.generation

    def completion(self, conv: Conversation, text: str) -> str:
        return text + self.eot


FAMILIES: dict[str, TextFamily] = {
    "chatml": TextFamily("<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "llama3": TextFamily(
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
}


@dataclass(frozen=True)
class JinjaFamily:
    """Prompt and completions rendered by a jinja chat template (`chat_template.*` types)."""

    tokenizer: Any
    template: str
    template_kwargs: Mapping[str, Any]

    def _messages(self, conv: Conversation) -> list[dict]:
        system = [{"role": "system", "content": conv.system}] if conv.system else []
        return [*system, *conv.history]

    def _render(self, messages, generation: bool) -> str:
        try:
            return render(self.tokenizer, self.template, messages, add_generation_prompt=generation,
                          template_kwargs=self.template_kwargs)
        except Exception as err:  # noqa: BLE001 - jinja raise_exception etc.
            raise DataError(f"the chat template failed to render: {err}") from err

    def prompt(self, conv: Conversation) -> str:
        return self._render(self._messages(conv), generation=True)

    def completion(self, conv: Conversation, text: str) -> str:
        """The assistant turn after the prompt: the whole render minus the prompt render, right-stripped."""
        prompt = self.prompt(conv)
        full = self._render([*self._messages(conv), {"role": "assistant", "content": text}], generation=False)
        if full.startswith(prompt):
            return full[len(prompt):].rstrip()
        # the template renders a final assistant turn differently: cut it out of a minimal conversation
        alone = self._render([{"role": "user", "content": "[[dummy_message]]"}, {"role": "assistant", "content": text}], False)
        found = alone.rfind(text) if text else -1
        if found < 0:
            raise DataError("could not find the completion in the chat template's render")
        return alone[found:].rstrip()


# ----------------------------------------------------------------------------- extraction


def _first(row: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if row.get(k) is not None), None)


@dataclass(frozen=True)
class _MessageMap:
    role: str = "role"
    content: str = "content"
    roles: Mapping[str, str] | None = None

    def __call__(self, raw, where: str, default_role: str = "assistant") -> dict:
        if isinstance(raw, str):
            return {"role": default_role, "content": raw}
        if not isinstance(raw, dict) or self.content not in raw:
            raise DataError(f"{where}: expected a message with {self.content!r}, got {raw!r:.120}")
        role = raw.get(self.role, default_role)
        return {"role": (self.roles or {}).get(role, role), "content": raw[self.content]}


def _response(value, mapper: _MessageMap, where: str) -> str:
    if isinstance(value, list):
        if not value:
            raise DataError(f"{where}: empty message list")
        value = value[-1]
    return mapper(value, where)["content"]


def extract(row: dict, spec: FieldSpec, kind: str, mapper: _MessageMap, where: str) -> Conversation:
    """A row's columns -> Conversation, following `spec`."""
    want = ("completion",) if kind == "kto" else ("chosen", "rejected")
    keys = {name: _first(row, getattr(spec, name)) for name in want}
    for name, key in keys.items():
        if key is None:
            raise DataError(f"{where}: missing field {' or '.join(getattr(spec, name))!r} ({name}); row keys: {sorted(row)}")

    prompt_key = _first(row, spec.prompt)
    if prompt_key is not None:
        prompt = row[prompt_key]
        raw_history = [prompt] if isinstance(prompt, (str, dict)) else list(prompt)
        history = [mapper(m, where, default_role="user") for m in raw_history]
    else:
        source = _first(row, spec.history_from)
        if source is None or not isinstance(row[source], list):
            wanted = spec.prompt + tuple(f"{k} (message list)" for k in spec.history_from)
            raise DataError(f"{where}: missing prompt field {' or '.join(wanted)!r}; row keys: {sorted(row)}")
        messages = row[source]
        history = [mapper(m, where, default_role="user") for m in (messages[:-1] if source in keys.values() else messages)]

    system = row.get(spec.system) if spec.system else None
    if history and history[0]["role"] == "system":
        system, history = history[0]["content"], history[1:]
    responses = {name: _response(row[key], mapper, f"{where}, field {key!r}") for name, key in keys.items()}
    label = parse_label(row.get("label"), where) if kind == "kto" else None
    return Conversation(system=system or None, history=tuple(history), label=label, **responses)


def parse_label(value, where: str) -> bool:
    """A KTO label: bool, 0/1, or "true"/"false" (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise DataError(f"{where}: field 'label' must be a boolean (desirable or not), got {value!r}")


# ----------------------------------------------------------------------------- strings from rows

Texts = dict  # {"prompt", "chosen", "rejected"} or {"prompt", "completion", "label"}


def _structured(spec: FieldSpec, family, kind: str, mapper: _MessageMap) -> Callable[[dict, str], Texts]:
    def texts(row: dict, where: str) -> Texts:
        conv = extract(row, spec, kind, mapper, where)
        out: Texts = {"prompt": family.prompt(conv)}
        for name in ("chosen", "rejected", "completion"):
            if getattr(conv, name) is not None:
                out[name] = family.completion(conv, getattr(conv, name))
        if kind == "kto":
            out["label"] = conv.label
        return out

    return texts


def _nectar(row: dict, where: str) -> Texts:
    """zephyr.nectar: the best-ranked answer (rank 1) is chosen, the next one rejected."""
    try:
        answers = sorted(row["answers"], key=lambda a: a["rank"])
        prompt = row["prompt"]
    except (KeyError, TypeError) as err:
        raise DataError(f"{where}: zephyr.nectar needs prompt and answers [{{answer, rank}}]: {err}") from err
    if len(answers) < 2:
        raise DataError(f"{where}: zephyr.nectar needs at least two ranked answers")
    return {
        "prompt": f"<|system|>\n</s>\n<|user|>\n{prompt}</s>\n<|assistant|>\n",
        "chosen": answers[0]["answer"],
        "rejected": answers[1]["answer"],
    }


def _passthrough(kind: str) -> Callable[[dict, str], Texts]:
    names = ("prompt", "completion", "label") if kind == "kto" else ("prompt", "chosen", "rejected")

    def texts(row: dict, where: str) -> Texts:
        missing = [n for n in names if n not in row]
        if missing:
            raise DataError(f"{where}: passthrough needs fields {names}, missing {missing}")
        out = {n: row[n] for n in names}
        if kind == "kto":
            out["label"] = parse_label(out["label"], where)
        return out

    return texts


class _FormatFields(dict):
    def __missing__(self, key):
        raise DataError(f"format placeholder {{{key}}} has no value (known: {sorted(self)})")


def _user_defined(spec: Mapping[str, Any], kind: str) -> Callable[[dict, str], Texts]:
    """`type:` as a mapping: field_* name the columns, *_format are str.format templates."""
    fields = {
        "prompt": spec.get("field_prompt") or "prompt",
        "system": spec.get("field_system") or "system",
        "chosen": spec.get("field_chosen") or "chosen",
        "rejected": spec.get("field_rejected") or "rejected",
        "completion": spec.get("field_completion") or "completion",
        "label": spec.get("field_label") or "label",
    }
    outputs = ("completion",) if kind == "kto" else ("chosen", "rejected")
    formats = {name: spec.get(f"{name}_format") or f"{{{name}}}" for name in ("prompt", *outputs)}

    def texts(row: dict, where: str) -> Texts:
        for name in ("prompt", *outputs):
            if row.get(fields[name]) is None:
                raise DataError(f"{where}: missing field {fields[name]!r} (field_{name}); row keys: {sorted(row)}")
        values = _FormatFields({k: v for k, v in row.items() if isinstance(v, (str, int, float))})
        values.update({name: row.get(column) or "" for name, column in fields.items() if name != "label"})
        try:
            out: Texts = {name: fmt.format_map(values) for name, fmt in formats.items()}
        except DataError as err:
            raise DataError(f"{where}: {err}") from err
        if kind == "kto":
            out["label"] = parse_label(row.get(fields["label"]), where)
        return out

    return texts


# ----------------------------------------------------------------------------- tokenization


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids if eos_id is None or (ids and ids[-1] == eos_id) else [*ids, eos_id]


def truncate_keep_end(prompt_ids: list[int], completions: list[list[int]], max_prompt_len: int | None,
                      sequence_len: int) -> tuple[list[int], list[list[int]], bool]:
    """TRL `keep_end`: prompt cut from the left to max_prompt_len, completions from the right to fit.

    If the prompt alone leaves no room, it is cut from the left to half of sequence_len.
    """
    truncated = False
    if max_prompt_len is not None and len(prompt_ids) > max_prompt_len:
        prompt_ids, truncated = prompt_ids[len(prompt_ids) - max_prompt_len:], True
    if len(prompt_ids) >= sequence_len:
        keep = max(sequence_len // 2, 1)
        prompt_ids, truncated = prompt_ids[len(prompt_ids) - keep:], True
    budget = sequence_len - len(prompt_ids)
    out = []
    for ids in completions:
        if len(ids) > budget:
            ids, truncated = ids[:budget], True
        out.append(ids)
    return prompt_ids, out, truncated


def _paired_example(texts: Texts, tokenizer, settings: DataSettings) -> Example:
    eos = getattr(tokenizer, "eos_token_id", None)
    prompt_ids = _ids(tokenizer, texts["prompt"])
    chosen = _with_eos(_ids(tokenizer, texts["chosen"]), eos)
    rejected = _with_eos(_ids(tokenizer, texts["rejected"]), eos)
    prompt_ids, (chosen, rejected), truncated = truncate_keep_end(
        prompt_ids, [chosen, rejected], settings.max_prompt_len, settings.sequence_len
    )
    return {
        "prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected,
        "prompt": texts["prompt"], "chosen": texts["chosen"], "rejected": texts["rejected"],
        "truncated": truncated,
    }


def _kto_example(texts: Texts, tokenizer, settings: DataSettings) -> Example:
    eos = getattr(tokenizer, "eos_token_id", None)
    prompt_ids = _ids(tokenizer, texts["prompt"])
    completion = _with_eos(_ids(tokenizer, texts["completion"]), eos)
    prompt_ids, (completion,), truncated = truncate_keep_end(
        prompt_ids, [completion], settings.max_prompt_len, settings.sequence_len
    )
    return {
        "prompt_ids": prompt_ids, "completion_ids": completion, "label": bool(texts["label"]),
        "prompt": texts["prompt"], "completion": texts["completion"], "truncated": truncated,
    }


def _rm_example(texts: Texts, tokenizer, settings: DataSettings) -> Example:
    """Bradley-Terry pairs: whole sequences (prompt + completion), cut from the right to sequence_len."""
    out: Example = {"truncated": False}
    for name in ("chosen", "rejected"):
        full = texts["prompt"] + texts[name]
        ids = _ids(tokenizer, full)
        if len(ids) > settings.sequence_len:
            ids, out["truncated"] = ids[: settings.sequence_len], True
        out[f"{name}_input_ids"], out[name] = ids, full
    return out


def stepwise_supervised_example(row: dict, tokenizer, settings: DataSettings, ds_cfg: Mapping[str, Any],
                                where: str) -> Example:
    """`type: stepwise_supervised` rows {prompt, completions: [steps], labels: [bool]}, as axolotl's
    StepwiseSupervisedPromptTokenizingStrategy (after TRL's PRMTrainer); the SFT and PRM kinds share it.

        input_ids = [BOS] + prompt + (step_1 + sep) + ... + (step_n + sep)
        labels    = -100 on the prompt; on each step+sep, -100 except its last token = the step's label

    `step_separator` defaults to "\\n"; a label is a bool, 0/1 or "true"/"false"; the tokenizer's BOS
    starts the prompt whenever it has one; `train_on_last_step_only` keeps only the final label. The
    completion is cut to `max_completion_length`, then the whole sequence to `sequence_len`
    (`truncated: True` when either cut).
    """
    try:
        prompt, steps, step_labels = row["prompt"], list(row["completions"]), list(row["labels"])
    except (KeyError, TypeError) as err:
        raise DataError(f"{where}: stepwise_supervised needs prompt, completions and labels: {err}") from err
    if len(steps) != len(step_labels):
        raise DataError(f"{where}: {len(steps)} completions but {len(step_labels)} labels")
    separator = _ids(tokenizer, ds_cfg.get("step_separator", "\n"))
    values = [int(parse_label(v, where)) for v in step_labels]
    if ds_cfg.get("train_on_last_step_only") and values:
        values = [IGNORE_INDEX] * (len(values) - 1) + values[-1:]
    completion_ids: list[int] = []
    completion_labels: list[int] = []
    for step, value in zip(steps, values):
        ids = _ids(tokenizer, step) + separator
        completion_ids += ids
        completion_labels += [IGNORE_INDEX] * (len(ids) - 1) + [value]
    truncated = False
    max_completion = ds_cfg.get("max_completion_length")
    if max_completion and len(completion_ids) > max_completion:
        completion_ids, completion_labels, truncated = completion_ids[:max_completion], completion_labels[:max_completion], True
    bos = getattr(tokenizer, "bos_token_id", None)
    prompt_ids = ([bos] if bos is not None else []) + _ids(tokenizer, prompt)
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_labels
    if len(input_ids) > settings.sequence_len:
        input_ids, labels, truncated = input_ids[: settings.sequence_len], labels[: settings.sequence_len], True
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def build_stepwise_strategy(ds_cfg: Mapping[str, Any], tokenizer, settings: DataSettings) -> RowFn:
    """The RowFn of a `type: stepwise_supervised` entry: row -> [stepwise_supervised_example]."""
    dataset = ds_cfg.get("path", "<dataset>")

    def stepwise_row(row: dict, index: int) -> list[Example]:
        return [stepwise_supervised_example(row, tokenizer, settings, ds_cfg, f"dataset {dataset}, row {index}")]

    return stepwise_row


# ----------------------------------------------------------------------------- the strategy


def known_types() -> list[str]:
    """The preference `type:` strings (besides a user-defined mapping)."""
    table = [f"{family}.{fmt}" for family in FAMILIES for fmt in FORMATS]
    return sorted([*table, "chat_template.default", "chat_template.argilla_chat", "chat_template.argilla",
                   "zephyr.nectar", "passthrough", "user_defined.default", "bradley_terry.chat_template",
                   "bradley_terry.llama3.icr", "stepwise_supervised"])


def _message_map(ds_cfg: Mapping[str, Any]) -> _MessageMap:
    mappings = dict(ds_cfg.get("message_property_mappings") or {})
    return _MessageMap(
        role=ds_cfg.get("message_field_role") or mappings.get("role", "role"),
        content=ds_cfg.get("message_field_content") or mappings.get("content", "content"),
        roles=role_map_from_config(ds_cfg.get("roles")),
    )


def _jinja_family(ds_cfg: Mapping[str, Any], tokenizer, settings: DataSettings) -> JinjaFamily:
    name, jinja = template_choice(ds_cfg, settings)
    kwargs = {**(settings.chat_template_kwargs or {}), **(ds_cfg.get("chat_template_kwargs") or {})}
    return JinjaFamily(tokenizer, resolve_chat_template(name, tokenizer, jinja), kwargs)


def _texts_fn(kind: str, type_spec, ds_cfg: Mapping[str, Any], tokenizer, settings: DataSettings):
    """The row -> strings function of a `type:` (see `known_types()`)."""
    if isinstance(type_spec, Mapping):
        return _user_defined(type_spec, kind)
    name = str(type_spec).strip()
    for prefix in ("dpo.", "kto.", "orpo.", "ipo.", "simpo."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    mapper = _message_map(ds_cfg)
    if name in ("passthrough", "passthrough.default"):
        return _passthrough(kind)
    if name in ("user_defined", "user_defined.default"):
        return _user_defined(ds_cfg, kind)
    if name == "zephyr.nectar" and kind != "kto":
        return _nectar
    if name == "bradley_terry.chat_template":
        return _structured(FieldSpec(prompt=("input", "prompt"), history_from=("chosen",)),
                           _jinja_family(ds_cfg, tokenizer, settings), kind, mapper)
    if name.startswith("bradley_terry."):
        name = name[len("bradley_terry."):]
    family_name, _, fmt = name.partition(".")
    fmt = fmt or "default"
    if family_name == "chat_template" and fmt in ("default", "argilla_chat", "argilla"):
        messages = ds_cfg.get("field_messages") or "messages"
        chosen = ds_cfg.get("field_chosen") or "chosen"
        rejected = ds_cfg.get("field_rejected") or "rejected"
        spec = {
            "default": FieldSpec(prompt=(messages,), chosen=(chosen,), rejected=(rejected,), system=None),
            "argilla_chat": FieldSpec(prompt=(), chosen=(chosen,), rejected=(rejected,), history_from=(chosen, "completion"), system=None),
            "argilla": FieldSpec(prompt=("prompt",), chosen=(chosen,), rejected=(rejected,), history_from=(chosen, "completion")),
        }[fmt]
        return _structured(spec, _jinja_family(ds_cfg, tokenizer, settings), kind, mapper)
    if family_name in FAMILIES and fmt in FORMATS and (kind != "kto" or fmt in KTO_FORMATS):
        return _structured(FORMATS[fmt], FAMILIES[family_name], kind, mapper)
    raise DataError(
        f"dataset {ds_cfg.get('path', '<dataset>')}: unknown {kind} dataset type {type_spec!r}; "
        f"known: {', '.join(known_types())}, or a mapping (user-defined)"
    )


def build_preference_strategy(kind: str, type_spec, ds_cfg: Mapping[str, Any], tokenizer,
                              settings: DataSettings) -> RowFn:
    """The RowFn of a preference dataset entry: row -> [example] (fields in the module docstring)."""
    if kind not in KINDS:
        raise DataError(f"unknown preference kind {kind!r}; known: {', '.join(KINDS)}")
    dataset = ds_cfg.get("path", "<dataset>")

    if kind == "prm":
        if type_spec not in ("stepwise_supervised", None):
            raise DataError(f"dataset {dataset}: process reward models read type: stepwise_supervised, got {type_spec!r}")

        return build_stepwise_strategy(ds_cfg, tokenizer, settings)

    texts_fn = _texts_fn(kind, type_spec, ds_cfg, tokenizer, settings)
    to_example = _kto_example if kind == "kto" else _rm_example if kind == "rm" else _paired_example

    def preference_row(row: dict, index: int) -> list[Example]:
        where = f"dataset {dataset}, row {index}"
        try:
            texts = texts_fn(row, where)
        except DataError as err:
            if str(err).startswith("dataset "):
                raise
            raise DataError(f"{where}: {err}") from err
        return [to_example(texts, tokenizer, settings)]

    return preference_row

