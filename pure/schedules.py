"""Learning-rate schedules: pure functions ``step -> lr`` (a python float).

``step`` is the 0-based index of the optimizer update about to be applied
(the number of updates already done), which is how Hugging Face schedulers
are read: the first update uses ``lr(0)``.

Every schedule here is ``learning_rate * factor(step)``; the factors are the
``LambdaLR`` lambdas of ``transformers.get_scheduler`` (and of axolotl's
extra schedulers), so values agree with them exactly where they overlap.
``build_schedule`` maps the config keys (``lr_scheduler``, ``warmup_steps`` |
``warmup_ratio``, ``cosine_min_lr_ratio``, ``cosine_constant_lr_ratio``,
``lr_quadratic_warmup``, ``lr_div_factor``, ``lr_scheduler_kwargs``) onto them, and
refuses an option the named schedule does not take. ``reduce_lr_on_plateau`` is not
here: its lr follows eval metrics, not the step.
"""

from __future__ import annotations

import difflib
import math
from typing import Callable

Schedule = Callable[[int], float]

__all__ = [
    "Schedule",
    "SCHEDULES",
    "build_schedule",
    "constant",
    "constant_with_warmup",
    "cosine",
    "cosine_warmup_with_min_lr",
    "cosine_with_restarts",
    "inverse_sqrt",
    "linear",
    "one_cycle",
    "polynomial",
    "rex",
    "schedule_options",
    "warmup_stable_decay",
    "warmup_steps_from_ratio",
]


def _step(step) -> int:
    # a 0-d tensor step (from a TrainState) is accepted as well as an int
    return int(step)


def _warmup_factor(step: int, warmup_steps: int, quadratic: bool = False) -> float:
    factor = float(step) / float(max(1, warmup_steps))
    return factor * factor if quadratic else factor


def warmup_steps_from_ratio(total_steps: int, warmup_ratio: float) -> int:
    """HF ``TrainingArguments.get_warmup_steps``: ``ceil(total_steps * warmup_ratio)``."""
    return math.ceil(total_steps * warmup_ratio)


def constant(learning_rate: float) -> Schedule:
    """lr(t) = M."""

    def schedule(step) -> float:
        return learning_rate * 1.0

    return schedule


def constant_with_warmup(learning_rate: float, warmup_steps: int) -> Schedule:
    """lr(t) = M * min(1, t / W)."""

    def schedule(step) -> float:
        step = _step(step)
        if step < warmup_steps:
            return learning_rate * _warmup_factor(step, warmup_steps)
        return learning_rate * 1.0

    return schedule


def linear(learning_rate: float, total_steps: int, warmup_steps: int = 0) -> Schedule:
    """Warmup t/W, then lr(t) = M * max(0, (T - t) / (T - W))."""

    def schedule(step) -> float:
        step = _step(step)
        if step < warmup_steps:
            return learning_rate * _warmup_factor(step, warmup_steps)
        factor = float(total_steps - step) / float(max(1, total_steps - warmup_steps))
        return learning_rate * max(0.0, factor)

    return schedule


