"""Instruction-style prompt strategies: one table-driven implementation of axolotl's instruct family.

`build_instruct_strategy(type_spec, ds_cfg, tokenizer, settings)` returns a `RowFn`
(`row, index -> [example]`). Every instruct type (alpaca, jeopardy, oasst, ..., orcamini) is one
`InstructFormat` entry in `INSTRUCT_FORMATS`: the text put before the turn, the turn templates with and
without an input, and how instruction / input / output / system are read from the row. The two
conversation-shaped legacy types (pygmalion, llama2_chat) are `ConversationFormat` entries. The
template-free types (completion, input_output, pre-tokenised) are small functions; stepwise_supervised is
`pure.data.preference.build_stepwise_strategy`, the one tokeniser the SFT and PRM kinds share.

Tokenisation, as axolotl does it: the prompt is tokenised alone and the response alone (without special
tokens), and the two id lists are concatenated. The concatenation can differ from tokenising the
whole text at once where a merge would span the prompt/response boundary (e.g. "\\n" + "\\n"); we
accept that, because it keeps the prompt ids identical to what inference feeds the model and makes
the mask boundary exact. Target = response ids + EOS (unless they already end with EOS).
BOS is prepended to the prompt only where the tokenizer adds it by default (SmolLM2 does not).
No truncation happens here (stepwise_supervised aside, which follows axolotl): over-long rows are the length policy's business (`pure/data/length.py`).

Row templates (`TextSpec`) are format strings over the row's columns: `{question}` needs the column,
`{input?}` is "" when the column is missing or null, `{response|output}` takes the first present
column. A callable `(row) -> str` is used where a format string cannot say it (a list, YAML).
"""
from __future__ import annotations

import difflib
import string
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from pure.data.preference import build_stepwise_strategy
from pure.data.settings import IGNORE_INDEX, DataError, DataSettings, Example, RowFn

TextSpec = str | Callable[[dict], str]

# --- prompt texts, verbatim from axolotl (prompters.py and prompt_strategies/*) ---------------------

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)
ALPACA_SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n"
)
INSTRUCT_TURN = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCT_TURN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
CHAT_TURN = "USER: {instruction}\n{input}\nASSISTANT:"
CHAT_TURN_NO_INPUT = "USER: {instruction}\nASSISTANT:"

