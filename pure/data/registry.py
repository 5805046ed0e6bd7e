"""From a dataset entry's `type:` to the prompt strategy (a `RowFn`) that turns its rows into examples.

    row_fn = resolve_strategy("sft", {"path": "data.jsonl", "type": "alpaca"}, tokenizer, settings)
    examples = row_fn(row, index)

Dispatch:
- `transform=` given -> a user dataset transform, as axolotl calls them for GRPO/EBFT:
  `fn(cfg, dataset_idx=i) -> (map_fn(row, tokenizer=None) -> dict, {"remove_columns": [...] | "__all__"})`.
  `backends.user_code.entry_strategy` imports it (the `module.fn` a `type:` names that no builder
  knows) and passes the callable; nothing here imports user code;
- SFT `type: chat_template` -> `pure.data.chat_template`;
- SFT alpaca family, user-defined mappings, completion, input_output, stepwise_supervised, and
  pre-tokenised rows (`type:` empty) -> `pure.data.instruct`;
- preference kinds (dpo, ipo, kto, orpo, simpo, rm) and prm (`stepwise_supervised`) ->
  `pure.data.preference`.

The builder modules are imported lazily so a missing one only matters to the datasets that need it.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from pure.data.settings import DataError, DataSettings, Example, RowFn

SFT = "sft"
PREFERENCE_KINDS = ("dpo", "ipo", "kto", "orpo", "simpo", "rm")
ONLINE_KINDS = ("grpo", "gdpo", "ebft")  # rows stay prompts; the trainer generates
KINDS = (SFT, *PREFERENCE_KINDS, "prm", *ONLINE_KINDS)


class DictDefault(dict):
    """A dict whose missing keys read as None, by item or attribute (axolotl's `cfg` for transforms)."""

    def __getitem__(self, key):
        return self.get(key)

    def __getattr__(self, key):
        try:
            return self.get(key)
        except KeyError:  # pragma: no cover
            raise AttributeError(key) from None


def _to_dict_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return DictDefault({k: _to_dict_default(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_to_dict_default(v) for v in value]
    return value


def resolve_strategy(
    kind: str,
    ds_cfg: Mapping[str, Any],
    tokenizer,
    settings: DataSettings,
    *,
    config: Mapping[str, Any] | None = None,
    dataset_index: int = 0,
    transform: Callable | None = None,
) -> RowFn:
    """The `RowFn` for one dataset entry.

    kind: "sft", a preference kind ("dpo", "ipo", "kto", "orpo", "simpo", "rm"), "prm", or an
      online kind ("grpo", "gdpo", "ebft") whose rows are prompts for generation.
    ds_cfg: the dataset entry as the user wrote it (`type` plus its options).
    config: the whole config as a plain dict, handed to user transforms as `cfg` (defaults to the
      settings plus this one entry); dataset_index: the entry's position, passed as `dataset_idx`.
    transform: the user dataset transform the entry's `type:` names, already imported; None for the
      built-in strategies.
    """
    if kind not in KINDS:
        raise DataError(f"unknown training kind {kind!r}; expected one of {', '.join(KINDS)}")
    ds_cfg = dict(ds_cfg or {})
    if transform is None:
        return _builtin(kind, ds_cfg.get("type"), ds_cfg, tokenizer, settings)
    cfg = _to_dict_default(config if config is not None else _default_cfg(ds_cfg, settings))
    return _wrap_transform(transform, kind, ds_cfg, tokenizer, settings, cfg, dataset_index)


def _builtin(kind: str, type_spec: Any, ds_cfg: dict, tokenizer, settings: DataSettings) -> RowFn:
    if kind in ONLINE_KINDS:
        if type_spec in (None, ""):
            return _passthrough
        raise DataError(
            f"dataset {ds_cfg.get('path')!r}: rl: {kind} datasets need `type:` to be a transform "
            f"`module.fn` importable from the working directory, got {type_spec!r}"
        )
    if kind == SFT and type_spec == "chat_template":
        from pure.data.chat_template import build_chat_template_strategy

        return build_chat_template_strategy(ds_cfg, tokenizer, settings)
    if kind == SFT:
        from pure.data.instruct import build_instruct_strategy

        return build_instruct_strategy(type_spec, ds_cfg, tokenizer, settings)
    from pure.data.preference import build_preference_strategy

    return build_preference_strategy(kind, type_spec, ds_cfg, tokenizer, settings)


def _passthrough(row: dict, index: int) -> list[Example]:
    return [dict(row)]


def _default_cfg(ds_cfg: dict, settings: DataSettings) -> dict:
    from dataclasses import asdict

    return {**asdict(settings), "datasets": [ds_cfg]}


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether `fn` can be called with the keyword argument `name` (named, or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _wrap_transform(transform: Callable, kind: str, ds_cfg: dict, tokenizer, settings: DataSettings,
                    cfg: Mapping, dataset_index: int) -> RowFn:
    """A user transform as a RowFn: the mapped row plus the columns it does not remove."""
    name = ds_cfg.get("type")
    result = transform(cfg, dataset_idx=dataset_index) if accepts_keyword(transform, "dataset_idx") else transform(cfg)
    if isinstance(result, tuple):
        map_fn, map_kwargs = result[0], (result[1] if len(result) > 1 else {}) or {}
    else:
        map_fn, map_kwargs = result, {}
    if not callable(map_fn):
        raise DataError(f"dataset transform {name!r} returned {type(map_fn).__name__}, expected a function")
    remove = map_kwargs.get("remove_columns") or []
    pass_tokenizer = accepts_keyword(map_fn, "tokenizer")

    def transformed(row: dict, index: int) -> dict:
        try:
            out = map_fn(dict(row), tokenizer=tokenizer) if pass_tokenizer else map_fn(dict(row))
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"dataset {ds_cfg.get('path')!r} row {index}: transform {name!r} failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        if not isinstance(out, Mapping):
            raise DataError(f"dataset {ds_cfg.get('path')!r} row {index}: transform {name!r} returned "
                            f"{type(out).__name__}, expected a dict")
        kept = {} if remove == "__all__" else {k: v for k, v in row.items() if k not in set(remove)}
        kept.update(out)
        return kept

    downstream: RowFn | None = None
    if kind in PREFERENCE_KINDS:
        # the transform yields prompt/chosen/rejected (or completion/label) text: tokenise it the
        # way axolotl does for already-formatted rows
        try:
            from pure.data.preference import build_preference_strategy

            downstream = build_preference_strategy(kind, "passthrough", ds_cfg, tokenizer, settings)
        except (ImportError, DataError):
            downstream = None

    def row_fn(row: dict, index: int) -> list[Example]:
        mapped = transformed(row, index)
        return downstream(mapped, index) if downstream is not None else [mapped]

    return row_fn
