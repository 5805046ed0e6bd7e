"""What a dataset entry names outside `pure/`: a user's transform module and a chat template file.

`pure.data.registry.resolve_strategy` builds prompt strategies from values; `entry_strategy` is the
I/O half in front of it. It reads the entry's `chat_template_jinja` file, and when no built-in
strategy knows the entry's `type:`, imports the `module.fn` it names from the working directory
(axolotl's user dataset transforms) and hands pure the callable.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Mapping

from backends.templates import read_jinja
from pure.data.registry import resolve_strategy
from pure.data.settings import DataError, DataSettings, RowFn


def import_user_function(name: str) -> Callable | None:
    """The callable `module.fn` importable from the working directory, or None when there is none."""
    module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        return None
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # only for this import: the working directory stays off sys.path afterwards
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = getattr(module, attr, None)
    return fn if callable(fn) else None


def entry_strategy(kind: str, entry: Mapping[str, Any], tokenizer, settings: DataSettings, *,
                   config: Mapping[str, Any] | None = None, dataset_index: int = 0) -> RowFn:
    """The RowFn of one dataset entry: a built-in strategy, else the user transform its `type:` names.

    The entry's `chat_template_jinja` reaches pure as template text (`read_jinja`); `config` and
    `dataset_index` are what a user transform receives (see `resolve_strategy`).
    """
    entry = dict(entry)
    if entry.get("chat_template_jinja"):
        try:
            entry["chat_template_jinja"] = read_jinja(str(entry["chat_template_jinja"]), "chat_template_jinja")
        except ValueError as err:
            raise DataError(f"dataset {entry.get('path')!r}: {err}") from None
    try:
        return resolve_strategy(kind, entry, tokenizer, settings, config=config, dataset_index=dataset_index)
    except DataError:
        type_spec = entry.get("type")
        transform = import_user_function(type_spec) if isinstance(type_spec, str) else None
        if transform is None:
            raise
    return resolve_strategy(kind, entry, tokenizer, settings, config=config, dataset_index=dataset_index,
                            transform=transform)