def cosine(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    *,
    min_lr_ratio: float = 0.0,
    constant_lr_ratio: float | None = None,
    num_cycles: float = 0.5,
    quadratic_warmup: bool = False,
) -> Schedule:
    """Warmup t/W (or (t/W)^2), then a half cosine from M down to m = min_lr_ratio * M:

        p = (t - W) / (T' - W),  lr = m + (M - m) * 0.5 * (1 + cos(2 pi c p))   (c = 0.5)

    T' = T, or with ``constant_lr_ratio`` r: T' = int(T * r) and the lr stays at m
    after step T' (axolotl's ``get_cosine_schedule_with_warmup_decay_constant``,
    arXiv:2308.04014). min_lr_ratio = 0 is transformers' ``cosine``; > 0 is
    transformers' ``cosine_with_min_lr`` (``min_lr_rate``) and axolotl's
    ``get_cosine_schedule_with_min_lr``.
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"cosine_min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if constant_lr_ratio is not None and not 0.0 <= constant_lr_ratio <= 1.0:
        raise ValueError(f"cosine_constant_lr_ratio must be in [0, 1], got {constant_lr_ratio}")
    decay_end = total_steps if constant_lr_ratio is None else int(total_steps * constant_lr_ratio)

    def schedule(step) -> float:
        step = _step(step)
        if step < warmup_steps:
            return learning_rate * _warmup_factor(step, warmup_steps, quadratic_warmup)
        if constant_lr_ratio is not None:
            step = min(step, decay_end)
        progress = float(step - warmup_steps) / float(max(1, decay_end - warmup_steps))
        factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
        if constant_lr_ratio is not None:  # axolotl's form: clip the cosine, then add m
            factor = max(0.0, (1.0 - min_lr_ratio) * factor) + min_lr_ratio
        else:  # transformers' form: add m, then clip
            factor = max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
        return learning_rate * factor

    return schedule


def rex(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    *,
    min_lr_ratio: float = 0.0,
    alpha: float = 0.5,
) -> Schedule:
    """REX (arXiv:2107.04197): warmup t/W, then with z = 1 - (t - W)/(T - W),

        lr = m + (M - m) * z / ((1 - alpha) + alpha * z)

    alpha = 0.5 is the paper's and the catalog's m + (M-m)(1-p)/(1-p/2);
    axolotl's ``RexLR`` code uses alpha = 0.9. lr = m from step T on.
    """
    min_lr = learning_rate * min_lr_ratio
    remaining = total_steps - warmup_steps

    def schedule(step) -> float:
        step = _step(step)
        if step < warmup_steps:
            return learning_rate * _warmup_factor(step, warmup_steps)
        after = step - warmup_steps
        if remaining <= 0 or after >= remaining:
            return min_lr
        z = (remaining - after) / remaining
        return min_lr + (learning_rate - min_lr) * (z / ((1.0 - alpha) + alpha * z))

    return schedule


def one_cycle(
    learning_rate: float,
    total_steps: int,
    *,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: str = "cos",
) -> Schedule:
    """``torch.optim.lr_scheduler.OneCycleLR`` (two phases): from M/div_factor up to M
    over the first ``pct_start`` of the steps, then down to M/div_factor/final_div_factor.
    """
    initial_lr = learning_rate / div_factor
    min_lr = initial_lr / final_div_factor
    phases = (
        (float(pct_start * total_steps) - 1.0, initial_lr, learning_rate),
        (float(total_steps - 1), learning_rate, min_lr),
    )
    if anneal_strategy == "cos":

        def anneal(start: float, end: float, pct: float) -> float:
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)
    elif anneal_strategy == "linear":

        def anneal(start: float, end: float, pct: float) -> float:
            return (end - start) * pct + start
    else:
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")

    def schedule(step) -> float:
        step = _step(step)
        start_step = 0.0
        for i, (end_step, start_lr, end_lr) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                pct = (step - start_step) / (end_step - start_step)
                return anneal(start_lr, end_lr, pct)
            start_step = end_step
        raise AssertionError("unreachable")

    return schedule


def cosine_with_restarts(learning_rate: float, total_steps: int, warmup_steps: int = 0, *,
                         num_cycles: float = 1.0) -> Schedule:
    """Warmup t/W, then ``num_cycles`` hard restarts of a half cosine from M to 0:
    p = (t - W) / (T - W),  lr = M * 0.5 * (1 + cos(pi * ((c p) mod 1)))  (0 from p = 1 on)."""

    def schedule(step) -> float:
        step = _step(step)
        if step < warmup_steps:
            return learning_rate * _warmup_factor(step, warmup_steps)
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        if progress >= 1.0:
            return 0.0
        return learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))

    return schedule


def polynomial(learning_rate: float, total_steps: int, warmup_steps: int = 0, *, lr_end: float = 1e-7,
               power: float = 1.0) -> Schedule:
    """Warmup t/W, then lr = (M - e) * (1 - (t - W) / (T - W))^power + e, and e after step T."""
    if not lr_end < learning_rate:
        raise ValueError(f"lr_end ({lr_end}) must be smaller than learning_rate ({learning_rate})")

    def schedule(step) -> float:
        step = _step(step)
        if step < warmup_steps:
            return learning_rate * _warmup_factor(step, warmup_steps)
        if step > total_steps:
            return lr_end
        remaining = 1 - (step - warmup_steps) / (total_steps - warmup_steps)
        return (learning_rate - lr_end) * remaining ** power + lr_end

    return schedule


def inverse_sqrt(learning_rate: float, total_steps: int, warmup_steps: int = 0, *,
                 timescale: int | None = None) -> Schedule:
    """Warmup t/W, then lr = M / sqrt((t + s - W) / s) with timescale s (default W, or 10000)."""
    if timescale is None:
        timescale = warmup_steps or 10_000

    def schedule(step) -> float:
        step = _step(step)
        if step < warmup_steps:
            return learning_rate * _warmup_factor(step, warmup_steps)
        return learning_rate * (1.0 / math.sqrt((step + timescale - warmup_steps) / timescale))

    return schedule


def cosine_warmup_with_min_lr(learning_rate: float, total_steps: int, warmup_steps: int = 0, *,
                              min_lr_ratio: float = 0.0, num_cycles: float = 0.5,
                              warmup_lr_rate: float | None = None) -> Schedule:
    """transformers' ``cosine_warmup_with_min_lr``: warmup (t+1)/W (or from r = warmup_lr_rate:
    r + (1-r) t/(W-1)), then with p = (t - W + 1)/(T - W) the half cosine down to m = min_lr_ratio * M."""

    def schedule(step) -> float:
        step = _step(step)
        if step < warmup_steps:
            if warmup_lr_rate is None:
                return learning_rate * (step + 1.0) / max(1.0, warmup_steps)
            return learning_rate * (warmup_lr_rate + (1.0 - warmup_lr_rate) * step / max(1, warmup_steps - 1))
        progress = float(step - warmup_steps + 1) / float(max(1, total_steps - warmup_steps))
        factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
        return learning_rate * max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)

    return schedule


def _shape(kind: str, progress: float, num_cycles: float, rising: bool) -> float:
    """The warmup (rising) or decay factor of warmup_stable_decay at `progress` in [0, 1]."""
    if kind == "linear":
        return progress if rising else 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress)) if rising else \
            0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    if kind == "1-sqrt":
        return 1.0 - math.sqrt(1.0 - progress) if rising else 1.0 - math.sqrt(progress)
    raise ValueError(f"warmup_type / decay_type must be 'linear', 'cosine' or '1-sqrt', got {kind!r}")


def warmup_stable_decay(learning_rate: float, total_steps: int, warmup_steps: int = 0, *, num_decay_steps: int,
                        num_stable_steps: int | None = None, warmup_type: str = "linear",
                        decay_type: str = "cosine", min_lr_ratio: float = 0.0,
                        num_cycles: float = 0.5) -> Schedule:
    """WSD (arXiv:2404.06395): warmup over W steps, constant M for S steps (default T - W - D), decay
    over D = num_decay_steps to m = min_lr_ratio * M, then m; each ramp m + (M - m) * shape(p)."""
    stable = total_steps - warmup_steps - num_decay_steps if num_stable_steps is None else num_stable_steps
    for kind in (warmup_type, decay_type):
        _shape(kind, 0.0, num_cycles, True)

    def schedule(step) -> float:
        step = _step(step)
        if step < warmup_steps:
            factor = _shape(warmup_type, float(step) / float(max(1, warmup_steps)), num_cycles, True)
        elif step < warmup_steps + stable:
            return learning_rate * 1.0
        elif step < warmup_steps + stable + num_decay_steps:
            progress = float(step - warmup_steps - stable) / float(max(1, num_decay_steps))
            factor = _shape(decay_type, progress, num_cycles, False)
        else:
            return learning_rate * min_lr_ratio
        return learning_rate * max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)

    return schedule


def _with_min_lr(schedule_fn: Callable[..., Schedule], name: str) -> Callable[..., Schedule]:
    """transformers' ``*_with_min_lr`` schedules take their floor as ``min_lr`` (absolute) or
    ``min_lr_rate`` (a ratio); ``cosine_min_lr_ratio`` gives it too. Exactly one may be set."""

    def build(learning_rate, total_steps, warmup_steps=0, *, min_lr_ratio=None, min_lr=None, min_lr_rate=None,
              **options) -> Schedule:
        given = [v for v in (min_lr_ratio, min_lr_rate, None if min_lr is None else min_lr / learning_rate)
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"give the floor of {name} once: min_lr, min_lr_rate or cosine_min_lr_ratio")
        return schedule_fn(learning_rate, total_steps, warmup_steps, min_lr_ratio=given[0] if given else 0.0,
                           **options)

    return build


def _one_cycle(learning_rate, total_steps, warmup_steps=0, *, lr_div_factor=None, div_factor=None,
               pct_start=None, **options) -> Schedule:
    """axolotl's one_cycle: the warmup fraction is the cycle's rising part; ``lr_div_factor`` is
    OneCycleLR's ``div_factor``."""
    if lr_div_factor is not None and div_factor is not None:
        raise ValueError("give one_cycle's div_factor once (lr_div_factor or div_factor)")
    factor = lr_div_factor if lr_div_factor is not None else (div_factor if div_factor is not None else 25.0)
    if pct_start is None:
        pct_start = warmup_steps / total_steps if total_steps else 0.3
    return one_cycle(learning_rate, total_steps, pct_start=pct_start, div_factor=factor, **options)


