"""The core of ``pure.optim``: ``GradientTransformation``, ``chain``, ``apply_updates``, and the
helpers every transform is written with (per-path state, schedules, the update count)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from pure.schedules import Schedule
from pure.tree import leaves_with_paths, replace_leaves, tree_leaves

PyTree = Any
State = dict
# (path, leaf) -> value; used for decay masks, lr scales and labels
PathFn = Callable[[str, Tensor], Any]


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params=None, step=0) -> (updates, state)``."""

    init: Callable[[PyTree], State]
    update: Callable[..., tuple[PyTree, State]]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transforms in order; state ``{"0": s0, "1": s1, ...}``."""

    def init(params):
        return {str(i): t.init(params) for i, t in enumerate(transforms)}

    def update(grads, state, params=None, step=0):
        new_state = {}
        for i, t in enumerate(transforms):
            grads, new_state[str(i)] = t.update(grads, state[str(i)], params, step)
        return grads, new_state

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """p' = p + u, cast back to each parameter's dtype. Returns new tensors."""
    p_leaves = tree_leaves(params)
    u_leaves = tree_leaves(updates)
    if len(p_leaves) != len(u_leaves):
        raise ValueError(f"params have {len(p_leaves)} leaves but updates have {len(u_leaves)}")
    if all(p.dtype == u.dtype for p, u in zip(p_leaves, u_leaves)):
        new = torch._foreach_add(p_leaves, u_leaves) if p_leaves else []
    else:
        new = [(p + u).to(p.dtype) for p, u in zip(p_leaves, u_leaves)]
    return replace_leaves(params, new)


# --------------------------------------------------------------------------- transform helpers


def _unzip(tree: PyTree) -> tuple[list[str], list[Tensor]]:
    """The dotted paths and the leaves of ``tree``, in ``leaves_with_paths`` order."""
    items = leaves_with_paths(tree)
    return [path for path, _ in items], [leaf for _, leaf in items]


def _zeros_state(params: PyTree) -> dict[str, Tensor]:
    """``{path: zeros like the parameter}``: a per-parameter buffer (a moment, a momentum)."""
    return {path: torch.zeros_like(p, memory_format=torch.preserve_format) for path, p in leaves_with_paths(params)}


def as_schedule(value: float | Schedule) -> Schedule:
    """A schedule ``step -> value``: ``value`` itself when callable, else the constant."""
    if callable(value):
        return value
    constant = float(value)
    return lambda step: constant


def path_values(spec: PathFn | PyTree | None, items: list[tuple[str, Tensor]], default) -> list:
    """A per-parameter spec evaluated at each ``(path, leaf)`` of ``items``: None (``default``
    everywhere), a callable ``(path, leaf)``, or a tree / flat dict keyed by path."""
    if spec is None:
        return [default] * len(items)
    if callable(spec):
        return [spec(path, leaf) for path, leaf in items]
    flat = dict(leaves_with_paths(spec))
    return [flat.get(path, default) for path, _ in items]


def device_of(tree: PyTree) -> torch.device:
    """The device of the first leaf (CPU for an empty tree)."""
    leaves = tree_leaves(tree)
    return leaves[0].device if leaves else torch.device("cpu")


def new_count() -> Tensor:
    """The update count of a fresh transform: a CPU int64 tensor, as ``torch.optim`` keeps ``step``."""
    return torch.zeros((), dtype=torch.int64)


def next_count(count: Tensor) -> tuple[Tensor, int]:
    """``(count + 1, as an int)``: the new state entry and the ``t`` of this update's bias corrections."""
    new = count + 1
    return new, int(new.item())
