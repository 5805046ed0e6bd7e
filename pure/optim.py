"""Optax-style optimizers over parameter pytrees, executed by PyTorch.

An optimizer is a ``GradientTransformation``: two pure functions

    init(params) -> state
    update(grads, state, params, step) -> (updates, new_state)

and ``apply_updates(params, updates)`` adds the updates. Big optimizers are
``chain``s of small transforms; ``adamw`` is

    chain(scale_by_adam(b1, b2, eps), add_decayed_weights(wd, mask),
          scale_by_learning_rate(schedule))

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
  by the parameter's dotted path), so it saves to safetensors with
  ``state_to_flat`` and loads back with ``state_from_flat(flat, like)``.
- Purity: no transform writes into its inputs (grads, state, params). New
  state tensors are produced by out-of-place ops; in-place ``_foreach_*_``
  ops are only applied to tensors freshly created inside the same call.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from pure.schedules import Schedule
from pure.tree import global_norm, leaves_with_paths, replace_leaves, tree_leaves

__all__ = [
    "GradientTransformation",
    "ParamGroup",
    "OPTIMIZER_NAMES",
    "adafactor",
    "adamw",
    "adamw_8bit",
    "add_decayed_weights",
    "apply_updates",
    "build_optimizer",
    "chain",
    "clip_by_global_norm",
    "default_decay_mask",
    "ema",
    "global_norm",
    "grad_norm_from_state",
    "identity",
    "lion",
    "make_param_groups",
    "multi_transform",
    "param_group_lr_scales",
    "scale_by_adafactor",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "sgd",
    "state_from_flat",
    "state_to_flat",
    "trace",
]

PyTree = Any
State = dict
# (path, leaf) -> value; used for decay masks, lr scales and labels
PathFn = Callable[[str, Tensor], Any]


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params=None, step=0) -> (updates, state)``."""

    init: Callable[[PyTree], State]
    update: Callable[..., tuple[PyTree, State]]


# --------------------------------------------------------------------------- trees


def _flatten(tree: PyTree, prefix: str = "") -> list[tuple[str, Tensor]]:
    """``pure.tree.leaves_with_paths`` with every path under ``prefix``."""
    items = leaves_with_paths(tree)
    if not prefix:
        return items
    return [(f"{prefix}.{path}" if path else prefix, leaf) for path, leaf in items]


def _as_schedule(value) -> Schedule:
    if callable(value):
        return value
    constant = float(value)
    return lambda step: constant


def _path_values(fn_or_tree, items: list[tuple[str, Tensor]], default) -> list:
    """Evaluate a per-parameter spec: None (default), a callable (path, leaf), or a tree/flat dict."""
    if fn_or_tree is None:
        return [default] * len(items)
    if callable(fn_or_tree):
        return [fn_or_tree(path, leaf) for path, leaf in items]
    flat = dict(_flatten(fn_or_tree))
    return [flat.get(path, default) for path, _ in items]


def _zeros_like(tensors: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t, memory_format=torch.preserve_format) for t in tensors]


def _device_of(items: list[tuple[str, Tensor]]) -> torch.device:
    return items[0][1].device if items else torch.device("cpu")


def _new_count() -> Tensor:
    return torch.zeros((), dtype=torch.int64)


def _next_count(count: Tensor) -> tuple[Tensor, int]:
    new = count + 1
    return new, int(new.item())


# --------------------------------------------------------------------------- state I/O


def state_to_flat(state: PyTree, prefix: str = "") -> dict[str, Tensor]:
    """A flat ``{dotted.key: tensor}`` view of an optimizer state, for safetensors.

    Tensors are shared, not copied. Keys contain the parameter paths, so the
    inverse needs a template: ``state_from_flat(flat, like=opt.init(params))``.
    """
    return dict(_flatten(state, prefix))


def state_from_flat(flat: Mapping[str, Tensor], like: PyTree, prefix: str = "") -> PyTree:
    """Rebuild a state with ``like``'s structure from ``state_to_flat`` output.

    Each tensor is cast to the template's dtype (safetensors round-trips them
    anyway); the device is kept from ``flat``, except that scalar ``count``
    entries follow the template (CPU). Missing or extra keys raise ``KeyError``.
    """
    paths = [path for path, _ in _flatten(like, prefix)]
    missing = [p for p in paths if p not in flat]
    if missing:
        raise KeyError(f"optimizer state is missing {len(missing)} entries, e.g. {missing[:3]}")
    extra = sorted(set(flat) - set(paths))
    if extra:
        raise KeyError(f"optimizer state has {len(extra)} unexpected entries, e.g. {extra[:3]}")
    leaves = []
    for path, ref in _flatten(like, prefix):
        value = flat[path]
        device = ref.device if ref.ndim == 0 and ref.device.type == "cpu" else value.device
        leaves.append(value.to(dtype=ref.dtype, device=device))
    return replace_leaves(like, leaves)