# name -> factory(learning_rate, total_steps, warmup_steps, **options); the options each takes are
# its keyword-only parameters (`schedule_options`).
_FACTORIES: dict[str, Callable[..., Schedule]] = {
    "constant": lambda learning_rate, total_steps, warmup_steps=0: constant(learning_rate),
    "constant_with_warmup": lambda learning_rate, total_steps, warmup_steps=0:
        constant_with_warmup(learning_rate, warmup_steps),
    "linear": linear,
    "cosine": cosine,
    "cosine_with_min_lr": _with_min_lr(cosine, "cosine_with_min_lr"),
    "cosine_warmup_with_min_lr": _with_min_lr(cosine_warmup_with_min_lr, "cosine_warmup_with_min_lr"),
    "cosine_with_restarts": cosine_with_restarts,
    "polynomial": polynomial,
    "inverse_sqrt": inverse_sqrt,
    "warmup_stable_decay": warmup_stable_decay,
    "rex": rex,
    "one_cycle": _one_cycle,
}
SCHEDULES = tuple(_FACTORIES)

# Options a schedule takes beyond its own keyword parameters, because the factory forwards them.
_FORWARDED = {
    "cosine_with_min_lr": ("constant_lr_ratio", "num_cycles", "quadratic_warmup"),
    "cosine_warmup_with_min_lr": ("num_cycles", "warmup_lr_rate"),
    "one_cycle": ("final_div_factor", "anneal_strategy"),
}


