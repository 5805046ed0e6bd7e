"""Composable losses.

A loss is `fn(apply, batch, key) -> (scalar, metrics)`: `apply` is a `pure.train.Policy`, whose
call `apply(tokens, **forward_kwargs)` runs the model with the trainable params bound (its
`token_logprobs` runs the lm_head, its `reference` the reference policy when the objective needs
one, its `params` holds heads outside the forward); `batch` is one micro-batch; `key` drives its
randomness.

A micro-batch's loss is a *sum* over its rows or tokens divided by a total of the whole accumulated
batch (target tokens, pairs, KTO rows, ...), so the micro-batch losses add up to the batch mean
whatever the micro-batching. Which total is the loss's own business: a `Loss` carries its
`count_fn(micro_batches) -> {total_*: tensor}` and, for gradient-free statistics of the whole batch
(KTO's KL baseline), its `batch_stats_fn(apply, micro_batches) -> {name: tensor}`. The train and eval
steps run both once per step and merge their values into every micro-batch.

`Loss` objects add and scale: `dpo + 0.2 * nll` is again a `Loss`, its metrics the union of both (a
term's scalar is logged as `loss/<name>`), its counts the union of both terms' counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pure import rng
from pure.losses.common import count_targets

LossFn = Callable[..., tuple[torch.Tensor, dict]]
CountFn = Callable[[Sequence[dict]], dict]
BatchStatsFn = Callable[..., dict]


def _merged(first: Callable | None, second: Callable | None, what: str, names: tuple[str, str]) -> Callable | None:
    """One function returning the union of both functions' dicts; a key both return must have one value."""
    if second is None or second is first:
        return first
    if first is None:
        return second

    def merged(*args):
        a, b = first(*args), second(*args)
        for key in sorted(a.keys() & b.keys()):
            if not torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])):
                raise ValueError(f"the loss terms {names[0]!r} and {names[1]!r} disagree on {what} {key!r}: "
                                 f"{a[key]} vs {b[key]}; summed terms must see the same values of the whole batch")
        return {**a, **b}

    return merged


@dataclass(frozen=True)
class Loss:
    """A named loss function with its normaliser; composes with `+` and scalar `*`."""

    fn: LossFn
    name: str
    count_fn: CountFn = count_targets
    batch_stats_fn: BatchStatsFn | None = None

    def __call__(self, apply, batch, key=None):
        return self.fn(apply, batch, key)

    def totals(self, apply, micro_batches: Sequence[dict]) -> dict:
        """What every micro-batch of one accumulated batch carries: the counts of `count_fn`, then the
        statistics of `batch_stats_fn` (no gradient flows through them)."""
        totals = self.count_fn(micro_batches)
        if self.batch_stats_fn is not None:
            with torch.no_grad():
                totals = {**totals, **self.batch_stats_fn(apply, micro_batches)}
        return totals

    def on_batch(self, apply, batch: dict, key=None):
        """The loss of `batch` taken as the whole accumulated batch (its own totals): a notebook's or a
        test's one-off call. The steps use `totals` of all their micro-batches instead."""
        return self(apply, {**batch, **self.totals(apply, [batch])}, key)

    def __add__(self, other: "Loss") -> "Loss":
        if not isinstance(other, Loss):
            return NotImplemented
        names = (self.name, other.name)

        def total(apply, batch, key=None):
            keys = rng.split(key, 2) if key is not None else (None, None)
            a, ma = self(apply, batch, keys[0])
            b, mb = other(apply, batch, keys[1])
            metrics = {**ma, **mb, f"loss/{self.name}": a.detach(), f"loss/{other.name}": b.detach()}
            return a + b, metrics

        return Loss(total, f"{self.name}+{other.name}",
                    count_fn=_merged(self.count_fn, other.count_fn, "the count", names),
                    batch_stats_fn=_merged(self.batch_stats_fn, other.batch_stats_fn, "the batch statistic", names))

    def __mul__(self, weight: float) -> "Loss":
        weight = float(weight)

        def scaled(apply, batch, key=None):
            value, metrics = self(apply, batch, key)
            return weight * value, metrics

        return Loss(scaled, f"{weight:g}*{self.name}", count_fn=self.count_fn, batch_stats_fn=self.batch_stats_fn)

    __rmul__ = __mul__

    def __repr__(self):
        return f"Loss({self.name})"
