"""GRPO's prompt datasets: rows that hold a `prompt` (and the columns reward functions read), not
tokenised examples, since the trainer generates the completions.

    rows = load_prompt_rows(config["datasets"], config=config)     # [{"prompt": ..., "answer": ...}, ...]
    train, evals = split_prompt_rows(rows, val_set_size, seed)
    rows = tokenize_prompts(train, tokenizer, chat_template_kwargs=kwargs, max_prompt_length=512)

Each entry is read as every other dataset entry is (`backends.data_sources`: local files and
folders, Hub datasets in the local cache). An entry whose `type:` names a user transform `module.fn`
(axolotl's GRPO dataset transforms) is mapped as `datasets.map` would map it:
`fn(cfg, dataset_idx=i)` (or `fn(cfg)`) returns `map_fn` or `(map_fn, {"remove_columns": [...] | "__all__"})`;
`map_fn(row, tokenizer=None)` returns the new columns, merged over the row less the removed ones.
Without `type:` the rows must already have a `prompt`. A prompt is a string or a list of
`{"role", "content"}` messages; anything else is a DataError naming the dataset and the row.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from backends.data_sources import dataset_label, load_dataset_entry
from backends.user_code import UserFunctionError, load_user_function
from pure.data.registry import resolve_strategy
from pure.data.settings import DataError, DataSettings

# Column names the trainer adds to a prompt row.
PROMPT_IDS = "prompt_ids"


def is_chat_prompt(prompt: Any) -> bool:
    """Whether a prompt is chat messages (a non-empty list of dicts with `role`), TRL's `is_conversational`."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(m, Mapping) and "role" in m for m in prompt))


def _prompt_problem(prompt: Any) -> str | None:
    """What is wrong with a prompt value, or None for a string or well-formed chat messages."""
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, (list, tuple)):
        return f"a {type(prompt).__name__}"
    if not prompt:
        return "an empty list"
    for j, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            return f"a list whose message {j} is a {type(message).__name__}"
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), (str, list)):
            return f"a list whose message {j} has keys {sorted(message)} (role {message.get('role')!r})"
    return None


def check_prompt_row(row: Mapping, where: str) -> None:
    """A DataError starting with `where` (the dataset and row) unless `row["prompt"]` is a string or chat messages."""
    if "prompt" not in row:
        raise DataError(f"{where}: no 'prompt' column (found {sorted(row)}); a GRPO row needs "
                        "prompt: a string or a list of {role, content} messages, made by a `type: module.fn` "
                        "transform when the file does not hold one")
    problem = _prompt_problem(row["prompt"])
    if problem is not None:
        raise DataError(f"{where}: 'prompt' is {problem}; expected a string or a list of "
                        "{role, content} messages")


def _entry_row_fn(entry: Mapping, index: int, tokenizer, settings: DataSettings, config: Mapping | None, kind: str):
    """The RowFn of one entry: its user transform (strictly imported, so a typo says what failed), or
    the rows as they are when there is no `type:`."""
    label = dataset_label(entry)
    type_spec = entry.get("type")
    transform = None
    if type_spec not in (None, ""):
        try:
            transform = load_user_function(str(type_spec), "dataset transform")
        except UserFunctionError as err:
            raise DataError(f"dataset {label}: {err}; rl: {kind} datasets name a transform module.fn "
                            "in `type:`") from None
    try:
        return resolve_strategy(kind, entry, tokenizer, settings, config=config, dataset_index=index,
                                transform=transform)
    except DataError:
        raise
    except Exception as err:  # the user's outer transform function raised
        raise DataError(f"dataset {label}: transform {type_spec!r} raised {type(err).__name__}: {err}") from None


def load_prompt_rows(entries: Sequence[Mapping], *, config: Mapping | None = None, tokenizer=None,
                     settings: DataSettings | None = None, kind: str = "grpo") -> list[dict]:
    """Every row of every entry, in order, transformed and checked to hold a prompt.

    config: the whole config as a plain dict, handed to transforms as `cfg` (default: the settings
    plus the entry); tokenizer: handed to a `map_fn` that takes one; kind: the `rl:` value (grpo,
    gdpo, ebft), for messages.
    """
    settings = settings or DataSettings()
    rows: list[dict] = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        label = dataset_label(entry)
        row_fn = _entry_row_fn(entry, i, tokenizer, settings, config, kind)
        for index, raw in enumerate(load_dataset_entry(entry)):
            for row in row_fn(raw, index):
                check_prompt_row(row, f"dataset {label} row {index}")
                rows.append(dict(row))
    return rows


def prompt_token_ids(prompt, tokenizer, chat_template_kwargs: Mapping | None = None) -> list[int]:
    """A chat prompt through the tokenizer's chat template with the generation prompt (TRL's
    `_tokenize_prompts`); a plain one tokenised as TRL does, `tokenizer(text)` with its default
    special tokens."""
    if is_chat_prompt(prompt):
        encoded = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                                return_dict=True, **(chat_template_kwargs or {}))
        return list(encoded["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def tokenize_prompts(rows: Sequence[Mapping], tokenizer, *, chat_template_kwargs: Mapping | None = None,
                     max_prompt_length: int | None = None, truncate: bool = False) -> list[dict]:
    """The rows with `prompt_ids` added.

    A prompt longer than `max_prompt_length` tokens is a DataError naming the row, unless `truncate`:
    then it keeps its last `max_prompt_length` tokens (TRL's left truncation, which keeps the
    generation prompt at the end).
    """
    kwargs = dict(chat_template_kwargs or {})
    out = []
    for index, row in enumerate(rows):
        check_prompt_row(row, f"prompt row {index}")
        try:
            ids = prompt_token_ids(row["prompt"], tokenizer, kwargs)
        except DataError:
            raise
        except Exception as err:  # e.g. a tokenizer without a chat template, a template raising
            raise DataError(f"prompt row {index}: could not tokenise the prompt: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if not truncate:
                raise DataError(f"prompt row {index} has {len(ids)} tokens, more than max_prompt_length="
                                f"{max_prompt_length}; shorten the prompt or raise max_prompt_length")
            ids = ids[-max_prompt_length:]
        out.append({**row, PROMPT_IDS: ids})
    return out


def split_prompt_rows(rows: list[dict], val_set_size: float | int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): `val_set_size` rows (a whole number) or that fraction (< 1), chosen with `seed`
    (`backends.datasets.split_validation`); no split when it is 0 or None."""
    from backends.datasets import split_validation  # lazily: it pulls in torch, which reward workers skip

    if not val_set_size:
        return list(rows), []
    return split_validation(list(rows), val_set_size, seed)
