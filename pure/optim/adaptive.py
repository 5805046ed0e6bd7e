"""More adaptive optimizers the config names: ADOPT, optimi's AdamW (debiased betas) and Muon. Each
emits final updates (lr and decoupled weight decay included)."""

from __future__ import annotations

import math

import torch

from pure.optim.base import (
    GradientTransformation,
    PathFn,
    PyTree,
    _zeros_state,
    as_schedule,
    new_count,
    next_count,
    path_values,
)
from pure.schedules import Schedule
from pure.tree import leaves_with_paths, replace_leaves


def _per_param(grads, params, lr_scales, decay_mask):
    """[(path, g, p, lr scale, decays?)] in the grads' order."""
    if params is None:
        raise ValueError("this optimizer needs params (decoupled weight decay)")
    g_items = leaves_with_paths(grads)
    p_flat = dict(leaves_with_paths(params))
    ref = [(path, p_flat[path]) for path, _ in g_items]
    scales = path_values(lr_scales, ref, 1.0)
    keep = path_values(decay_mask, ref, True)
    return [(path, g, p, float(s), bool(k)) for (path, g), (_, p), s, k in zip(g_items, ref, scales, keep)]


def adopt(
    lr_schedule: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    weight_decay: float | Schedule = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    *,
    lr_scales: PathFn | PyTree | None = None,
) -> GradientTransformation:
    """ADOPT (Taniguchi et al. 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the
    Optimal Rate"), decoupled decay, as axolotl's ``adopt_adamw`` (``ADOPT(decouple=True)``):

    t = 0: v <- g^2, no step.  t >= 1: p <- p - lr wd p;  n = clip(g / max(sqrt(v), eps), t^(1/4));
    m <- lerp(m, n, 1-b1);  p <- p - lr m;  v <- b2 v + (1-b2) g^2.
    """
    lr_fn, wd_fn = as_schedule(lr_schedule), as_schedule(weight_decay)

    def init(params):
        return {"count": new_count(), "mu": _zeros_state(params), "nu": _zeros_state(params)}

    def update(grads, state, params=None, step=0):
        t = int(state["count"])  # updates already made: ADOPT's own step counter
        lr, wd = lr_fn(step), wd_fn(step)
        mu, nu, out = {}, {}, []
        for path, g, p, scale, keep in _per_param(grads, params, lr_scales, decay_mask):
            m, v = state["mu"][path], state["nu"][path]
            if t == 0:
                mu[path], nu[path] = m, torch.addcmul(v, g, g)
                out.append(torch.zeros_like(p))
                continue
            lr_p = lr * scale
            new_p = p - lr_p * wd * p if keep and wd else p
            normed = (g / v.sqrt().clamp(min=eps)).clamp(-t**0.25, t**0.25)
            mu[path] = m.lerp(normed, 1 - b1)
            new_p = new_p - lr_p * mu[path]
            nu[path] = torch.addcmul(v * b2, g, g, value=1 - b2)
            out.append(new_p - p)
        return replace_leaves(grads, out), {"count": state["count"] + 1, "mu": mu, "nu": nu}

    return GradientTransformation(init, update)


def optimi_adamw(
    lr_schedule: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-6,
    weight_decay: float | Schedule = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    *,
    lr_scales: PathFn | PyTree | None = None,
) -> GradientTransformation:
    """AdamW as torch-optimi writes it (``optimi.AdamW``; Warner 2023): the bias correction goes
    into the betas instead of the step,

    b_hat(t) = (b^t - b) / (b^t - 1);  m <- lerp(m, g, 1 - b1_hat);  v <- b2_hat v + (1-b2_hat) g^2;
    p <- p (1 - lr wd) - lr m / (sqrt(v) + eps).
    optimi's Kahan summation (its default for bf16/fp16 params only) is not applied.
    """
    lr_fn, wd_fn = as_schedule(lr_schedule), as_schedule(weight_decay)

    def debiased(beta, t):
        return (beta**t - beta) / (beta**t - 1)

    def init(params):
        return {"count": new_count(), "mu": _zeros_state(params), "nu": _zeros_state(params)}

    def update(grads, state, params=None, step=0):
        count, t = next_count(state["count"])
        b1_hat, b2_hat = debiased(b1, t), debiased(b2, t)
        lr, wd = lr_fn(step), wd_fn(step)
        mu, nu, out = {}, {}, []
        for path, g, p, scale, keep in _per_param(grads, params, lr_scales, decay_mask):
            lr_p = lr * scale
            new_p = p * (1 - lr_p * wd) if keep and wd else p
            mu[path] = state["mu"][path].lerp(g, 1 - b1_hat)
            nu[path] = torch.addcmul(state["nu"][path] * b2_hat, g, g, value=1 - b2_hat)
            new_p = torch.addcdiv(new_p, mu[path], nu[path].sqrt().add(eps), value=-lr_p)
            out.append(new_p - p)
        return replace_leaves(grads, out), {"count": count, "mu": mu, "nu": nu}

    return GradientTransformation(init, update)


MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize_newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                                coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS) -> torch.Tensor:
    """~U V^T of g = U S V^T by ``steps`` quintic Newton-Schulz iterations in bf16 (Jordan 2024;
    ``torch.optim.Muon``): X <- X / ||X||;  X <- a X + (b A + c A^2) X with A = X X^T."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon(
    lr_schedule: float | Schedule,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adjust_lr: str = "match_rms_adamw",
    weight_decay: float | Schedule = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    *,
    lr_scales: PathFn | PyTree | None = None,
) -> GradientTransformation:
    """Muon (Jordan 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") for 2-D matrices,
    step for step ``torch.optim.Muon``:

    B <- lerp(B, g, 1-mu);  U = lerp(g, B, mu) (nesterov) or B;  O = NS(U);
    p <- p (1 - lr wd) - lr' O,  lr' = lr * 0.2 sqrt(max(A, B)) ("match_rms_adamw", Moonlight: lr
    and decay tuned for AdamW carry over) or lr sqrt(max(1, A/B)) ("original").
    Every leaf it is given must be 2-D; ``programs.optimizers`` sends the rest to AdamW.
    """
    if adjust_lr not in ("match_rms_adamw", "original"):
        raise ValueError(f"muon: adjust_lr must be 'match_rms_adamw' or 'original', got {adjust_lr!r}")
    lr_fn, wd_fn = as_schedule(lr_schedule), as_schedule(weight_decay)

    def ratio(shape):
        rows, cols = shape[:2]
        return 0.2 * math.sqrt(max(rows, cols)) if adjust_lr == "match_rms_adamw" else math.sqrt(max(1, rows / cols))

    def init(params):
        for path, p in leaves_with_paths(params):
            if p.ndim != 2:
                raise ValueError(f"muon updates 2-D matrices only; {path} has shape {tuple(p.shape)}")
        return {"momentum": _zeros_state(params)}

    def update(grads, state, params=None, step=0):
        lr, wd = lr_fn(step), wd_fn(step)
        buf, out = {}, []
        for path, g, p, scale, keep in _per_param(grads, params, lr_scales, decay_mask):
            buf[path] = state["momentum"][path].lerp(g, 1 - momentum)
            direction = g.lerp(buf[path], momentum) if nesterov else buf[path]
            ortho = orthogonalize_newton_schulz(direction, ns_steps)
            lr_p = lr * scale
            new_p = p * (1 - lr_p * wd) if keep and wd else p
            new_p = new_p.add(ortho, alpha=-lr_p * ratio(p.shape))
            out.append(new_p - p)
        return replace_leaves(grads, out), {"momentum": buf}

    return GradientTransformation(init, update)
