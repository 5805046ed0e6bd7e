"""Tokenizer set-up from the config's token keys, before any data is prepared or the model is sized.

    added = prepare_tokenizer(tokenizer, **tokenizer_edits(config))   # programs.data.tokenizer_edits
"""
from __future__ import annotations

import json
from typing import Mapping, Sequence

from backends.templates import read_jinja
from pure.data.registry import accepts_keyword
from pure.data.settings import DataError
from pure.data.templates import resolve_chat_template

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def prepare_tokenizer(tokenizer, *, chat_template: str | None = None, chat_template_jinja: str | None = None,
                      special_tokens: Mapping[str, object] | None = None, tokens: Sequence[str] | None = None,
                      added_tokens_overrides: Mapping[int, str] | None = None) -> int:
    """Apply `special_tokens`, `tokens` and `added_tokens_overrides`; make sure a pad token exists;
    write the global `chat_template` / `chat_template_jinja` into `tokenizer.chat_template`.

    Each argument is the config key of the same name (`special_tokens` as a plain dict). Returns how
    many tokens were added to the vocabulary (the model side resizes its embeddings when this is > 0).
    A missing pad token becomes the EOS token, which adds nothing. The template goes into the
    tokenizer so that everything downstream (inference, the exported tokenizer's
    `chat_template.jinja`) formats chats exactly as training did; as in axolotl, a dataset's own
    `chat_template` still wins for that dataset's rows.
    """
    before = len(tokenizer)
    apply_chat_template_choice(tokenizer, chat_template, chat_template_jinja)
    if added_tokens_overrides:
        _override_added_tokens(tokenizer, {int(k): str(v) for k, v in dict(added_tokens_overrides).items()})
    if special_tokens is not None:
        special = dict(special_tokens)
        updates = {k: special[k] for k in SPECIAL_TOKEN_KEYS if special.get(k) and getattr(tokenizer, k, None) != special[k]}
        if updates:
            tokenizer.add_special_tokens(updates)
        extra = [t for t in special.get("additional_special_tokens") or [] if t not in tokenizer.get_vocab()]
        if extra:
            keep_old = ("replace_extra_special_tokens" if accepts_keyword(tokenizer.add_special_tokens, "replace_extra_special_tokens")
                        else "replace_additional_special_tokens")  # transformers 5 / 4 spelling
            tokenizer.add_special_tokens({"additional_special_tokens": extra}, **{keep_old: False})
    if tokens:
        vocab = tokenizer.get_vocab()
        new = [t for t in tokens if t not in vocab]
        if new:
            tokenizer.add_tokens(new)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token; set special_tokens.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return len(tokenizer) - before


def apply_chat_template_choice(tokenizer, name: str | None, jinja: str | None) -> str | None:
    """Set `tokenizer.chat_template` from the global `chat_template` name (+ `chat_template_jinja`, a
    template string or a .jinja file path).

    Nothing changes when neither is set; `tokenizer_default` keeps the tokenizer's own template (and
    fails when it has none). Returns the template now in the tokenizer, or None when untouched.
    """
    if not name and not jinja:
        return None
    try:
        jinja = read_jinja(jinja, "chat_template_jinja") if jinja else None
    except ValueError as err:
        raise DataError(str(err)) from None
    template = resolve_chat_template(name, tokenizer, jinja)
    tokenizer.chat_template = template
    return template


def _override_added_tokens(tokenizer, overrides: dict[int, str]) -> None:
    """Rename reserved added tokens in place (`added_tokens_overrides: {id: new_text}`)."""
    from tokenizers import Tokenizer

    added = getattr(tokenizer, "added_tokens_decoder", {})
    for token_id in overrides:
        if token_id not in added:
            raise DataError(f"added_tokens_overrides: token id {token_id} is not an added token of this "
                            f"tokenizer (added ids: {sorted(added)[:10]}...)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError("added_tokens_overrides needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    old_names = {}
    for token in spec.get("added_tokens", []):
        if token["id"] in overrides:
            old_names[token["content"]] = overrides[token["id"]]
            token["content"] = overrides[token["id"]]
    vocab = spec.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        for old, new in old_names.items():
            if old in vocab:
                vocab[new] = vocab.pop(old)
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    for attr in SPECIAL_TOKEN_KEYS:
        value = getattr(tokenizer, attr, None)
        if value in old_names:
            setattr(tokenizer, attr, old_names[value])
