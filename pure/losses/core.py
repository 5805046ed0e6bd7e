"""Composable losses.

A loss is `fn(apply, batch, key) -> (scalar, metrics)`: `apply(tokens, **forward_kwargs)` runs the
model with the trainable params bound (and `apply.reference` runs the reference policy when the
objective needs one); `batch` is one micro-batch; `key` drives its randomness. `Loss` objects add
and scale: `dpo + 0.2 * nll` is again a `Loss`, its metrics the union of both (a term's scalar is
logged as `loss/<name>`).
"""
from __future__ import annotations

from typing import Callable

import torch

LossFn = Callable[..., tuple[torch.Tensor, dict]]


class Loss:
    """A named loss function that composes with `+` and scalar `*`."""

    def __init__(self, fn: LossFn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, apply, batch, key=None):
        return self.fn(apply, batch, key)

    def __add__(self, other: "Loss") -> "Loss":
        if not isinstance(other, Loss):
            return NotImplemented

        def total(apply, batch, key=None):
            from pure import rng

            keys = rng.split(key, 2) if key is not None else (None, None)
            a, ma = self(apply, batch, keys[0])
            b, mb = other(apply, batch, keys[1])
            metrics = {**ma, **mb, f"loss/{self.name}": a.detach(), f"loss/{other.name}": b.detach()}
            return a + b, metrics

        return Loss(total, f"{self.name}+{other.name}")

    def __mul__(self, weight: float) -> "Loss":
        weight = float(weight)

        def scaled(apply, batch, key=None):
            value, metrics = self(apply, batch, key)
            return weight * value, metrics

        return Loss(scaled, f"{weight:g}*{self.name}")

    __rmul__ = __mul__

    def __repr__(self):
        return f"Loss({self.name})"
