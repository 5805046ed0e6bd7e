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
    adopt,
    chain,
    clip_by_global_norm,
    default_decay_mask,
    lion,
    multi_transform,
    muon,
    optimi_adamw,
    param_group_decay_mask,
    param_group_lr_scales,
    schedule_free_adamw,
    schedule_free_sgd,
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


def _common(s: Settings) -> dict[str, Any]:
    return dict(weight_decay=s.weight_decay, decay_mask=s.decay_mask, lr_scales=s.lr_scales)


# bitsandbytes (kernels.bnb_optim): HF builds bnb.optim.AdamW / Lion / RMSprop / AdEMAMix with
# optim_bits 8 or 32. "paged_*" is CUDA memory placement only: the same transform (see bnb_optim).
def _bnb_adamw(bits: int) -> Callable[..., GradientTransformation]:
    def build(schedule: float | Schedule, s: Settings) -> GradientTransformation:
        from kernels.bnb_optim import bnb_optimizer

        return bnb_optimizer("adam", schedule, bits=bits, **_common(s),
                             **_given(b1=s.adam_beta1, b2=s.adam_beta2, eps=s.adam_epsilon))
    return build


def _bnb_lion(bits: int) -> Callable[..., GradientTransformation]:
    def build(schedule: float | Schedule, s: Settings) -> GradientTransformation:
        from kernels.bnb_optim import bnb_optimizer

        b1 = 0.9 if s.adam_beta1 is None else s.adam_beta1  # lion_32bit's defaults (0.9, 0.99)
        b2 = 0.99 if s.adam_beta2 is None else s.adam_beta2
        return bnb_optimizer("lion", schedule, bits=bits, b1=b1, b2=b2, **_common(s))
    return build


def _bnb_rmsprop(bits: int) -> Callable[..., GradientTransformation]:
    def build(schedule: float | Schedule, s: Settings, *, alpha: float = 0.99, eps: float = 1e-8
              ) -> GradientTransformation:
        """bnb's RMSprop has no momentum and no centred form (bnb refuses centered; its kernel ignores
        momentum), so optim_args takes alpha and eps only."""
        from kernels.bnb_optim import bnb_optimizer

        return bnb_optimizer("rmsprop", schedule, bits=bits, b1=float(alpha), b2=0.0, eps=float(eps), **_common(s))
    return build


def _bnb_ademamix(bits: int) -> Callable[..., GradientTransformation]:
    def build(schedule: float | Schedule, s: Settings, *, beta1: float | None = None, beta2: float | None = None,
              beta3: float = 0.9999, alpha: float = 5.0, eps: float | None = None, t_alpha: int | None = None,
              t_beta3: int | None = None) -> GradientTransformation:
        """HF's AdEMAMix options (its defaults: beta3 0.9999, alpha 5; beta1, beta2, eps from the config)."""
        from kernels.bnb_optim import bnb_optimizer

        b1 = beta1 if beta1 is not None else (0.9 if s.adam_beta1 is None else s.adam_beta1)
        b2 = beta2 if beta2 is not None else (0.999 if s.adam_beta2 is None else s.adam_beta2)
        e = eps if eps is not None else (1e-8 if s.adam_epsilon is None else s.adam_epsilon)
        return bnb_optimizer("ademamix", schedule, bits=bits, b1=float(b1), b2=float(b2), b3=float(beta3),
                             alpha=float(alpha), eps=float(e), t_alpha=None if t_alpha is None else int(t_alpha),
                             t_beta3=None if t_beta3 is None else int(t_beta3), **_common(s))
    return build


def _torchao_adamw(kind: str) -> Callable[..., GradientTransformation]:
    def build(schedule: float | Schedule, s: Settings, *, block_size: int | None = None) -> GradientTransformation:
        from kernels.ao_optim import torchao_adamw

        return torchao_adamw(kind, schedule, block_size=block_size, **_common(s),
                             **_given(b1=s.adam_beta1, b2=s.adam_beta2, eps=s.adam_epsilon))
    return build


def _optimi_adamw(schedule: float | Schedule, s: Settings) -> GradientTransformation:
    """axolotl's optimi_adamw: optimi.AdamW (its defaults betas (0.9, 0.99), eps 1e-6)."""
    return optimi_adamw(schedule, **_common(s), **_given(b1=s.adam_beta1, b2=s.adam_beta2, eps=s.adam_epsilon))


def _adopt(schedule: float | Schedule, s: Settings) -> GradientTransformation:
    """axolotl's adopt_adamw: ADOPT(decouple=True) (defaults betas (0.9, 0.9999), eps 1e-6)."""
    return adopt(schedule, **_common(s), **_given(b1=s.adam_beta1, b2=s.adam_beta2, eps=s.adam_epsilon))