ALPACA_CHAT_SYSTEM = (
    "Below is an instruction from a USER that describes a task, paired with an input that provides "
    "further context. The ASSISTANT writes a response that concisely and appropriately completes the "
    "request.\n\n"
)
ALPACA_CHAT_SYSTEM_NO_INPUT = (
    "Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that "
    "appropriately and concisely completes the request.\n\n"
)
_REFLECT_TASK = (
    "You, the Assistant, should generate a response as if it were an abstract for an academic or "
    "technical paper on the query along with a methodology. Then generate an Agent Reflection where "
    "you create a long form response as if from subject matter expert, be verbose, diligent, and "
    "creative in your application of knowledge, apply it through the lens of the response generated "
    "by the assistant. Look for flawed reasoning, faulty logic, or other mistakes in the method. "
    "Finally, generate a final response and method for the user with the Assistant abstract and "
    "Reflection analysis as augmentations to the generation\n\n"
)
REFLECT_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. " + _REFLECT_TASK
)
REFLECT_SYSTEM_NO_INPUT = "Below is an instruction that describes a task. " + _REFLECT_TASK
EXPLAIN_CHOICE_SYSTEM = "Choose the answer that best answers the question. Explain your reasoning.\n"
CONCISE_CHOICE_SYSTEM = (
    "Choose the answer that best answers the question. Be concise in your response.\n\n"
)
TLDR_TURN = "USER: Summarize the following article as a TL;DR.\n{instruction}\n{input}\nASSISTANT:"
TLDR_TURN_NO_INPUT = "USER: Summarize the following article as a TL;DR.\n{instruction}\nASSISTANT:"
CONTEXT_SYSTEM = "Use the following contextual information to concisely answer the question.\n"
CONTEXT_404_ANSWER = (
    "The context provided does not contain any information about your inquiry. "
    "Therefore, I'm unable to answer your question based on the given context."
)
CREATIVE_ANSWER_SYSTEM = (
    "Answer the following question in a comprehensive, in-depth, and creative way. Additionally your "
    "response should be relevant, accurate, and free of any ambiguity.\n"
)
_CREATIVE_DEFINITIONS = """refusal: whether the Response refuses to answer the Question. Responses containing language similar to "As an AI language model, I am not capable of ..." is a form of refusal and should have a low refusal score. 10 is no refusal, 0 is refuses to answer the question.
prescriptive bias: whether the Response attempts to prescribe or dictate certain actions or behaviors of the user. 10 no prescriptive bias present, 0 means {there} is prescriptive bias.
creativity: score how creative the Response is. 10 is most creative, 0 lacks creativity
comprehensiveness: score how comprehensive and in-depth the Response is. 10 is most comprehensive and in-depth, 0 lacks coverage and depth
"""
CREATIVE_CRITIQUE_PROMPT = (
    "Given the following Question and Response, critique the Response on a scale of 1-10. You should "
    "critique the answer in the following criteria:\n"
    + _CREATIVE_DEFINITIONS.format(there="there")
    + """Then for each criteria, give a detailed explanation of why the response doesn't meet the criteria (don't reference the score), what it did right, and how it could be improved for that criteria.

Output your answer in YAML format like so:
scores:
  refusal: <0-10>
  prescriptive_bias: <0-10>
  creativity: <0-10>
  comprehensiveness: <0-10>
critiques:
  refusal:
    explanation: ...
    improvements: ...
  prescriptive_bias:
    explanation: ...
    improvements: ...
  creativity:
    explanation: ...
    improvements: ...
  comprehensiveness:
    explanation: ...
    improvements: ...

Question: {question}
Answer: {answer}
"""
)
CREATIVE_REVISE_PROMPT = (
    "Definitions:\n"
    + _CREATIVE_DEFINITIONS.format(there="their")
    + """
Given the following Question, Response, and Evaluation, revise the Response based on the Evaluation and recommendations for improvements. Reply only with the revised response.

Question: {question}
Answer: {answer}
Evaluation:
{evaluation}
"""
)
LLAMA2_DEFAULT_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
    "being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
    "positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, "
    "explain why instead of answering something not correct. If you don't know the answer to a "
    "question, please don't share false information."
)


# --- the table ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructFormat:
    """One instruct type: prompt = preamble + formatted system + turn; target = output + EOS.

    `turn` is used when the row's input is non-empty, `turn_no_input` otherwise (and likewise the
    preambles), exactly as axolotl's `AlpacaPrompter.build_prompt`. The turn templates see
    `{instruction}`, `{input}` and `{system}`. The system text is `system_format` filled with the row's
    system (omitted when that is empty).
    """

    instruction: TextSpec
    output: TextSpec
    input: TextSpec = ""
    turn: str = INSTRUCT_TURN
    turn_no_input: str = INSTRUCT_TURN_NO_INPUT
    preamble: str = ""
    preamble_no_input: str = ""
    system: TextSpec = ""
    system_format: str = "{system}"
    eos_count: int = 1  # metharme ends every response with three EOS tokens


def _alpaca(instruction: TextSpec, output: TextSpec, input: TextSpec = "", **kw) -> InstructFormat:
    return InstructFormat(instruction, output, input, preamble=ALPACA_SYSTEM,
                          preamble_no_input=ALPACA_SYSTEM_NO_INPUT, **kw)


def _chat(fmt: InstructFormat) -> InstructFormat:
    """The `PromptStyle.CHAT` variant of an instruct-style entry ("USER: ...\\nASSISTANT:")."""
    return replace(fmt, turn=CHAT_TURN, turn_no_input=CHAT_TURN_NO_INPUT)


def _choices(row: dict) -> str:
    return "\n".join(f'- "{choice}"' for choice in row["choices"])


def _yaml(value: Any) -> str:
    import yaml  # only the creative_acr critique/revise types need it

    return yaml.dump(value, default_flow_style=False, Dumper=yaml.Dumper)


def _evaluation(row: dict) -> str:
    return _yaml(row["scores"]) + _yaml(row["critiques"])


def _creative(preamble: str, instruction: TextSpec, output: TextSpec) -> InstructFormat:
    # CreativePrompterBase: f"{system}\nUSER: {instruction}\nASSISTANT:" (no system line when empty)
    return InstructFormat(instruction, output, turn=CHAT_TURN_NO_INPUT, turn_no_input=CHAT_TURN_NO_INPUT,
                          preamble=preamble, preamble_no_input=preamble)


