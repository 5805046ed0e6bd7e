"""Learning-rate schedules: pure functions ``step -> lr`` (a python float).

``step`` is the 0-based index of the optimizer update about to be applied
(the number of updates already done), which is how Hugging Face schedulers
are read: the first update uses ``lr(0)``.

Every schedule here is ``learning_rate * factor(step)``; the factors are the
``LambdaLR`` lambdas of ``transformers.get_scheduler`` (and of axolotl's
extra schedulers), so values agree with them exactly where they overlap.
``build_schedule`` maps the config keys (``lr_scheduler``, ``warmup_steps`` |
``warmup_ratio``, ``cosine_min_lr_ratio``, ``cosine_constant_lr_ratio``,
``lr_quadratic_warmup``, ``lr_div_factor``) onto them.
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
    "linear",
    "one_cycle",
    "rex",
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


SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr", "rex", "one_cycle")


def build_schedule(
    name: str,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    cosine_min_lr_ratio: float | None = None,
    cosine_constant_lr_ratio: float | None = None,
    **kwargs,
) -> Schedule:
    """The schedule named by ``lr_scheduler`` (config keys of CATALOG §4).

    ``warmup_steps`` and ``warmup_ratio`` are exclusive; the ratio becomes
    ``ceil(total_steps * ratio)`` steps. Extra ``kwargs``: ``quadratic_warmup``
    (``lr_quadratic_warmup``, cosine), ``num_cycles`` (cosine), ``min_lr_rate``
    (cosine_with_min_lr), ``alpha`` (rex), ``lr_div_factor`` / ``div_factor``,
    ``final_div_factor``, ``pct_start``, ``anneal_strategy`` (one_cycle).
    """
    if warmup_steps and warmup_ratio:
        raise ValueError("warmup_steps and warmup_ratio are exclusive; set only one")
    if warmup_ratio:
        warmup = warmup_steps_from_ratio(total_steps, warmup_ratio)
    else:
        warmup = int(warmup_steps or 0)
    min_ratio = cosine_min_lr_ratio if cosine_min_lr_ratio is not None else 0.0

    if name == "constant":
        return constant(learning_rate)
    if name == "constant_with_warmup":
        return constant_with_warmup(learning_rate, warmup)
    if name == "linear":
        return linear(learning_rate, total_steps, warmup)
    if name in ("cosine", "cosine_with_min_lr"):
        if name == "cosine_with_min_lr" and "min_lr_rate" in kwargs:
            min_ratio = kwargs["min_lr_rate"]
        return cosine(
            learning_rate,
            total_steps,
            warmup,
            min_lr_ratio=min_ratio,
            constant_lr_ratio=cosine_constant_lr_ratio,
            num_cycles=kwargs.get("num_cycles", 0.5),
            quadratic_warmup=bool(kwargs.get("quadratic_warmup", False)),
        )
    if name == "rex":
        return rex(learning_rate, total_steps, warmup, min_lr_ratio=min_ratio, alpha=kwargs.get("alpha", 0.5))
    if name == "one_cycle":
        return one_cycle(
            learning_rate,
            total_steps,
            pct_start=kwargs.get("pct_start", warmup / total_steps if total_steps else 0.3),
            div_factor=kwargs.get("lr_div_factor", kwargs.get("div_factor", 25.0)),
            final_div_factor=kwargs.get("final_div_factor", 1e4),
            anneal_strategy=kwargs.get("anneal_strategy", "cos"),
        )
    close = difflib.get_close_matches(str(name), SCHEDULES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown lr_scheduler {name!r}; supported: {', '.join(SCHEDULES)}.{hint}")
