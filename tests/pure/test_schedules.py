"""Specification of pure/schedules.py: values equal transformers' / torch's schedulers."""

import math

import pytest
import torch
from transformers import get_scheduler

from pure.schedules import build_schedule, cosine, one_cycle, rex, warmup_steps_from_ratio

LR = 3e-4


def reference_lrs(make_scheduler, steps):
    """The lr each optimizer update uses under a torch scheduler (read before ``scheduler.step()``)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=LR)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
@pytest.mark.parametrize("total,warmup", [(100, 0), (100, 10), (37, 5), (10, 1), (5, 9)])
def test_matches_transformers_get_scheduler_at_every_step(name, total, warmup):
    ref = reference_lrs(lambda o: get_scheduler(name, o, num_warmup_steps=warmup, num_training_steps=total), total + 3)
    ours = build_schedule(name, LR, total, warmup_steps=warmup)
    for step, expected in enumerate(ref):
        assert ours(step) == pytest.approx(expected, rel=1e-12, abs=1e-18), (name, step)


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_cosine_min_lr_ratio_matches_transformers_cosine_with_min_lr(ratio):
    total, warmup = 50, 5
    ref = reference_lrs(
        lambda o: get_scheduler(
            "cosine_with_min_lr", o, num_warmup_steps=warmup, num_training_steps=total,
            scheduler_specific_kwargs={"min_lr_rate": ratio},
        ),
        total + 3,
    )
    ours = build_schedule("cosine", LR, total, warmup_steps=warmup, cosine_min_lr_ratio=ratio)
    for step, expected in enumerate(ref):
        assert ours(step) == pytest.approx(expected, rel=1e-12), step


def test_cosine_min_lr_formula_at_key_steps():
    m = 0.1 * LR
    s = cosine(LR, 110, 10, min_lr_ratio=0.1)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(LR / 2)
    assert s(10) == pytest.approx(LR)
    assert s(60) == pytest.approx(m + (LR - m) * 0.5)
    assert s(110) == pytest.approx(m)


def test_cosine_constant_lr_ratio_holds_min_after_fraction():
    total, warmup = 100, 10
    s = build_schedule("cosine", LR, total, warmup_steps=warmup, cosine_min_lr_ratio=0.2, cosine_constant_lr_ratio=0.8)
    m = 0.2 * LR
    assert s(10) == pytest.approx(LR)
    midpoint = 10 + (80 - 10) / 2
    assert s(int(midpoint)) == pytest.approx(m + (LR - m) * 0.5 * (1 + math.cos(math.pi * (35 / 70))))
    for step in (80, 81, 90, 99, 150):
        assert s(step) == pytest.approx(m)
    assert s(79) > m


def test_warmup_ratio_is_ceil_of_total_steps():
    assert warmup_steps_from_ratio(95, 0.1) == 10
    a = build_schedule("linear", LR, 95, warmup_ratio=0.1)
    b = build_schedule("linear", LR, 95, warmup_steps=10)
    assert [a(t) for t in range(100)] == [b(t) for t in range(100)]
    with pytest.raises(ValueError, match="exclusive"):
        build_schedule("linear", LR, 95, warmup_steps=3, warmup_ratio=0.1)


def test_quadratic_warmup():
    s = build_schedule("cosine", LR, 100, warmup_steps=10, quadratic_warmup=True)
    assert s(5) == pytest.approx(LR * 0.25)
    assert s(10) == pytest.approx(LR)


def test_rex_formula_at_key_steps():
    total, warmup = 110, 10
    s = rex(LR, total, warmup, min_lr_ratio=0.1)
    m = 0.1 * LR
    assert s(5) == pytest.approx(LR / 2)
    assert s(10) == pytest.approx(LR)
    p = 0.5
    assert s(60) == pytest.approx(m + (LR - m) * (1 - p) / (1 - p / 2))
    assert s(110) == pytest.approx(m)
    values = [s(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_rex_alpha_09_matches_axolotl_rexlr_after_warmup():
    total, warmup, min_ratio = 40, 4, 0.1
    s = rex(LR, total, warmup, min_lr_ratio=min_ratio, alpha=0.9)
    m = LR * min_ratio
    for step in range(1, total + 2):
        if step <= warmup:
            expected = LR * step / warmup
        elif step - warmup >= total - warmup:
            expected = m
        else:
            z = (total - step) / (total - warmup)
            expected = LR * (m / LR + (1 - m / LR) * z / (0.1 + 0.9 * z))
        assert s(step) == pytest.approx(expected, rel=1e-12), step


@pytest.mark.parametrize("total,warmup", [(100, 10), (50, 0), (20, 7)])
def test_one_cycle_matches_torch_onecycle(total, warmup):
    ref = reference_lrs(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=LR, total_steps=total, pct_start=warmup / total, anneal_strategy="cos", div_factor=6.0
        ),
        total,
    )
    ours = build_schedule("one_cycle", LR, total, warmup_steps=warmup, lr_div_factor=6.0)
    for step, expected in enumerate(ref):
        assert ours(step) == pytest.approx(expected, rel=1e-10), step


def test_accepts_tensor_steps():
    s = build_schedule("cosine", LR, 100, warmup_steps=10)
    assert s(torch.tensor(50)) == s(50)


def test_unknown_schedule_names_the_closest_match():
    with pytest.raises(ValueError, match="Did you mean 'cosine'"):
        build_schedule("cosin", LR, 10)


def test_one_cycle_function_is_exported():
    assert one_cycle(LR, 10, pct_start=0.3)(0) == pytest.approx(LR / 25)


# transformers' own schedulers with their scheduler_specific_kwargs: each of ours must give the same lr
# at every step (float64 arithmetic on both sides of the same formula: 1e-12).
HF_WITH_KWARGS = [
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("cosine_with_restarts", {}),
    ("polynomial", {"lr_end": 1e-6, "power": 2.0}),
    ("polynomial", {}),
    ("inverse_sqrt", {"timescale": 7}),
    ("inverse_sqrt", {}),
    ("cosine_with_min_lr", {"min_lr": 3e-5}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.2, "num_cycles": 0.25}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr": 1e-5, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", {"num_decay_steps": 12}),
    ("warmup_stable_decay", {"num_decay_steps": 10, "num_stable_steps": 20, "decay_type": "linear",
                             "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 10, "warmup_type": "1-sqrt", "decay_type": "1-sqrt"}),
    ("warmup_stable_decay", {"num_decay_steps": 8, "warmup_type": "cosine", "decay_type": "cosine",
                             "num_cycles": 0.25}),
]


@pytest.mark.parametrize("name, kwargs", HF_WITH_KWARGS, ids=[f"{n}-{sorted(k)}" for n, k in HF_WITH_KWARGS])
@pytest.mark.parametrize("total,warmup", [(60, 0), (60, 6), (37, 5)])
def test_schedules_with_options_match_transformers(name, kwargs, total, warmup):
    ref = reference_lrs(lambda o: get_scheduler(name, o, num_warmup_steps=warmup, num_training_steps=total,
                                                scheduler_specific_kwargs=dict(kwargs)), total + 3)
    ours = build_schedule(name, LR, total, warmup_steps=warmup, **kwargs)
    for step, expected in enumerate(ref):
        assert ours(step) == pytest.approx(expected, rel=1e-12, abs=1e-18), (name, step)


@pytest.mark.parametrize("name, option", [("linear", "num_cycles"), ("cosine", "lr_end"), ("constant", "power"),
                                          ("polynomial", "min_lr_ratio"), ("one_cycle", "quadratic_warmup")])
def test_an_option_the_schedule_does_not_take_is_refused_by_name(name, option):
    with pytest.raises(ValueError, match=f"lr_scheduler '{name}' takes no option '{option}'"):
        build_schedule(name, LR, 100, warmup_steps=10, **{option: 1.0})