def grad_norm_from_state(state: PyTree) -> Tensor | None:
    """The pre-clip global gradient norm recorded by ``clip_by_global_norm`` (for ``train/grad_norm``)."""
    for path, leaf in _flatten(state):
        if path == "grad_norm" or path.endswith(".grad_norm"):
            return leaf
    return None


# --------------------------------------------------------------------------- basics


def identity() -> GradientTransformation:
    """u = g."""
    return GradientTransformation(lambda params: {}, lambda grads, state, params=None, step=0: (grads, state))


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
    p_items = _flatten(params)
    u_leaves = tree_leaves(updates)
    if len(p_items) != len(u_leaves):
        raise ValueError(f"params have {len(p_items)} leaves but updates have {len(u_leaves)}")
    p_leaves = [p for _, p in p_items]
    if all(p.dtype == u.dtype for p, u in zip(p_leaves, u_leaves)):
        new = torch._foreach_add(p_leaves, u_leaves) if p_leaves else []
    else:
        new = [(p + u).to(p.dtype) for p, u in zip(p_leaves, u_leaves)]
    return replace_leaves(params, new)


def clip_by_global_norm(max_norm: float | None) -> GradientTransformation:
    """g <- g * min(1, max_norm / (||g|| + 1e-6))  (``clip_grad_norm_``'s formula).

    State ``{"grad_norm": ||g||}`` holds the norm *before* clipping, for the
    ``train/grad_norm`` metric. ``max_norm`` None or <= 0 only records it.
    """

    def init(params):
        return {"grad_norm": torch.zeros((), dtype=torch.float32, device=_device_of(_flatten(params)))}

    def update(grads, state, params=None, step=0):
        leaves = tree_leaves(grads)
        norm = global_norm(grads)
        if max_norm is None or max_norm <= 0 or not leaves:
            return grads, {"grad_norm": norm}
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        clipped = [g * coef.to(dtype=g.dtype) for g in leaves]
        return replace_leaves(grads, clipped), {"grad_norm": norm}

    return GradientTransformation(init, update)


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
    wd_schedule = _as_schedule(weight_decay)
    lr_schedule = None if learning_rate is None else _as_schedule(learning_rate)

    def update(grads, state, params=None, step=0):
        wd = wd_schedule(step)
        if wd == 0:
            return grads, state
        if params is None:
            raise ValueError("add_decayed_weights needs params")
        u_items = _flatten(grads)
        p_flat = dict(_flatten(params))
        p_items = [(path, p_flat[path]) for path, _ in u_items]
        u_leaves = [u for _, u in u_items]
        keep = _path_values(mask, p_items, True)
        coefs = [wd] * len(p_items)
        if lr_schedule is not None:
            lr = lr_schedule(step)
            scales = _path_values(lr_scales, p_items, 1.0)
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
    schedule = _as_schedule(learning_rate)

    def update(grads, state, params=None, step=0):
        lr = schedule(step) * (-1.0 if flip_sign else 1.0)
        items = _flatten(grads)
        if not items:
            return grads, state
        leaves = [g for _, g in items]
        if lr_scales is None:
            new = torch._foreach_mul(leaves, lr)
        else:
            p_flat = dict(_flatten(params)) if params is not None else {}
            ref = [(path, p_flat.get(path, g)) for path, g in items]
            scales = _path_values(lr_scales, ref, 1.0)
            new = torch._foreach_mul(leaves, [lr * float(s) for s in scales])
        return replace_leaves(grads, new), state

    return GradientTransformation(lambda params: {}, update)


