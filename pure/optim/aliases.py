"""The optimizers, each a ``chain`` of a direction, weight decay and the learning rate."""

from __future__ import annotations

from pure.optim.base import GradientTransformation, PathFn, PyTree, chain
from pure.optim.scalers import scale_by_adafactor, scale_by_adam, scale_by_lion
from pure.optim.transforms import add_decayed_weights, ema, scale_by_learning_rate, trace
from pure.schedules import Schedule


def adamw(
    lr_schedule: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    *,
    lr_scales: PathFn | PyTree | None = None,
) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019), step for step ``torch.optim.AdamW``:

    p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)

    ``decay_mask`` None decays every parameter (as torch); the config's optimizers
    pass ``default_decay_mask``.
    """
    return chain(
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay, decay_mask),
        scale_by_learning_rate(lr_schedule, lr_scales=lr_scales),
    )


def sgd(
    lr: float | Schedule,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    *,
    lr_scales: PathFn | PyTree | None = None,
) -> GradientTransformation:
    """``torch.optim.SGD`` (dampening 0): d = g + wd p (L2, coupled); b <- mu b + d;
    p <- p - lr * (d + mu b if nesterov else b)."""
    if nesterov and momentum <= 0:
        raise ValueError("nesterov momentum requires momentum > 0")
    parts = [add_decayed_weights(weight_decay, decay_mask)]
    if momentum:
        parts.append(trace(momentum, nesterov))
    parts.append(scale_by_learning_rate(lr, lr_scales=lr_scales))
    return chain(*parts)


def lion(
    lr: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    *,
    lr_scales: PathFn | PyTree | None = None,
) -> GradientTransformation:
    """Lion (Chen et al. 2023; lion-pytorch): p <- p - lr * (sign(b1 m + (1-b1) g) + wd p);
    m <- b2 m + (1-b2) g."""
    return chain(
        scale_by_lion(b1, b2),
        add_decayed_weights(weight_decay, decay_mask),
        scale_by_learning_rate(lr, lr_scales=lr_scales),
    )


def adafactor(
    lr: float | Schedule,
    *,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: float | None = None,
    weight_decay: float = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    lr_scales: PathFn | PyTree | None = None,
) -> GradientTransformation:
    """HF ``transformers.Adafactor`` with ``relative_step=False, scale_parameter=False,
    warmup_init=False`` (the Trainer's ``adafactor`` optim):

    u = scale_by_adafactor(g);  if beta1: u <- ema_beta1(lr * u);
    p <- p - lr * wd * p - u.
    ``eps[1]`` only matters for ``scale_parameter=True`` and is accepted for signature parity.
    """
    parts = [scale_by_adafactor(decay_rate, eps[0], clip_threshold)]
    if beta1 is None:
        parts += [add_decayed_weights(weight_decay, decay_mask), scale_by_learning_rate(lr, lr_scales=lr_scales)]
    else:
        # HF folds the lr into the first moment and decays outside it.
        parts += [
            scale_by_learning_rate(lr, lr_scales=lr_scales),
            ema(beta1),
            add_decayed_weights(weight_decay, decay_mask, learning_rate=lr, lr_scales=lr_scales),
        ]
    return chain(*parts)