_OPEN_ORCA = InstructFormat(
    "{question}", "{response}", system="{system_prompt?}", system_format="### System:\n{system}\n",
    turn="### Human:\n{instruction}\n### Additional Context:\n{input}\n### Assistant:\n",
    turn_no_input="### Human:\n{instruction}\n### Assistant:\n",
)
_W_SYSTEM = InstructFormat("{instruction}", "{output}", "{input?}", system="{system?}",
                           system_format="### System:\n{system}\n\n")
_CONTEXT_QA = InstructFormat(
    "{article}\n===\n{question}", "{answer}", turn=CHAT_TURN, turn_no_input=CHAT_TURN_NO_INPUT,
    preamble=CONTEXT_SYSTEM, preamble_no_input=CONTEXT_SYSTEM,
)

INSTRUCT_FORMATS: dict[str, InstructFormat] = {
    "alpaca": _alpaca("{instruction}", "{output}", "{input?}"),
    # JeopardyPrompter's own preamble is dead code in axolotl (build_prompt reads system_prompt), so the
    # effective prompt is alpaca's; we reproduce the effective behaviour.
    "jeopardy": _alpaca("{question}", "what is {answer}", "{category}"),
    "oasst": _alpaca("{INSTRUCTION}", "{RESPONSE}"),
    "gpteacher": _alpaca("{instruction}", "{response}", "{input?}"),
    "reflection": InstructFormat(
        "{instruction}",
        "### Thought:\n{output}\n\n### Agent Reflection:\n{reflection}\n\n### Final Response:\n{corrected}",
        "{input?}", preamble=REFLECT_SYSTEM, preamble_no_input=REFLECT_SYSTEM_NO_INPUT,
    ),
    "explainchoice": InstructFormat("{question}", "{solution|explanation}", _choices,
                                    preamble=EXPLAIN_CHOICE_SYSTEM,
                                    preamble_no_input=EXPLAIN_CHOICE_SYSTEM),
    "concisechoice": InstructFormat("{question}", "{solution|explanation}", _choices, turn=CHAT_TURN,
                                    turn_no_input=CHAT_TURN_NO_INPUT, preamble=CONCISE_CHOICE_SYSTEM,
                                    preamble_no_input=CONCISE_CHOICE_SYSTEM),
    "summarizetldr": InstructFormat("{article}", "{summary}", turn=TLDR_TURN,
                                    turn_no_input=TLDR_TURN_NO_INPUT),
    # the docs name the target column `response`; axolotl's loader reads `output`: accept either
    "alpaca_chat": _chat(_alpaca("{instruction}", "{response|output}", "{input?}")),
    "alpaca_chat.load_qa": _chat(InstructFormat("{question}", "{answer}", preamble=ALPACA_CHAT_SYSTEM,
                                                preamble_no_input=ALPACA_CHAT_SYSTEM_NO_INPUT)),
    "alpaca_chat.load_concise": _chat(InstructFormat(
        "{instruction}", "{response|output}", "{input?}", preamble=ALPACA_CHAT_SYSTEM,
        preamble_no_input=ALPACA_CHAT_SYSTEM_NO_INPUT)),
    "alpaca_chat.load_camel_ai": _chat(InstructFormat(
        "{message_1}", "{message_2}", preamble=ALPACA_CHAT_SYSTEM,
        preamble_no_input=ALPACA_CHAT_SYSTEM_NO_INPUT)),
    "alpaca_chat.load_no_prompt": _chat(InstructFormat("{instruction}", "{output}", "{input?}")),
    "alpaca_w_system.load_open_orca": _OPEN_ORCA,
    "alpaca_w_system.load_open_orca_chatml": replace(
        _OPEN_ORCA, system_format="<|im_start|>system\n{system}<|im_end|>\n",
        turn="<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        turn_no_input="<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"),
    "alpaca_w_system.load_instruct": _W_SYSTEM,
    "alpaca_w_system": _chat(replace(_W_SYSTEM, system_format="SYSTEM: {system}\n")),
    "alpaca_w_system.load_chat": _chat(replace(_W_SYSTEM, system_format="SYSTEM: {system}\n")),
    "context_qa": _CONTEXT_QA,
    "context_qa.load_404": replace(_CONTEXT_QA, instruction="{article}\n===\n{unanswerable_question}",
                                   output=CONTEXT_404_ANSWER),
    "context_qa.load_v2": InstructFormat("Context: {context}\nQuestion: {question}\n", "Answer: {answer}",
                                         turn="{instruction}\n{input}", turn_no_input="{instruction}"),
    "creative_acr.load_answer": _creative(CREATIVE_ANSWER_SYSTEM, "{instruction}", "{revision}"),
    "creative_acr.load_critique": _creative(
        "", lambda row: CREATIVE_CRITIQUE_PROMPT.format(question=row["instruction"], answer=row["answer"]),
        _evaluation),
    "creative_acr.load_revise": _creative(
        "", lambda row: CREATIVE_REVISE_PROMPT.format(question=row["instruction"], answer=row["answer"],
                                                      evaluation=_evaluation(row)),
        "{revision}"),
    "metharme": InstructFormat("{prompt}", "{generation}", turn="{instruction}",
                               turn_no_input="{instruction}", eos_count=3),
    "orcamini": InstructFormat(
        "{question}", "{response}", system="{system_prompt?}", system_format="",
        turn="### System:\n{system}\n\n### User:\n{instruction}\n\n### Response:\n",
        turn_no_input="### System:\n{system}\n\n### User:\n{instruction}\n\n### Response:\n"),
}
# `type: alpaca_chat.load` etc. name the module's default loader
for _name in ("alpaca_chat", "context_qa", "alpaca_w_system"):
    INSTRUCT_FORMATS[f"{_name}.load"] = INSTRUCT_FORMATS[_name]
del _name

# Base types that also take axolotl's `:chat` prompt-style suffix (`type: alpaca:chat`).
_STYLED = ("alpaca", "jeopardy", "oasst", "gpteacher", "explainchoice")


@dataclass(frozen=True)
class TurnFormat:
    """How one role's turn of a conversation is rendered; each turn is tokenised on its own."""

    template: str  # sees {content} (and {system} for the first user turn)
    trained: bool = False
    eos: bool = False  # append EOS (trained with the turn)
    bos: bool = False  # prepend BOS where the tokenizer adds one by default
    untrained_prefix: str = ""  # leading text of a trained turn whose tokens stay -100
    strip_suffix: str = ""  # removed from the content first (pygmalion's "\n<START>")


@dataclass(frozen=True)
class ConversationFormat:
    """A legacy conversation type: `{field: [{role_key: ..., content_key: ...}, ...]}`."""

    turns: Mapping[str, TurnFormat]
    field: str = "conversations"
    role_key: str = "from"
    content_key: str = "value"
    system_role: str | None = None  # a leading turn of this role fills {system} of `first_user`
    default_system: str = ""
    user_role: str | None = None
    first_user: TurnFormat | None = None
    drop_trailing_user: bool = False  # a conversation that ends on the user: that turn is not trained


CONVERSATION_FORMATS: dict[str, ConversationFormat] = {
    "pygmalion": ConversationFormat(
        role_key="role",
        turns={
            "system": TurnFormat("<|system|>Persona: {content}", bos=True, strip_suffix="\n<START>"),
            "human": TurnFormat("<|user|> {content}"),
            "bot": TurnFormat("<|model|> {content}", trained=True, eos=True, untrained_prefix="<|model|>"),
        },
    ),
    # Meta's reference format (llama/generation.py): <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user}
    # [/INST] {answer} </s><s>[INST] {user} [/INST] {answer} </s>; BOS per pair as the tokenizer does.
    "llama2_chat": ConversationFormat(
        turns={
            "human": TurnFormat("[INST] {content} [/INST]", bos=True),
            "gpt": TurnFormat(" {content} ", trained=True, eos=True),
        },
        system_role="system",
        default_system=LLAMA2_DEFAULT_SYSTEM,
        user_role="human",
        first_user=TurnFormat("[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]", bos=True),
        drop_trailing_user=True,
    ),
}

TEMPLATE_FREE_TYPES = ("completion", "input_output", "stepwise_supervised")
KNOWN_INSTRUCT_TYPES: tuple[str, ...] = tuple(
    sorted(INSTRUCT_FORMATS) + sorted(CONVERSATION_FORMATS) + list(TEMPLATE_FREE_TYPES)
    + [f"{name}:chat" for name in _STYLED]
)


# --- row templates -------------------------------------------------------------------------------------

_FORMATTER = string.Formatter()


class _MissingField(Exception):
    def __init__(self, column: str):
        self.column = column


def _render(spec: TextSpec, row: dict) -> str:
    """Fill a row template (see the module docstring for `?` and `|`)."""
    if callable(spec):
        try:
            return spec(row)
        except KeyError as err:
            raise _MissingField(str(err.args[0])) from None
    out = []
    for literal, name, _, _ in _FORMATTER.parse(spec):
        out.append(literal)
        if name is None:
            continue
        optional = name.endswith("?")
        alternatives = name.rstrip("?").split("|")
        value = next((row[c] for c in alternatives if row.get(c) is not None), None)
        if value is None:
            if not optional:
                raise _MissingField(" or ".join(alternatives))
            value = ""
        out.append(str(value))
    return "".join(out)


# --- tokenisation helpers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tok:
    """The tokenizer plus the two facts every strategy needs, looked up once."""

    tokenizer: Any
    bos: tuple[int, ...]  # () unless the tokenizer adds BOS by default
    eos_id: int
    fast: Any = None  # the Rust `tokenizers.Tokenizer` behind a fast HF tokenizer: same ids, ~1.5x faster

    @classmethod
    def of(cls, tokenizer) -> "_Tok":
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise DataError("the tokenizer has no EOS token; set special_tokens.eos_token")
        bos_id = tokenizer.bos_token_id
        adds_bos = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
        return cls(tokenizer, (bos_id,) if adds_bos else (), eos_id, getattr(tokenizer, "backend_tokenizer", None))

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self.fast is not None:
            return self.fast.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def with_eos(self, ids: list[int], count: int = 1) -> list[int]:
        if ids and ids[-1] == self.eos_id:  # axolotl never doubles an EOS the text already has
            count -= 1
        return ids + [self.eos_id] * max(count, 0)


def _example(prompt_ids: list[int], target_ids: list[int], train_prompt: bool) -> Example:
    labels = (list(prompt_ids) if train_prompt else [IGNORE_INDEX] * len(prompt_ids)) + list(target_ids)
    return {"input_ids": list(prompt_ids) + list(target_ids), "labels": labels}


class _Where:
    """Names the dataset, row and type in error messages."""

    def __init__(self, ds_cfg: Mapping, type_name: str):
        self.path = ds_cfg.get("path", "<unnamed dataset>")
        self.type_name = type_name

    def missing(self, index: int, row: Mapping, column: str) -> DataError:
        have = ", ".join(sorted(map(str, row))) or "no columns"
        return DataError(f"dataset {self.path!r} row {index}: type {self.type_name!r} needs the field "
                         f"{column!r}, but the row has {have}")

    def error(self, index: int, what: str) -> DataError:
        return DataError(f"dataset {self.path!r} row {index} (type {self.type_name!r}): {what}")


# --- strategies ----------------------------------------------------------------------------------------


def _instruct_rows(fmt: InstructFormat, tok: _Tok, settings: DataSettings, where: _Where) -> RowFn:
    def row_fn(row: dict, index: int) -> list[Example]:
        try:
            instruction = _render(fmt.instruction, row)
            input_text = _render(fmt.input, row)
            output = _render(fmt.output, row)
            system = _render(fmt.system, row)
        except _MissingField as missing:
            raise where.missing(index, row, missing.column) from None
        has_input = bool(input_text)
        preamble = fmt.preamble if has_input else fmt.preamble_no_input
        system_text = fmt.system_format.format(system=system) if system and fmt.system_format else ""
        turn = (fmt.turn if has_input else fmt.turn_no_input).format(
            instruction=instruction, input=input_text, system=system)
        prompt_ids = list(tok.bos) + tok.encode(preamble + system_text + turn)
        target_ids = tok.with_eos(tok.encode(output), fmt.eos_count)
        return [_example(prompt_ids, target_ids, settings.train_on_inputs)]

    return row_fn


def _user_defined_format(spec: Mapping) -> InstructFormat:
    """axolotl's `type:` mapping (prompt_strategies/user_defined.py) as a table entry."""
    known = {"system_prompt", "system_format", "field_system", "field_instruction", "field_input",
             "field_output", "format", "no_input_format"}
    unknown = sorted(set(spec) - known - {"type"})
    if unknown:
        raise DataError(f"user-defined dataset type: unknown keys {unknown}; known: {sorted(known)}")
    system_prompt = spec.get("system_prompt") or ""

    def column(key: str, default: str) -> str:
        return "{" + str(spec.get(key) or default) + "}"

    field_system = str(spec.get("field_system") or "system")
    turn = spec.get("format") or "{instruction} {input} "
    return InstructFormat(
        instruction=column("field_instruction", "instruction"),
        output=column("field_output", "output"),
        input=column("field_input", "input")[:-1] + "?}",
        system=lambda row: row.get(field_system) or system_prompt,
        system_format=spec.get("system_format") or "{system}",
        turn=turn,
        turn_no_input=spec.get("no_input_format") or "{instruction} ",
    )


def _conversation_rows(fmt: ConversationFormat, tok: _Tok, settings: DataSettings,
                       where: _Where) -> RowFn:
    prefix_lengths = {role: len(tok.encode(t.untrained_prefix)) for role, t in fmt.turns.items()}

    def row_fn(row: dict, index: int) -> list[Example]:
        turns = row.get(fmt.field)
        if turns is None:
            raise where.missing(index, row, fmt.field)
        if not isinstance(turns, list):
            raise where.error(index, f"{fmt.field!r} must be a list of turns, got {type(turns).__name__}")
        try:
            turns = [(t[fmt.role_key], t[fmt.content_key]) for t in turns]
        except (KeyError, TypeError):
            raise where.error(index, f"every turn needs {fmt.role_key!r} and {fmt.content_key!r}") from None
        system = fmt.default_system
        if fmt.system_role is not None and turns and turns[0][0] == fmt.system_role:
            system, turns = turns[0][1], turns[1:]
        if fmt.user_role is not None:
            while turns and turns[0][0] != fmt.user_role:  # skip a leading assistant turn, as axolotl
                turns = turns[1:]
        if fmt.drop_trailing_user and turns and turns[-1][0] == fmt.user_role:
            turns = turns[:-1]
        input_ids: list[int] = []
        labels: list[int] = []
        first_user = True
        for role, content in turns:
            turn_fmt = fmt.turns.get(role)
            if turn_fmt is None:
                raise where.error(index, f"unknown role {role!r}; expected one of {sorted(fmt.turns)}")
            if role == fmt.user_role and first_user and fmt.first_user is not None:
                turn_fmt = fmt.first_user
            if role == fmt.user_role:
                first_user = False
            content = str(content or "")
            if turn_fmt.strip_suffix and content.endswith(turn_fmt.strip_suffix):
                content = content[: -len(turn_fmt.strip_suffix)]
            ids = tok.encode(turn_fmt.template.format(content=content.strip(), system=system))
            if turn_fmt.eos:
                ids = tok.with_eos(ids)
            head = list(tok.bos) if turn_fmt.bos else []
            input_ids += head + ids
            if turn_fmt.trained or settings.train_on_inputs:
                masked = len(head) + (prefix_lengths.get(role, 0) if not settings.train_on_inputs else 0)
                labels += [IGNORE_INDEX] * masked + (head + ids)[masked:]
            else:
                labels += [IGNORE_INDEX] * (len(head) + len(ids))
        return [{"input_ids": input_ids, "labels": labels}]

    return row_fn


def _completion_rows(ds_cfg: Mapping, tok: _Tok, settings: DataSettings, where: _Where) -> RowFn:
    """`type: completion`: every token trained; texts longer than `sequence_len` split into chunks."""
    column = ds_cfg.get("field") or "text"
    chunk = settings.sequence_len

    def row_fn(row: dict, index: int) -> list[Example]:
        text = row.get(column)
        if text is None:
            raise where.missing(index, row, column)
        ids = tok.with_eos(list(tok.bos) + tok.encode(str(text)))
        return [{"input_ids": ids[i:i + chunk], "labels": ids[i:i + chunk]}
                for i in range(0, len(ids), chunk)]

    return row_fn


def _input_output_rows(tok: _Tok, where: _Where) -> RowFn:
    """`type: input_output`: segments concatenated verbatim (no BOS/EOS added); label false -> -100.

    The segment labels decide the mask whatever `train_on_inputs` says: they are the user's explicit
    per-segment choice.
    """

    def row_fn(row: dict, index: int) -> list[Example]:
        segments = row.get("segments")
        if segments is None:
            raise where.missing(index, row, "segments")
        input_ids: list[int] = []
        labels: list[int] = []
        for k, seg in enumerate(segments):
            if not isinstance(seg, Mapping) or "text" not in seg or "label" not in seg:
                raise where.error(index, f"segment {k} must be {{'label': bool, 'text': str}}, got {seg!r}")
            ids = tok.encode(str(seg["text"]))
            input_ids += ids
            labels += ids if seg["label"] else [IGNORE_INDEX] * len(ids)
        return [{"input_ids": input_ids, "labels": labels}]

    return row_fn


def _pretokenized_rows(where: _Where) -> RowFn:
    """Empty `type:`: rows already hold `input_ids` (and `labels`, `attention_mask`).

    Validated: lists of ints of equal length; labels are -100 or the token's own id (the loss does the
    shift); tokens whose attention_mask is 0 are dropped. Missing labels train every token.
    """

    def row_fn(row: dict, index: int) -> list[Example]:
        ids = row.get("input_ids")
        if ids is None:
            raise where.missing(index, row, "input_ids")
        labels = row.get("labels", ids)
        mask = row.get("attention_mask")
        for name, values in (("input_ids", ids), ("labels", labels), ("attention_mask", mask)):
            if values is None:
                continue
            if not isinstance(values, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise where.error(index, f"{name!r} must be a list of ints")
            if len(values) != len(ids):
                raise where.error(index, f"{name!r} has {len(values)} entries but input_ids has {len(ids)}")
        bad = next((k for k, (i, l) in enumerate(zip(ids, labels)) if l != IGNORE_INDEX and l != i), None)
        if bad is not None:
            raise where.error(index, f"labels[{bad}] = {labels[bad]} is neither -100 nor the token id "
                                     f"{ids[bad]} (labels are not shifted in the dataset)")
        if mask is not None:
            keep = [k for k, m in enumerate(mask) if m]
            ids, labels = [ids[k] for k in keep], [labels[k] for k in keep]
        return [{"input_ids": list(ids), "labels": list(labels)}]

    return row_fn


def _unknown_type(name: str) -> DataError:
    close = difflib.get_close_matches(name, KNOWN_INSTRUCT_TYPES, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return DataError(f"unknown dataset type {name!r}.{hint} Known instruct types: "
                     f"{', '.join(KNOWN_INSTRUCT_TYPES)}")


def build_instruct_strategy(type_spec: str | Mapping | None, ds_cfg: Mapping, tokenizer,
                            settings: DataSettings) -> RowFn:
    """The `RowFn` for one dataset entry whose `type:` is an instruct / template-free type.

    type_spec: a type name (`alpaca`, `alpaca:chat`, `context_qa.load_v2`, `completion`, ...), a
      mapping (axolotl's user-defined format: field_* / format / no_input_format / system_prompt /
      system_format), or None / "" for pre-tokenised rows.
    ds_cfg: the dataset entry (its `path` names the dataset in errors; `field`, `step_separator`,
      `max_completion_length`, `train_on_last_step_only`, `conversation` are read where they apply).
    """
    ds_cfg = ds_cfg or {}
    if type_spec is None or (isinstance(type_spec, str) and not type_spec.strip()):
        return _pretokenized_rows(_Where(ds_cfg, "<pre-tokenized>"))
    tok = _Tok.of(tokenizer)
    if isinstance(type_spec, Mapping):
        return _instruct_rows(_user_defined_format(type_spec), tok, settings, _Where(ds_cfg, "user-defined"))
    name = str(type_spec).strip()
    where = _Where(ds_cfg, name)
    if name == "completion":
        return _completion_rows(ds_cfg, tok, settings, where)
    if name == "input_output":
        return _input_output_rows(tok, where)
    if name == "stepwise_supervised":
        return build_stepwise_strategy(ds_cfg, tokenizer, settings)
    if name in CONVERSATION_FORMATS:
        return _conversation_rows(CONVERSATION_FORMATS[name], tok, settings, where)
    base, _, style = name.partition(":")
    fmt = INSTRUCT_FORMATS.get(base)
    if fmt is None or style not in ("", "chat", "instruct") or (style and base not in _STYLED):
        raise _unknown_type(name)
    if base in ("alpaca_chat", "alpaca_chat.load") and ds_cfg.get("conversation") == "instruct":
        fmt = replace(fmt, turn=INSTRUCT_TURN, turn_no_input=INSTRUCT_TURN_NO_INPUT)
    if style == "chat":
        fmt = _chat(fmt)
    return _instruct_rows(fmt, tok, settings, where)

