"""Rematerialisation (activation checkpointing) that works under `torch.func` transforms.

`torch.utils.checkpoint` relies on saved-tensor hooks, which `torch.func.grad` does not support.
`remat(fn)` instead wraps `fn` in an autograd.Function that keeps only its inputs and recomputes
`fn` with `torch.func.vjp` in the backward pass; it works under `torch.func.grad` and plain
autograd alike. Only floating-point tensors among the arguments receive gradients.
"""
from __future__ import annotations

from typing import Callable

import torch

from pure.tree import replace_leaves, tree_leaves


def _is_differentiable(leaf) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.is_floating_point()


class _Remat(torch.autograd.Function):
    @staticmethod
    def forward(rebuild, *tensors):
        with torch.no_grad():
            return rebuild(tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.rebuild = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, *grads):
        with torch.enable_grad():
            out, vjp = torch.func.vjp(lambda *t: ctx.rebuild(t), *ctx.saved_tensors)
        return (None, *vjp(grads if isinstance(out, tuple) else grads[0]))


def remat(fn: Callable) -> Callable:
    """`fn` with its intermediate activations recomputed in the backward pass instead of stored."""

    def wrapped(*args):
        leaves = tree_leaves(args, none_is_leaf=True)
        where = [i for i, leaf in enumerate(leaves) if _is_differentiable(leaf)]

        def rebuild(tensors):
            full = list(leaves)
            for i, t in zip(where, tensors):
                full[i] = t
            return fn(*replace_leaves(args, full, none_is_leaf=True))

        return _Remat.apply(rebuild, *[leaves[i] for i in where])

    return wrapped
