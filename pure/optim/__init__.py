"""Optax-style optimizers over parameter pytrees, executed by PyTorch.

An optimizer is a ``GradientTransformation``: two pure functions

    init(params) -> state
    update(grads, state, params, step) -> (updates, new_state)

and ``apply_updates(params, updates)`` adds the updates. Big optimizers are
``chain``s of small transforms; ``adamw`` is

    chain(scale_by_adam(b1, b2, eps), add_decayed_weights(wd, mask),
          scale_by_learning_rate(schedule))

Modules: ``base`` (the transformation type, ``chain``, ``apply_updates``),
``transforms`` (clipping, weight decay, lr scaling, momentum), ``scalers``
(the Adam, Lion and Adafactor directions), ``aliases`` (``adamw``, ``sgd``,
``lion``, ``adafactor``), ``adaptive`` (``adopt``, ``optimi_adamw``, ``muon``),
``schedule_free`` (schedule-free AdamW / SGD and their eval weights), ``param_groups`` (decay mask, LoRA+, lr groups).
Which optimizer a config name means is the edge's business
(``programs/optimizers.py``).

Conventions
-----------
- Params, grads and updates are pytrees of tensors: flat ``{name: tensor}``
  dicts or nested dicts whose joined keys are the HF names
  (``model.layers.0.self_attn.q_proj.weight``; a LoRA leaf is ``...q_proj.A``).
  Updates come back in the structure of the grads.
- ``step`` is the 0-based index of this update (the number of updates already
  applied). It only feeds learning-rate / weight-decay schedules; moment bias
  corrections use the transform's own ``count`` (a CPU int64 tensor, as
  ``torch.optim`` keeps its ``step``), so re-initialising an optimizer
  mid-run behaves like a fresh ``torch.optim`` object.
- State is a nested ``dict`` of tensors only (per-parameter entries are keyed
  by the parameter's dotted path), so it is a pytree that checkpoints save
  leaf by leaf (``backends/checkpoint.py``).
- Purity: no transform writes into its inputs (grads, state, params). New
  state tensors are produced by out-of-place ops; in-place ``_foreach_*_``
  ops are only applied to tensors freshly created inside the same call.
"""

from pure.optim.adaptive import adopt, muon, optimi_adamw, orthogonalize_newton_schulz
from pure.optim.aliases import adafactor, adamw, lion, sgd
from pure.optim.base import GradientTransformation, apply_updates, chain
from pure.optim.param_groups import (
    ParamGroup,
    default_decay_mask,
    make_param_groups,
    param_group_decay_mask,
    param_group_lr_scales,
)
from pure.optim.scalers import scale_by_adafactor, scale_by_adam, scale_by_lion
from pure.optim.transforms import (
    add_decayed_weights,
    clip_by_global_norm,
    ema,
    grad_norm_from_state,
    multi_transform,
    scale_by_learning_rate,
    trace,
)
from pure.optim.schedule_free import schedule_free_adamw, schedule_free_eval_params, schedule_free_sgd
from pure.tree import global_norm

__all__ = [
    "GradientTransformation",
    "ParamGroup",
    "adafactor",
    "adamw",
    "add_decayed_weights",
    "adopt",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "default_decay_mask",
    "ema",
    "global_norm",
    "grad_norm_from_state",
    "lion",
    "make_param_groups",
    "multi_transform",
    "muon",
    "optimi_adamw",
    "orthogonalize_newton_schulz",
    "param_group_decay_mask",
    "param_group_lr_scales",
    "scale_by_adafactor",
    "scale_by_adam",
    "scale_by_learning_rate",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_sgd",
    "scale_by_lion",
    "sgd",
    "trace",
]
