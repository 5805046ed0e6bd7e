"""What the rest of the project takes from the config: plain values, not the config object."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from programs.config.schema import Config, ConfigError
from pure.data.settings import DataSettings


def training_kind(config: Config) -> str:
    """"sft", an `rl:` value, "rm" (reward_model) or "prm" (process_reward_model)."""
    if config.reward_model:
        return "rm"
    if config.process_reward_model:
        return "prm"
    return config.rl or "sft"


def _read_jinja(value: str | None) -> str | None:
    """`chat_template_jinja` is a template string or a path to a .jinja file."""
    if not value:
        return value
    if "{" not in value and len(value) < 4096:
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise ConfigError(f"chat_template_jinja: {value!r} is neither a Jinja template nor an existing file")
    return value


def data_settings(config: Config) -> DataSettings:
    """The global settings prompt strategies and the length policy need."""
    kwargs = dict(
        sequence_len=config.sequence_len,
        train_on_inputs=bool(config.train_on_inputs),
        chat_template=config.chat_template,
        chat_template_jinja=_read_jinja(config.chat_template_jinja),
        chat_template_kwargs=dict(config.chat_template_kwargs or {}),
        default_system_message=config.default_system_message,
        eot_tokens=tuple(config.eot_tokens) if config.eot_tokens is not None else None,
        max_prompt_len=config.max_prompt_len,
        excess_length_strategy=config.excess_length_strategy or "drop",
        min_sample_len=config.min_sample_len if config.min_sample_len is not None else 2,
        seed=config.seed if config.seed is not None else 42,
    )
    known = {f.name for f in dataclasses.fields(DataSettings)}
    return DataSettings(**{k: v for k, v in kwargs.items() if k in known})
