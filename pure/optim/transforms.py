"""Small gradient transformations that optimizers are chained from: clipping, weight decay,
learning-rate scaling, momentum."""

from __future__ import annotations

import torch
from torch import Tensor

from pure.optim.base import (
    GradientTransformation,
    PathFn,
    PyTree,
    _unzip,
    _zeros_state,
    as_schedule,
    device_of,
    path_values,
)
from pure.schedules import Schedule
from pure.tree import global_norm, leaves_with_paths, replace_leaves, tree_leaves


def clip_by_global_norm(max_norm: float | None) -> GradientTransformation:
    """g <- g * min(1, max_norm / (||g|| + 1e-6))  (``clip_grad_norm_``'s formula).

    State ``{"grad_norm": ||g||}`` holds the norm *before* clipping, for the
    ``train/grad_norm`` metric. ``max_norm`` None or <= 0 only records it.
    """

    def init(params):
        return {"grad_norm": torch.zeros((), dtype=torch.float32, device=device_of(params))}

    def update(grads, state, params=None, step=0):
        leaves = tree_leaves(grads)
        norm = global_norm(grads)
        if max_norm is None or max_norm <= 0 or not leaves:
            return grads, {"grad_norm": norm}
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        clipped = [g * coef.to(dtype=g.dtype) for g in leaves]
        return replace_leaves(grads, clipped), {"grad_norm": norm}

    return GradientTransformation(init, update)


def grad_norm_from_state(state: PyTree) -> Tensor | None:
    """The pre-clip global gradient norm recorded by ``clip_by_global_norm`` (for ``train/grad_norm``)."""
    for path, leaf in leaves_with_paths(state):
        if path == "grad_norm" or path.endswith(".grad_norm"):
            return leaf
    return None


def add_decayed_weights(
    weight_decay: float | Schedule,
    mask: PathFn | PyTree | None = None,
    *,
    learning_rate: float | Schedule | None = None,
    lr_scales: PathFn | PyTree | None = None,
) -> GradientTransformation:
    """u <- u + wd * p for parameters where ``mask`` is true (all when None).

    Placed before ``scale_by_learning_rate`` this is AdamW's decoupled decay
    (the lr then multiplies it: p <- p - lr * (u + wd * p)). If
    ``learning_rate`` is given the term is instead already scaled and
    sign-flipped, u <- u - lr(step) * scale(path) * wd * p, for chains where
    the decay must come after the lr (Adafactor with momentum).
    ``mask`` is a callable ``(path, param) -> bool`` or a tree of bools.
    """
    wd_schedule = as_schedule(weight_decay)
    lr_schedule = None if learning_rate is None else as_schedule(learning_rate)

    def update(grads, state, params=None, step=0):
        wd = wd_schedule(step)
        if wd == 0:
            return grads, state
        if params is None:
            raise ValueError("add_decayed_weights needs params")
        paths, u_leaves = _unzip(grads)
        p_flat = dict(leaves_with_paths(params))
        p_items = [(path, p_flat[path]) for path in paths]
        keep = path_values(mask, p_items, True)
        coefs = [wd] * len(p_items)
        if lr_schedule is not None:
            lr = lr_schedule(step)
            scales = path_values(lr_scales, p_items, 1.0)
            coefs = [-lr * s * wd for s in scales]
        new = list(u_leaves)
        idx = [i for i, k in enumerate(keep) if k]
        if idx:
            decayed = torch._foreach_add(
                [u_leaves[i] for i in idx],
                torch._foreach_mul([p_items[i][1] for i in idx], [coefs[i] for i in idx]),
            )
            for i, d in zip(idx, decayed):
                new[i] = d
        return replace_leaves(grads, new), state

    return GradientTransformation(lambda params: {}, update)


