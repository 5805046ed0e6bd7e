"""Schedule-free AdamW and SGD (Defazio et al. 2024, "The Road Less Scheduled"), the math of the
``schedulefree`` package's ``AdamWScheduleFree`` / ``SGDScheduleFree``.

Schedule-free keeps three sequences: z (the SGD/Adam iterate), x (the running average of z, the
weights to evaluate and export) and y = lerp(z, x, beta), where gradients are taken. As in the
package's training mode, the trainable params ARE y; the state keeps z, and x is recovered as

    x = lerp(y, z, 1 - 1/beta)

by ``schedule_free_eval_params(params, opt_state)`` (the identity for any other optimizer).
``programs.loop`` evaluates and exports those x weights; checkpoints hold y and z, so a resume
continues exactly.
"""

from __future__ import annotations

import torch

from pure.optim.base import GradientTransformation, PathFn, PyTree, as_schedule, path_values
from pure.schedules import Schedule
from pure.tree import leaves_with_paths, replace_leaves

STATE_KEY = "schedule_free"


def _schedule_free(
    lr_schedule: float | Schedule,
    beta: float,
    direction,
    weight_decay: float | Schedule,
    decay_mask: PathFn | PyTree | None,
    lr_scales: PathFn | PyTree | None,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
    second_moment: bool,
) -> GradientTransformation:
    lr_fn, wd_fn = as_schedule(lr_schedule), as_schedule(weight_decay)

    def init(params):
        items = leaves_with_paths(params)
        state = {
            "k": torch.zeros((), dtype=torch.int64),
            # Python floats in the package: kept as float64 so they round-trip exactly
            "lr_max": torch.tensor(-1.0, dtype=torch.float64),
            "weight_sum": torch.tensor(0.0, dtype=torch.float64),
            "x_weight": torch.tensor(1.0 - 1.0 / beta, dtype=torch.float64),
            "z": {path: p.detach().clone() for path, p in items},
        }
        if second_moment:
            state["exp_avg_sq"] = {path: torch.zeros_like(p) for path, p in items}
        return {STATE_KEY: state}

    def update(grads, state, params=None, step=0):
        if params is None:
            raise ValueError("schedule-free optimizers need params")
        s = state[STATE_KEY]
        k = int(s["k"])
        lr = lr_fn(step) * ((k + 1) / warmup_steps if k < warmup_steps else 1.0)
        lr_max = max(lr, float(s["lr_max"]))
        weight = ((k + 1) ** r) * (lr_max**weight_lr_power)
        weight_sum = float(s["weight_sum"]) + weight
        ckp1 = weight / weight_sum if weight_sum else 0.0
        wd = wd_fn(step)
        g_items = leaves_with_paths(grads)
        p_flat = dict(leaves_with_paths(params))
        ref = [(path, p_flat[path]) for path, _ in g_items]
        scales = path_values(lr_scales, ref, 1.0)
        keep = path_values(decay_mask, ref, True)
        new = {"k": s["k"] + 1, "lr_max": torch.tensor(lr_max, dtype=torch.float64),
               "weight_sum": torch.tensor(weight_sum, dtype=torch.float64), "x_weight": s["x_weight"], "z": {}}
        if second_moment:
            new["exp_avg_sq"] = {}
        out = []
        for (path, g), (_, y), scale, decays in zip(g_items, ref, scales, keep):
            d, extra = direction(path, g, s, k)
            if second_moment:
                new["exp_avg_sq"][path] = extra
            if decays and wd:
                d = d.add(y, alpha=wd)
            lr_p = lr * float(scale)
            new_y = y.lerp(s["z"][path], ckp1).add(d, alpha=lr_p * (beta * (1 - ckp1) - 1))
            new["z"][path] = s["z"][path].sub(d, alpha=lr_p)
            out.append(new_y - y)
        return replace_leaves(grads, out), {STATE_KEY: new}

    return GradientTransformation(init, update)


def schedule_free_adamw(
    lr_schedule: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | Schedule = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    *,
    lr_scales: PathFn | PyTree | None = None,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """``schedulefree.AdamWScheduleFree``, with lr(step) in place of the package's constant lr:

    lr_t = lr(step) * min(1, (k+1)/warmup);  c = w_k / sum_i w_i,  w_k = (k+1)^r lr_max^power;
    v <- b2 v + (1-b2) g^2;  d = g / (sqrt(v / (1-b2^(k+1))) + eps) + wd y;
    y <- lerp(y, z, c) + lr_t (b1 (1-c) - 1) d;  z <- z - lr_t d.
    """

    def direction(path, g, s, k):
        v = torch.addcmul(s["exp_avg_sq"][path] * b2, g, g, value=1 - b2)
        return g / v.div(1 - b2 ** (k + 1)).sqrt().add(eps), v

    return _schedule_free(lr_schedule, b1, direction, weight_decay, decay_mask, lr_scales, warmup_steps, r,
                          weight_lr_power, second_moment=True)


def schedule_free_sgd(
    lr_schedule: float | Schedule,
    momentum: float = 0.9,
    weight_decay: float | Schedule = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    *,
    lr_scales: PathFn | PyTree | None = None,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """``schedulefree.SGDScheduleFree``: as ``schedule_free_adamw`` with d = g + wd y and beta = momentum."""
    if not 0 < momentum < 1:
        raise ValueError(f"schedule_free_sgd: momentum must be in (0, 1), got {momentum}")
    return _schedule_free(lr_schedule, momentum, lambda path, g, s, k: (g, None), weight_decay, decay_mask,
                          lr_scales, warmup_steps, r, weight_lr_power, second_moment=False)


def _find_state(tree):
    if isinstance(tree, dict):
        if STATE_KEY in tree:
            return tree[STATE_KEY]
        for value in tree.values():
            found = _find_state(value)
            if found is not None:
                return found
    return None


def schedule_free_eval_params(params: PyTree, opt_state: PyTree) -> PyTree:
    """The weights to evaluate and export: x = lerp(y, z, 1 - 1/beta) when ``opt_state`` is a
    schedule-free optimizer's (``params`` are y), else ``params`` unchanged."""
    s = _find_state(opt_state)
    if s is None:
        return params
    weight = float(s["x_weight"])
    items = leaves_with_paths(params)
    return replace_leaves(params, [y.lerp(s["z"][path], weight) if path in s["z"] else y for path, y in items])
