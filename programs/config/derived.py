"""What the rest of the project takes from the config: plain values, not the config object."""
from __future__ import annotations

import dataclasses

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
    """`chat_template_jinja`: a template string or a path to a .jinja file (`backends.templates`)."""
    from backends.templates import read_jinja

    if not value:
        return value
    try:
        return read_jinja(value, "chat_template_jinja")
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
        excess_length_strategy=config.excess_length_strategy,
        min_sample_len=config.min_sample_len,
        seed=config.seed,
    )
    known = {f.name for f in dataclasses.fields(DataSettings)}
    return DataSettings(**{k: v for k, v in kwargs.items() if k in known})


# config key -> the option of `pure.schedules.build_schedule` it sets (None / false: not set)
SCHEDULE_KEYS = {
    "lr_quadratic_warmup": "quadratic_warmup",
    "lr_div_factor": "lr_div_factor",
    "cosine_min_lr_ratio": "min_lr_ratio",
    "cosine_constant_lr_ratio": "constant_lr_ratio",
}


def schedule_settings(config: Config) -> dict:
    """`build_schedule`'s arguments but `total_steps` (known once the data is): the scheduler, the
    peak lr, the warmup, and the options set by the config keys and `lr_scheduler_kwargs`.
    A key the schedule does not take is a ConfigError naming it (checked at validation)."""
    from pure.schedules import schedule_options

    accepted = schedule_options(config.lr_scheduler)
    options = {}
    for key, option in SCHEDULE_KEYS.items():
        value = getattr(config, key)
        if value is None or value is False:
            continue
        if option not in accepted:
            raise ConfigError(f"{key} has no effect with lr_scheduler: {config.lr_scheduler}; "
                              f"it applies to {', '.join(_schedules_taking(option))}")
        options[option] = value
    for option, value in (config.lr_scheduler_kwargs or {}).items():
        if option not in accepted:
            raise ConfigError(f"lr_scheduler_kwargs.{option}: lr_scheduler {config.lr_scheduler} takes "
                              f"{', '.join(accepted) or 'no options'}")
        if option in options:
            raise ConfigError(f"lr_scheduler_kwargs.{option} repeats a config key; set it once")
        options[option] = value
    return dict(name=config.lr_scheduler, learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                warmup_ratio=config.warmup_ratio, **options)


def _schedules_taking(option: str) -> list[str]:
    from pure.schedules import SCHEDULES, schedule_options

    return [name for name in SCHEDULES if option in schedule_options(name)]


def optimizer_options(config: Config) -> dict:
    """`optim_args` as the keyword arguments of the optimizer the config names; an option that
    optimizer does not take is a ConfigError naming it (checked at validation)."""
    from programs import optimizers

    try:
        return optimizers.optimizer_options(config.optimizer, config.optim_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def precision_plan(config: Config, device="cpu"):
    """`backends.precision.resolve_precision` over the config's precision keys, for `device`."""
    from backends.precision import resolve_precision

    return resolve_precision(bf16=config.bf16, fp16=config.fp16, tf32=config.tf32, bfloat16=config.bfloat16,
                             float16=config.float16, float32=config.float32, device=device)
