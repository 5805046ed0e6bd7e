"""The optimizers a config names (``optimizer:``, Hugging Face's ``OptimizerNames``), built from
``pure.optim``.

``OPTIMIZERS`` holds exactly the names puretune runs, each mapped to its builder; the config's list
of supported optimizers is ``tuple(OPTIMIZERS)``. A builder takes the schedule, the settings the
config gives every optimizer, and as keyword arguments the optimizer's own options, which the
config sets through ``optim_args`` (``"momentum=0.9,nesterov=True"`` or a dict).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from pure.optim import (
    GradientTransformation,
    ParamGroup,
    adafactor,
    adamw,
    chain,
    clip_by_global_norm,
    default_decay_mask,
    lion,
    param_group_decay_mask,
    param_group_lr_scales,
    sgd,
)
from pure.optim.base import PathFn
from pure.schedules import Schedule


class Settings(NamedTuple):
    """What the config sets for every optimizer; a None beta or epsilon is the optimizer's default."""

    weight_decay: float
    adam_beta1: float | None
    adam_beta2: float | None
    adam_epsilon: float | None
    decay_mask: PathFn
    lr_scales: PathFn | None


def _given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that are set, so a None leaves the builder's own default."""
    return {k: v for k, v in values.items() if v is not None}


def _adamw(schedule: float | Schedule, s: Settings) -> GradientTransformation:
    return adamw(schedule, weight_decay=s.weight_decay, decay_mask=s.decay_mask, lr_scales=s.lr_scales,
                 **_given(b1=s.adam_beta1, b2=s.adam_beta2, eps=s.adam_epsilon))


def _sgd(schedule: float | Schedule, s: Settings, *, momentum: float = 0.0, nesterov: bool = False
         ) -> GradientTransformation:
    return sgd(schedule, momentum, nesterov, weight_decay=s.weight_decay, decay_mask=s.decay_mask,
               lr_scales=s.lr_scales)


def _lion(schedule: float | Schedule, s: Settings) -> GradientTransformation:
    return lion(schedule, weight_decay=s.weight_decay, decay_mask=s.decay_mask, lr_scales=s.lr_scales,
                **_given(b1=s.adam_beta1, b2=s.adam_beta2))


def _adafactor(schedule: float | Schedule, s: Settings, *, beta1: float | None = None, clip_threshold: float = 1.0,
               decay_rate: float = -0.8) -> GradientTransformation:
    return adafactor(schedule, beta1=beta1, clip_threshold=clip_threshold, decay_rate=decay_rate,
                     weight_decay=s.weight_decay, decay_mask=s.decay_mask, lr_scales=s.lr_scales)


OPTIMIZERS: dict[str, Callable[..., GradientTransformation]] = {
    "adamw_torch": _adamw,
    "adamw_torch_fused": _adamw,  # one implementation: torch's fused kernel computes the same update
    "sgd": _sgd,
    "adafactor": _adafactor,
    "lion_32bit": _lion,
}


def optim_args_of(name: str) -> tuple[str, ...]:
    """The options ``optim_args`` may set for the optimizer ``name``: its builder's keyword-only arguments."""
    params = inspect.signature(OPTIMIZERS[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def optimizer_options(name: str, optim_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``optim_args`` as the keyword arguments of optimizer ``name``; an option it does not take
    raises ValueError naming it and the accepted ones."""
    options = parse_optim_args(optim_args)
    accepted = optim_args_of(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"optim_args: optimizer {name} takes no option {', '.join(map(repr, unknown))}; "
                         f"it accepts {', '.join(accepted) if accepted else 'none'}")
    return options


def parse_optim_args(optim_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """HF's ``optim_args`` string (``"a=1,b=true,c=x"``: ints, floats, booleans, else strings) or a
    dict, as keyword arguments."""
    if not optim_args:
        return {}
    if isinstance(optim_args, Mapping):
        return dict(optim_args)
    out: dict[str, Any] = {}
    for item in str(optim_args).replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"optim_args: {item!r} is not name=value (in {optim_args!r})")
        out[key] = _parse_value(value)
    return out


def _parse_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for parse in (int, float):
        try:
            return parse(value)
        except ValueError:
            pass
    return value


def build_optimizer(
    name: str,
    schedule: float | Schedule,
    *,
    weight_decay: float = 0.0,
    adam_beta1: float | None = None,
    adam_beta2: float | None = None,
    adam_epsilon: float | None = None,
    max_grad_norm: float | None = None,
    param_groups: Sequence[ParamGroup] | None = None,
    optim_args: str | Mapping[str, Any] | None = None,
) -> GradientTransformation:
    """The optimizer the config names:

    chain(clip_by_global_norm(max_grad_norm), OPTIMIZERS[name](schedule, settings, **optim_args))

    The clip transform is always there and records ``grad_norm`` (it clips only when
    ``max_grad_norm`` > 0). Betas / epsilon left None take each optimizer's own defaults (Lion:
    0.9, 0.99). Weight decay skips biases, norms and 1-D tensors (``default_decay_mask``);
    ``param_groups`` (from ``make_param_groups``) give per-parameter lr multipliers and decay
    overrides. ``optim_args`` sets the optimizer's own options (sgd: ``momentum``, ``nesterov``;
    adafactor: ``beta1``, ``clip_threshold``, ``decay_rate``). Unknown names raise ValueError.
    """
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(str(name), OPTIMIZERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"optimizer: unknown optimizer {name!r}; puretune runs {', '.join(OPTIMIZERS)}.{hint}")
    options = optimizer_options(name, optim_args)
    groups = list(param_groups or ())
    settings = Settings(
        weight_decay=weight_decay, adam_beta1=adam_beta1, adam_beta2=adam_beta2, adam_epsilon=adam_epsilon,
        decay_mask=param_group_decay_mask(groups, default_decay_mask) if groups else default_decay_mask,
        lr_scales=param_group_lr_scales(groups) if groups else None,
    )
    return chain(clip_by_global_norm(max_grad_norm), OPTIMIZERS[name](schedule, settings, **options))
