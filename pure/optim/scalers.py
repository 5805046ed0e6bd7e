"""The directions of the adaptive optimizers: Adam, Lion, Adafactor. Each yields an update
that ``scale_by_learning_rate`` (and weight decay) turn into a step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pure.optim.base import GradientTransformation, _unzip, _zeros_state, new_count, next_count
from pure.tree import leaves_with_paths, replace_leaves


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction (Kingma & Ba 2015), in ``torch.optim.AdamW``'s arithmetic:

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
    u = (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps).
    State ``{"count", "mu": {path: m}, "nu": {path: v}}`` (moments in the param dtype).
    """

    def init(params):
        return {"count": new_count(), "mu": _zeros_state(params), "nu": _zeros_state(params)}

    def update(grads, state, params=None, step=0):
        paths, g = _unzip(grads)
        count, t = next_count(state["count"])
        if not g:
            return grads, {"count": count, "mu": {}, "nu": {}}
        mu = torch._foreach_lerp([state["mu"][p] for p in paths], g, 1.0 - b1)
        nu = torch._foreach_mul([state["nu"][p] for p in paths], b2)
        torch._foreach_addcmul_(nu, g, g, value=1.0 - b2)
        bias_correction1 = 1.0 - b1**t
        bias_correction2_sqrt = math.sqrt(1.0 - b2**t)
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(mu, denom)
        torch._foreach_div_(out, bias_correction1)
        return replace_leaves(grads, out), {"count": count, "mu": dict(zip(paths, mu)), "nu": dict(zip(paths, nu))}

    return GradientTransformation(init, update)


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's direction (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):

    u = sign(b1 m + (1-b1) g);  m <- b2 m + (1-b2) g.
    """

    def init(params):
        return {"mu": _zeros_state(params)}

    def update(grads, state, params=None, step=0):
        paths, g = _unzip(grads)
        mu = [state["mu"][p] for p in paths]
        direction = torch._foreach_sign(torch._foreach_lerp(mu, g, 1.0 - b1)) if g else []
        new_mu = torch._foreach_lerp(mu, g, 1.0 - b2) if g else []
        return replace_leaves(grads, direction), {"mu": dict(zip(paths, new_mu))}

    return GradientTransformation(init, update)


def _adafactor_compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _rms(t: Tensor) -> Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


def scale_by_adafactor(
    decay_rate: float = -0.8,
    eps: float = 1e-30,
    clip_threshold: float = 1.0,
    factored: bool = True,
) -> GradientTransformation:
    """Adafactor's direction (Shazeer & Stern 2018), as HF ``transformers.Adafactor``:

    b2_t = 1 - t^decay_rate;  G = g^2 + eps.
    ndim >= 2 (factored): R <- b2_t R + (1-b2_t) mean_cols(G), C <- b2_t C + (1-b2_t) mean_rows(G),
        u = g / sqrt(R C / mean(R));  otherwise V <- b2_t V + (1-b2_t) G, u = g / sqrt(V).
    u <- u / max(1, RMS(u) / clip_threshold).
    State ``{"count", "row", "col", "v"}`` (factored params in row/col, others in v),
    float32 for half-precision params.
    """

    def is_factored(t: Tensor) -> bool:
        return factored and t.ndim >= 2

    def init(params):
        row, col, v = {}, {}, {}
        for path, p in leaves_with_paths(params):
            dtype = _adafactor_compute_dtype(p)
            if is_factored(p):
                row[path] = torch.zeros(p.shape[:-1], dtype=dtype, device=p.device)
                col[path] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=dtype, device=p.device)
            else:
                v[path] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        return {"count": new_count(), "row": row, "col": col, "v": v}

    def update(grads, state, params=None, step=0):
        count, t = next_count(state["count"])
        beta2t = 1.0 - math.pow(t, decay_rate)
        row, col, v, out = {}, {}, {}, []
        for path, g in leaves_with_paths(grads):
            g = g.to(_adafactor_compute_dtype(g))
            sq = g * g + eps
            if path in state["row"]:
                r = state["row"][path] * beta2t + sq.mean(dim=-1) * (1.0 - beta2t)
                c = state["col"][path] * beta2t + sq.mean(dim=-2) * (1.0 - beta2t)
                row[path], col[path] = r, c
                r_factor = (r / r.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                c_factor = c.unsqueeze(-2).rsqrt()
                u = r_factor * c_factor * g
            else:
                vv = state["v"][path] * beta2t + sq * (1.0 - beta2t)
                v[path] = vv
                u = vv.rsqrt() * g
            u = u / (_rms(u) / clip_threshold).clamp(min=1.0)
            out.append(u)
        return replace_leaves(grads, out), {"count": count, "row": row, "col": col, "v": v}

    return GradientTransformation(init, update)