def muon_label(path: str, p) -> str:
    """axolotl's split: Muon for 2-D matrices other than the embeddings and the LM head, AdamW for
    the rest (1-D norms and biases, embed_tokens, lm_head)."""
    if p.ndim == 2 and "embed_tokens" not in path and "lm_head" not in path:
        return "muon"
    return "adamw"


def _muon(schedule: float | Schedule, s: Settings, *, momentum: float = 0.95, nesterov: bool = True,
          ns_steps: int = 5, adjust_lr: str = "match_rms_adamw") -> GradientTransformation:
    """Muon (torch.optim.Muon's math) on ``muon_label``'s matrices, AdamW on the rest, one lr and
    weight decay for both; ``adjust_lr`` "match_rms_adamw" (Moonlight) keeps AdamW's lr usable."""
    return multi_transform(muon_label, {
        "muon": muon(schedule, float(momentum), bool(nesterov), int(ns_steps), str(adjust_lr), **_common(s)),
        "adamw": _adamw(schedule, s),
    })


def _schedule_free_adamw(schedule: float | Schedule, s: Settings, *, warmup_steps: int = 0, r: float = 0.0,
                         weight_lr_power: float = 2.0) -> GradientTransformation:
    """schedulefree.AdamWScheduleFree. Its own warmup (``warmup_steps``) multiplies the config's
    schedule, which should be ``lr_scheduler: constant`` (with ``warmup_steps`` there if wanted)."""
    return schedule_free_adamw(schedule, **_common(s), warmup_steps=int(warmup_steps), r=float(r),
                               weight_lr_power=float(weight_lr_power),
                               **_given(b1=s.adam_beta1, b2=s.adam_beta2, eps=s.adam_epsilon))


def _schedule_free_sgd(schedule: float | Schedule, s: Settings, *, momentum: float = 0.9, warmup_steps: int = 0,
                       r: float = 0.0, weight_lr_power: float = 2.0) -> GradientTransformation:
    """schedulefree.SGDScheduleFree (HF's schedule_free_sgd)."""
    return schedule_free_sgd(schedule, float(momentum), **_common(s), warmup_steps=int(warmup_steps), r=float(r),
                             weight_lr_power=float(weight_lr_power))


OPTIMIZERS: dict[str, Callable[..., GradientTransformation]] = {
    "adamw_torch": _adamw,
    "adamw_torch_fused": _adamw,  # one implementation: torch's fused kernel computes the same update
    "sgd": _sgd,
    "adafactor": _adafactor,
    "lion_32bit": _lion,
    # bitsandbytes
    "adamw_bnb_8bit": _bnb_adamw(8),
    "adamw_8bit": _bnb_adamw(8),  # HF: an alias of adamw_bnb_8bit
    "paged_adamw_8bit": _bnb_adamw(8),
    "paged_adamw_32bit": _bnb_adamw(32),
    "lion_8bit": _bnb_lion(8),
    "paged_lion_8bit": _bnb_lion(8),
    "paged_lion_32bit": _bnb_lion(32),
    "rmsprop_bnb": _bnb_rmsprop(32),
    "rmsprop_bnb_8bit": _bnb_rmsprop(8),
    "rmsprop_bnb_32bit": _bnb_rmsprop(32),
    "ademamix": _bnb_ademamix(32),
    "ademamix_8bit": _bnb_ademamix(8),
    "paged_ademamix_8bit": _bnb_ademamix(8),
    "paged_ademamix_32bit": _bnb_ademamix(32),
    # torchao
    "adamw_torch_8bit": _torchao_adamw("8bit"),
    "adamw_torch_4bit": _torchao_adamw("4bit"),
    "ao_adamw_8bit": _torchao_adamw("8bit"),  # axolotl: deprecated spelling of adamw_torch_8bit
    "ao_adamw_4bit": _torchao_adamw("4bit"),  # axolotl: deprecated spelling of adamw_torch_4bit
    "ao_adamw_fp8": _torchao_adamw("fp8"),
    # written here from the packages' math
    "optimi_adamw": _optimi_adamw,
    "adopt_adamw": _adopt,
    "muon": _muon,
    "schedule_free_adamw": _schedule_free_adamw,
    "schedule_free_sgd": _schedule_free_sgd,
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
    overrides. ``optim_args`` sets the optimizer's own options, its builder's keyword-only
    arguments (sgd: ``momentum``, ``nesterov``; adafactor: ``beta1``, ``clip_threshold``,
    ``decay_rate``; ademamix*: ``beta1..3``, ``alpha``, ``eps``, ``t_alpha``, ``t_beta3``; muon:
    ``momentum``, ``nesterov``, ``ns_steps``, ``adjust_lr``; ...). Unknown names raise ValueError.
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