def schedule_options(name: str) -> tuple[str, ...]:
    """The options (``lr_scheduler_kwargs`` and the named keys) the schedule `name` takes."""
    import inspect

    params = inspect.signature(_FACTORIES[name]).parameters.values()
    own = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    return own + _FORWARDED.get(name, ())


def build_schedule(
    name: str,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    cosine_min_lr_ratio: float | None = None,
    cosine_constant_lr_ratio: float | None = None,
    **options,
) -> Schedule:
    """The schedule named by ``lr_scheduler`` (config keys of CATALOG §4).

    ``warmup_steps`` and ``warmup_ratio`` are exclusive; the ratio becomes ``ceil(total_steps *
    ratio)`` steps. ``cosine_min_lr_ratio`` / ``cosine_constant_lr_ratio`` are the options
    ``min_lr_ratio`` / ``constant_lr_ratio``; every other option (``lr_scheduler_kwargs``,
    ``quadratic_warmup`` for ``lr_quadratic_warmup``, ``lr_div_factor``) must be one the schedule
    takes (`schedule_options`), or this raises ValueError naming it.
    """
    if name not in _FACTORIES:
        close = difflib.get_close_matches(str(name), SCHEDULES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown lr_scheduler {name!r}; supported: {', '.join(SCHEDULES)}.{hint}")
    if warmup_steps and warmup_ratio:
        raise ValueError("warmup_steps and warmup_ratio are exclusive; set only one")
    warmup = warmup_steps_from_ratio(total_steps, warmup_ratio) if warmup_ratio else int(warmup_steps or 0)
    if cosine_min_lr_ratio is not None:
        options["min_lr_ratio"] = cosine_min_lr_ratio
    if cosine_constant_lr_ratio is not None:
        options["constant_lr_ratio"] = cosine_constant_lr_ratio
    accepted = schedule_options(name)
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ValueError(f"lr_scheduler {name!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"it takes: {', '.join(accepted) or 'none'}")
    return _FACTORIES[name](learning_rate, total_steps, warmup, **options)
