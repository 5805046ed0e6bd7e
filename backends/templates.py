"""Chat templates given as a key's value: inline Jinja text or the path of a .jinja file."""
from __future__ import annotations

from pathlib import Path


def read_jinja(value: str, key: str) -> str:
    """The template text of `value`: itself when it holds a `{` (Jinja text), else the UTF-8 contents
    of the file it names.

    A value with no `{` that names no file is an error, not a template: a typo like `./chat.jinja`
    must not become a template whose whole text is the path. Raises ValueError naming `key` and the
    path looked at.
    """
    if "{" in value:
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"{key}: {value!r} is neither a Jinja template (it has no '{{') nor a readable "
                         f"file (looked at {path.absolute()}: {err.strerror or type(err).__name__})") from None
