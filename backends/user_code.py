"""What a dataset entry names outside `pure/`: a user's transform module and a chat template file.

`pure.data.registry.resolve_strategy` builds prompt strategies from values; `entry_strategy` is the
I/O half in front of it. It reads the entry's `chat_template_jinja` file, and when no built-in
strategy knows the entry's `type:`, imports the `module.fn` it names from the working directory
(axolotl's user dataset transforms) and hands pure the callable.

`load_user_function` is the strict form for names that must resolve (reward functions, a rollout
function, a GRPO dataset transform): it raises a `UserFunctionError` saying whether the module was
not found, failed to import, lacks the attribute or holds something not callable.
"""
from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Mapping

from backends.templates import read_jinja
from pure.data.registry import resolve_strategy
from pure.data.settings import DataError, DataSettings, RowFn


@contextmanager
def _working_directory_on_path():
    """The working directory on sys.path for the duration of one import, and off it afterwards."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield cwd
    finally:
        if added:
            sys.path.remove(cwd)


def import_user_function(name: str) -> Callable | None:
    """The callable `module.fn` importable from the working directory, or None when there is none."""
    module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        return None
    with _working_directory_on_path():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    fn = getattr(module, attr, None)
    return fn if callable(fn) else None


class UserFunctionError(ValueError):
    """A `module.fn` that cannot be used, saying which part failed. `reason` is one of `not_dotted`,
    `module_not_found`, `import_failed`, `no_attribute`, `not_callable`, for callers that add advice."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def load_user_function(name: str, what: str = "function") -> Callable:
    """The callable `module.fn` importable from the working directory, or a UserFunctionError that
    says why not: no dotted path, module not found, the module failing to import, no such
    attribute, or an attribute that is not callable. `what` names the role in the message
    ("reward function", "rollout_func")."""
    module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        raise UserFunctionError(f"{what} {name!r} is not a dotted path module.fn", "not_dotted")
    with _working_directory_on_path() as cwd:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                raise UserFunctionError(f"{what} {name!r}: module {module_name!r} not found "
                                        f"(looked in the working directory {cwd} and the installed packages)",
                                        "module_not_found") from None
            raise UserFunctionError(f"{what} {name!r}: importing module {module_name!r} failed: "
                                    f"it imports {missing!r}, which is not installed", "import_failed") from None
        except Exception as err:  # a syntax error or a raise at import time in the user's module
            raise UserFunctionError(f"{what} {name!r}: importing module {module_name!r} failed: "
                                    f"{type(err).__name__}: {err}", "import_failed") from None
    if not hasattr(module, attr):
        where = getattr(module, "__file__", None) or module_name
        raise UserFunctionError(f"{what} {name!r}: module {module_name!r} ({where}) has no attribute {attr!r}",
                                "no_attribute")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserFunctionError(f"{what} {name!r} is a {type(fn).__name__}, not callable", "not_callable")
    return fn


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