def scale_by_learning_rate(
    learning_rate: float | Schedule,
    *,
    lr_scales: PathFn | PyTree | None = None,
    flip_sign: bool = True,
) -> GradientTransformation:
    """u <- -lr(step) * scale(path) * u.

    ``lr_scales`` gives per-parameter multipliers (param groups, LoRA+,
    ``lr_groups``, ``embedding_lr``): a callable ``(path, param) -> float``
    (see ``param_group_lr_scales``) or a tree of floats; default 1.
    """
    schedule = as_schedule(learning_rate)

    def update(grads, state, params=None, step=0):
        lr = schedule(step) * (-1.0 if flip_sign else 1.0)
        paths, leaves = _unzip(grads)
        if not leaves:
            return grads, state
        if lr_scales is None:
            new = torch._foreach_mul(leaves, lr)
        else:
            p_flat = dict(leaves_with_paths(params)) if params is not None else {}
            ref = [(path, p_flat.get(path, g)) for path, g in zip(paths, leaves)]
            scales = path_values(lr_scales, ref, 1.0)
            new = torch._foreach_mul(leaves, [lr * float(s) for s in scales])
        return replace_leaves(grads, new), state

    return GradientTransformation(lambda params: {}, update)


def trace(momentum: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum as in ``torch.optim.SGD`` (dampening 0):

    b <- mu * b + g;  u = g + mu * b (nesterov) or b.
    """

    def init(params):
        return {"momentum": _zeros_state(params)}

    def update(grads, state, params=None, step=0):
        paths, g = _unzip(grads)
        new_buf = torch._foreach_mul([state["momentum"][p] for p in paths], momentum)
        torch._foreach_add_(new_buf, g)
        out = torch._foreach_add(g, new_buf, alpha=momentum) if nesterov else new_buf
        return replace_leaves(grads, out), {"momentum": dict(zip(paths, new_buf))}

    return GradientTransformation(init, update)


def ema(decay: float) -> GradientTransformation:
    """m <- decay * m + (1 - decay) * u; u = m (no bias correction, as Adafactor's beta1)."""

    def init(params):
        return {"ema": _zeros_state(params)}

    def update(grads, state, params=None, step=0):
        paths, g = _unzip(grads)
        m = torch._foreach_mul([state["ema"][p] for p in paths], decay)
        torch._foreach_add_(m, g, alpha=1.0 - decay)
        return replace_leaves(grads, m), {"ema": dict(zip(paths, m))}

    return GradientTransformation(init, update)


def multi_transform(labels: PathFn, transforms: dict[str, GradientTransformation]) -> GradientTransformation:
    """Each parameter stepped by ``transforms[labels(path, param)]`` (optax's ``multi_transform``):
    Muon for the hidden matrices, AdamW for the rest. Each transform sees the flat
    ``{path: tensor}`` of its parameters; state ``{label: that transform's state}``."""

    def split(tree, ref):
        groups = {label: {} for label in transforms}
        for (path, leaf), label in zip(leaves_with_paths(tree), path_values(labels, ref, None)):
            if label not in transforms:
                raise ValueError(f"multi_transform: {path} is labelled {label!r}; expected one of {', '.join(transforms)}")
            groups[label][path] = leaf
        return groups

    def init(params):
        groups = split(params, leaves_with_paths(params))
        return {label: t.init(groups[label]) for label, t in transforms.items()}

    def update(grads, state, params=None, step=0):
        if params is None:
            raise ValueError("multi_transform needs params (the labels are functions of them)")
        p_flat = dict(leaves_with_paths(params))
        ref = [(path, p_flat[path]) for path, _ in leaves_with_paths(grads)]
        g_groups = split(grads, ref)
        p_groups = {label: {path: p_flat[path] for path in group} for label, group in g_groups.items()}
        out, new_state = {}, {}
        for label, t in transforms.items():
            u, new_state[label] = t.update(g_groups[label], state[label], p_groups[label], step)
            out.update(u)
        return replace_leaves(grads, [out[path] for path, _ in ref]), new_state

    return GradientTransformation(init, update)