def trace(momentum: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum as in ``torch.optim.SGD`` (dampening 0):

    b <- mu * b + g;  u = g + mu * b (nesterov) or b.
    """

    def init(params):
        items = _flatten(params)
        return {"momentum": dict(zip([p for p, _ in items], _zeros_like([t for _, t in items])))}

    def update(grads, state, params=None, step=0):
        items = _flatten(grads)
        g = [t for _, t in items]
        buf = [state["momentum"][p] for p, _ in items]
        new_buf = torch._foreach_mul(buf, momentum)
        torch._foreach_add_(new_buf, g)
        out = torch._foreach_add(g, new_buf, alpha=momentum) if nesterov else new_buf
        return replace_leaves(grads, out), {"momentum": dict(zip([p for p, _ in items], new_buf))}

    return GradientTransformation(init, update)


def ema(decay: float) -> GradientTransformation:
    """m <- decay * m + (1 - decay) * u; u = m (no bias correction, as Adafactor's beta1)."""

    def init(params):
        items = _flatten(params)
        return {"ema": dict(zip([p for p, _ in items], _zeros_like([t for _, t in items])))}

    def update(grads, state, params=None, step=0):
        items = _flatten(grads)
        g = [t for _, t in items]
        m = torch._foreach_mul([state["ema"][p] for p, _ in items], decay)
        torch._foreach_add_(m, g, alpha=1.0 - decay)
        return replace_leaves(grads, m), {"ema": dict(zip([p for p, _ in items], m))}

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- scalers


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction (Kingma & Ba 2015), in ``torch.optim.AdamW``'s arithmetic:

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
    u = (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps).
    State ``{"count", "mu": {path: m}, "nu": {path: v}}`` (moments in the param dtype).
    """

    def init(params):
        items = _flatten(params)
        paths = [p for p, _ in items]
        tensors = [t for _, t in items]
        return {
            "count": _new_count(),
            "mu": dict(zip(paths, _zeros_like(tensors))),
            "nu": dict(zip(paths, _zeros_like(tensors))),
        }

    def update(grads, state, params=None, step=0):
        items = _flatten(grads)
        paths = [p for p, _ in items]
        g = [t for _, t in items]
        count, t = _next_count(state["count"])
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
        items = _flatten(params)
        return {"mu": dict(zip([p for p, _ in items], _zeros_like([t for _, t in items])))}

    def update(grads, state, params=None, step=0):
        items = _flatten(grads)
        paths = [p for p, _ in items]
        g = [t for _, t in items]
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
        for path, p in _flatten(params):
            dtype = _adafactor_compute_dtype(p)
            if is_factored(p):
                row[path] = torch.zeros(p.shape[:-1], dtype=dtype, device=p.device)
                col[path] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=dtype, device=p.device)
            else:
                v[path] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        return {"count": _new_count(), "row": row, "col": col, "v": v}

    def update(grads, state, params=None, step=0):
        count, t = _next_count(state["count"])
        beta2t = 1.0 - math.pow(t, decay_rate)
        row, col, v, out = {}, {}, {}, []
        for path, g in _flatten(grads):
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


# --------------------------------------------------------------------------- partition


def multi_transform(transforms: Mapping[str, GradientTransformation], labels: PathFn | PyTree) -> GradientTransformation:
    """Route each parameter to ``transforms[label(path, param)]`` (optax's ``multi_transform``).

    Inner transforms see flat ``{path: tensor}`` sub-dicts; state is
    ``{label: inner_state}``. Use ``identity()`` / ``set_to_zero`` style
    transforms to freeze a group.
    """

    def partition(tree, ref):
        items = _flatten(tree)
        ref_items = _flatten(ref) if ref is not None else items
        labs = _path_values(labels, ref_items, None)
        unknown = sorted({lab for lab in labs if lab not in transforms}, key=str)
        if unknown:
            raise KeyError(f"labels {unknown} have no transform; known: {sorted(transforms)}")
        parts: dict[str, dict[str, Tensor]] = {lab: {} for lab in transforms}
        for (path, leaf), lab in zip(items, labs):
            parts[lab][path] = leaf
        return items, labs, parts

    def init(params):
        _, _, parts = partition(params, params)
        return {lab: t.init(parts[lab]) for lab, t in transforms.items()}

    def update(grads, state, params=None, step=0):
        items, labs, g_parts = partition(grads, params)
        p_parts = partition(params, params)[2] if params is not None else {lab: None for lab in transforms}
        new_state, out_parts = {}, {}
        for lab, t in transforms.items():
            out_parts[lab], new_state[lab] = t.update(g_parts[lab], state[lab], p_parts[lab], step)
        new = [out_parts[lab][path] for (path, _), lab in zip(items, labs)]
        return replace_leaves(grads, new), new_state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- param groups


def default_decay_mask(path: str, param: Tensor | None = None) -> bool:
    """Whether a parameter gets weight decay: not biases (``*.bias``), not norm
    weights (path contains ``norm``), not 1-D tensors."""
    if path.endswith(".bias") or path == "bias" or "norm" in path.lower():
        return False
    if param is not None and param.ndim <= 1:
        return False
    return True


class ParamGroup(NamedTuple):
    """A named set of parameters with its own lr multiplier (first matching group wins).

    ``match(path, param) -> bool``; ``lr_scale`` multiplies the scheduled lr
    (HF param groups are scheduled by a multiplicative ``LambdaLR``, so an
    absolute group lr L becomes ``L / learning_rate``); ``decay`` False turns
    weight decay off for the group, None leaves it to the decay mask.
    """

    name: str
    match: Callable[[str, Tensor], bool]
    lr_scale: float = 1.0
    decay: bool | None = None


def _substring_matcher(substrings: Sequence[str]) -> Callable[[str, Tensor], bool]:
    subs = tuple(substrings)
    return lambda path, param: any(s in path for s in subs)


def _is_lora_leaf(path: str, letter: str) -> bool:
    return path.endswith(f".{letter}") or path.endswith(f".lora_{letter}") or f".lora_{letter}." in path


def make_param_groups(
    learning_rate: float,
    *,
    loraplus_lr_ratio: float | None = None,
    loraplus_lr_embedding: float | None = 1e-6,
    lr_groups: Sequence[Mapping[str, Any]] | None = None,
    embedding_lr: float | None = None,
    embedding_lr_scale: float | None = None,
    embedding_modules: Sequence[str] = ("embed_tokens",),
) -> list[ParamGroup]:
    """Param groups from the config keys ``loraplus_lr_ratio``, ``loraplus_lr_embedding``,
    ``lr_groups``, ``embedding_lr`` and ``embedding_lr_scale`` (first match wins).

    - LoRA+ (Hayou et al. 2024; PEFT's ``create_loraplus_optimizer``): LoRA
      leaves of an embedding (path contains an ``embedding_modules`` entry)
      get the absolute lr ``loraplus_lr_embedding``; LoRA ``B`` leaves (path
      ending ``.B``) and 1-D trainables (DoRA ``.m``) get ``lr * loraplus_lr_ratio``;
      ``A`` keeps ``lr``.
    - Embeddings (paths containing ``embed_tokens``): ``lr * embedding_lr_scale``
      (which wins) or ``embedding_lr``, without weight decay (as axolotl).
    - ``lr_groups``: ``[{name, modules: [substrings], lr}]``, absolute lrs.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0 to derive group lr scales, got {learning_rate}")
    groups: list[ParamGroup] = []
    is_embedding = _substring_matcher(embedding_modules)
    if loraplus_lr_ratio is not None:
        emb_lr = 1e-6 if loraplus_lr_embedding is None else loraplus_lr_embedding
        groups.append(
            ParamGroup(
                "loraplus_embedding",
                lambda path, p: is_embedding(path, p) and (_is_lora_leaf(path, "A") or _is_lora_leaf(path, "B")),
                emb_lr / learning_rate,
            )
        )
        # PEFT puts every trainable 1-D tensor (DoRA magnitudes ``.m``, biases) with B.
        groups.append(
            ParamGroup("loraplus_B", lambda path, p: _is_lora_leaf(path, "B") or p.ndim == 1, float(loraplus_lr_ratio))
        )
    if embedding_lr_scale is not None or embedding_lr is not None:
        scale = embedding_lr_scale if embedding_lr_scale is not None else embedding_lr / learning_rate
        groups.append(ParamGroup("embeddings", is_embedding, float(scale), decay=False))
    for group in lr_groups or ():
        missing = {"name", "modules", "lr"} - set(group)
        if missing:
            raise ValueError(f"lr_groups entry {dict(group)} lacks {sorted(missing)}")
        groups.append(ParamGroup(str(group["name"]), _substring_matcher(group["modules"]), float(group["lr"]) / learning_rate))
    return groups


def _group_of(groups: Sequence[ParamGroup], path: str, param: Tensor) -> ParamGroup | None:
    for group in groups:
        if group.match(path, param):
            return group
    return None


def param_group_lr_scales(groups: Sequence[ParamGroup]) -> Callable[[str, Tensor], float]:
    """``(path, param) -> lr multiplier`` of the first matching group (1.0 if none)."""

    def lr_scale(path: str, param: Tensor) -> float:
        group = _group_of(groups, path, param)
        return 1.0 if group is None else group.lr_scale

    return lr_scale


def _group_decay_mask(groups: Sequence[ParamGroup], base_mask: PathFn | None) -> PathFn:
    def mask(path: str, param: Tensor) -> bool:
        group = _group_of(groups, path, param)
        if group is not None and group.decay is not None:
            return group.decay
        return True if base_mask is None else bool(base_mask(path, param))

    return mask


# --------------------------------------------------------------------------- aliases


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

    ``decay_mask`` None decays every parameter (as torch); ``build_optimizer``
    passes ``default_decay_mask``.
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


def adamw_8bit(
    lr_schedule: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    *,
    lr_scales: PathFn | PyTree | None = None,
    min_8bit_size: int = 4096,
    blocksize: int | None = None,
) -> GradientTransformation:
    """AdamW with blockwise 8-bit moments (Dettmers et al. 2022), via ``bitsandbytes``.

    Emits final updates (lr and decoupled decay included), so it is not
    followed by ``scale_by_learning_rate``. Tensors with fewer than
    ``min_8bit_size`` elements keep fp32 moments and use ``adamw``'s math, as
    ``bnb.optim.AdamW8bit`` does. The bnb kernel writes in place; it is only
    given fresh copies of the parameter and state. CUDA only.
    """
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "optimizer adamw_8bit needs the 'bitsandbytes' package (pip install bitsandbytes)"
        ) from exc
    import bitsandbytes

    if blocksize is None:
        major, minor = (int(x) for x in bitsandbytes.__version__.split(".")[:2])
        blocksize = 256 if (major, minor) >= (0, 45) else 2048
    kernel_params = inspect.signature(bnbf.optimizer_update_8bit_blockwise).parameters
    small = scale_by_adam(b1, b2, eps)
    wd_schedule = _as_schedule(weight_decay)
    lr_fn = _as_schedule(lr_schedule)

    def init(params):
        items = _flatten(params)
        large = [(path, p) for path, p in items if p.numel() >= min_8bit_size]
        large_paths = {path for path, _ in large}
        device = _device_of(items)
        q8 = {}
        for path, p in large:
            blocks = (p.numel() + blocksize - 1) // blocksize
            q8[path] = {
                "state1": torch.zeros_like(p, dtype=torch.uint8),
                "state2": torch.zeros_like(p, dtype=torch.uint8),
                "absmax1": torch.zeros(blocks, dtype=torch.float32, device=p.device),
                "absmax2": torch.zeros(blocks, dtype=torch.float32, device=p.device),
            }
        return {
            "count": _new_count(),
            "qmap1": bnbf.create_dynamic_map(signed=True).to(device),
            "qmap2": bnbf.create_dynamic_map(signed=False).to(device),
            "q8": q8,
            "small": small.init({path: p for path, p in items if path not in large_paths}),
        }

    def update(grads, state, params=None, step=0):
        if params is None:
            raise ValueError("adamw_8bit needs params")
        count, t = _next_count(state["count"])
        lr = lr_fn(step)
        wd = wd_schedule(step)
        g_items = _flatten(grads)
        p_items = dict(_flatten(params))
        scales = dict(zip([p for p, _ in g_items], _path_values(lr_scales, [(p, p_items[p]) for p, _ in g_items], 1.0)))
        keep = dict(zip([p for p, _ in g_items], _path_values(decay_mask, [(p, p_items[p]) for p, _ in g_items], True)))
        small_g = {path: g for path, g in g_items if path not in state["q8"]}
        small_u, small_state = small.update(small_g, state["small"], None, step)
        out, q8 = {}, {}
        for path, g in g_items:
            p = p_items[path]
            lr_p = lr * scales[path]
            wd_p = wd if keep[path] else 0.0
            if path not in state["q8"]:
                out[path] = -lr_p * (small_u[path] + wd_p * p)
                continue
            s = {k: v.clone() for k, v in state["q8"][path].items()}
            new_p = p.clone()
            kwargs = dict(
                optimizer_name="adam", g=g.contiguous(), p=new_p, state1=s["state1"], state2=s["state2"],
                beta1=b1, beta2=b2, eps=eps, step=t, lr=lr_p, qmap1=state["qmap1"], qmap2=state["qmap2"],
                absmax1=s["absmax1"], absmax2=s["absmax2"], weight_decay=wd_p, gnorm_scale=1.0, skip_zeros=False,
            )
            if "beta3" in kernel_params:
                kwargs.update(beta3=0.0, alpha=0.0)
            bnbf.optimizer_update_8bit_blockwise(**kwargs)
            out[path] = new_p - p
            q8[path] = s
        new_state = {"count": count, "qmap1": state["qmap1"], "qmap2": state["qmap2"], "q8": q8, "small": small_state}
        return replace_leaves(grads, [out[path] for path, _ in g_items]), new_state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- registry

_ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused", "adamw", "adamw_torch_xla",
          "adamw_torch_npu_fused", "paged_adamw_32bit")
_ADAMW_8BIT = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")
_LION = ("lion_pytorch", "lion_32bit", "paged_lion_32bit", "lion")
OPTIMIZER_NAMES = _ADAMW + _ADAMW_8BIT + ("sgd",) + _LION + ("adafactor",)


def _parse_optim_args(optim_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """HF ``optim_args`` ("a=1,b=true") or a dict -> kwargs."""
    if not optim_args:
        return {}
    if isinstance(optim_args, Mapping):
        return dict(optim_args)
    out: dict[str, Any] = {}
    for item in str(optim_args).replace(" ", "").split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def build_optimizer(
    name: str,
    lr_schedule: float | Schedule,
    *,
    weight_decay: float = 0.0,
    adam_beta1: float | None = None,
    adam_beta2: float | None = None,
    adam_epsilon: float | None = None,
    max_grad_norm: float | None = None,
    param_groups: Sequence[ParamGroup] | None = None,
    decay_mask: PathFn | None = default_decay_mask,
    optim_args: str | Mapping[str, Any] | None = None,
) -> GradientTransformation:
    """The optimizer named by the config's ``optimizer`` key (HF ``OptimizerNames``):

    chain(clip_by_global_norm(max_grad_norm), <optimizer>)

    The clip transform is always present and records ``grad_norm`` (it only
    clips when ``max_grad_norm`` > 0). Betas / eps left None take each
    optimizer's own defaults (Lion: 0.9, 0.99). ``param_groups`` (from
    ``make_param_groups``) give per-parameter lr multipliers and decay
    overrides; ``decay_mask`` excludes biases / norms / 1-D tensors by default.
    ``optim_args`` (str "k=v,..." or dict) adds optimizer kwargs, e.g.
    ``momentum`` / ``nesterov`` for sgd, ``beta1`` for adafactor.
    """
    extra = _parse_optim_args(optim_args)
    groups = list(param_groups or ())
    lr_scales = param_group_lr_scales(groups) if groups else None
    mask = _group_decay_mask(groups, decay_mask) if groups else decay_mask
    b1 = 0.9 if adam_beta1 is None else adam_beta1
    eps = 1e-8 if adam_epsilon is None else adam_epsilon

    if name in _ADAMW:
        b2 = 0.999 if adam_beta2 is None else adam_beta2
        opt = adamw(lr_schedule, b1, b2, eps, weight_decay, mask, lr_scales=lr_scales)
    elif name in _ADAMW_8BIT:
        b2 = 0.999 if adam_beta2 is None else adam_beta2
        opt = adamw_8bit(lr_schedule, b1, b2, eps, weight_decay, mask, lr_scales=lr_scales, **extra)
    elif name == "sgd":
        opt = sgd(lr_schedule, weight_decay=weight_decay, decay_mask=mask, lr_scales=lr_scales, **extra)
    elif name in _LION:
        b2 = 0.99 if adam_beta2 is None else adam_beta2
        opt = lion(lr_schedule, b1, b2, weight_decay, mask, lr_scales=lr_scales)
    elif name == "adafactor":
        opt = adafactor(lr_schedule, weight_decay=weight_decay, decay_mask=mask, lr_scales=lr_scales, **extra)
    else:
        close = difflib.get_close_matches(str(name), OPTIMIZER_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown optimizer {name!r}; supported: {', '.join(OPTIMIZER_NAMES)}.{hint}")
    return chain(clip_by_global_norm(max_grad_norm), opt)
