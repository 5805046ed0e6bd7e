"""torchao's low-bit AdamW (``torchao.optim.AdamW8bit``, ``AdamW4bit``, ``AdamWFp8``) as a pure
``GradientTransformation``, over torchao's own update function and state types.

torchao keeps each moment as a tensor subclass (``OptimState8bit``: uint8 codes, per-block fp32
scale, the quantisation map; ``OptimState4bit``: two codes per byte; ``OptimStateFp8``:
float8_e4m3fn codes and scales). Here the train state holds only those plain tensors
(``__tensor_flatten__``), so a checkpoint saves and restores them bit for bit; each update rebuilds
the subclass around copies of them, runs torchao's ``single_param_adam`` on a copy of the
parameter and flattens the result back. The update is ``new_p - p``.

torchao's optimizer class wraps ``single_param_adam`` in ``torch.compile``; this runs it eagerly
(the same function, one compile less: on CPU the compile alone takes tens of seconds).
As torchao does, a tensor with fewer than 4096 values or whose size is not a multiple of the block
keeps plain moments in the parameter's dtype.
"""

from __future__ import annotations

import torch

from pure.optim import GradientTransformation
from pure.optim.base import PathFn, PyTree, as_schedule, new_count, next_count, path_values
from pure.schedules import Schedule
from pure.tree import leaves_with_paths, replace_leaves

# kind -> (torchao class name, default block size)
KINDS = {"8bit": ("AdamW8bit", 256), "4bit": ("AdamW4bit", 128), "fp8": ("AdamWFp8", 256)}
_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, signed)


def _torchao():
    try:
        import torchao.optim as ao_optim
        from torchao.optim.adam import single_param_adam
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("torchao optimizers need the 'torchao' package (pip install torchao)") from exc
    return ao_optim, single_param_adam


def torchao_adamw(
    kind: str,
    lr_schedule: float | Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | Schedule = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    lr_scales: PathFn | PyTree | None = None,
    block_size: int | None = None,
) -> GradientTransformation:
    """AdamW with ``kind`` ("8bit", "4bit", "fp8") moments, step for step torchao's class:

    p <- p - lr wd p;  m <- lerp(m, g, 1-b1);  v <- lerp(v, g^2, 1-b2)  (stored quantised);
    p <- p - lr (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps), in fp32 (lr and t as fp32 tensors,
    as torchao keeps them). torchao's ``bf16_stochastic_round`` is not offered: it draws from the
    global RNG, outside the train state's key.
    """
    if kind not in KINDS:
        raise ValueError(f"torchao_adamw: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    ao_optim, single_param_adam = _torchao()
    class_name, default_block = KINDS[kind]
    cls = getattr(ao_optim, class_name)
    block = int(block_size or default_block)
    lr_fn, wd_fn = as_schedule(lr_schedule), as_schedule(weight_decay)

    def quantised(p) -> bool:  # torchao's _new_buffer rule
        return p.numel() >= 4096 and p.numel() % block == 0

    def zeros(p, signed):
        return cls._subclass_zeros(p, signed, block) if quantised(p) else torch.zeros_like(p)

    def flatten(moment) -> dict:
        if type(moment) is torch.Tensor:
            return {"value": moment}
        names, _ = moment.__tensor_flatten__()
        return {name: getattr(moment, name) for name in names}

    def unflatten(p, signed, tensors: dict):
        if "value" in tensors:
            return tensors["value"].clone()
        template = zeros(p, signed)  # the subclass's non-tensor attributes (signedness, shape, dtype)
        names, meta = template.__tensor_flatten__()
        return type(template).__tensor_unflatten__({n: tensors[n].clone() for n in names}, meta, None, None)

    def init(params):
        return {"count": new_count(), "params": {
            path: {name: flatten(zeros(p, signed)) for name, signed in _MOMENTS}
            for path, p in leaves_with_paths(params)}}

    def update(grads, state, params=None, step=0):
        if params is None:
            raise ValueError("torchao_adamw needs params")
        count, t = next_count(state["count"])
        lr, wd = lr_fn(step), wd_fn(step)
        g_items = leaves_with_paths(grads)
        p_flat = dict(leaves_with_paths(params))
        ref = [(path, p_flat[path]) for path, _ in g_items]
        scales = path_values(lr_scales, ref, 1.0)
        keep = path_values(decay_mask, ref, True)
        step_t = torch.tensor(float(t))  # torchao's state["step"]: a float32 CPU tensor
        out, new_params = [], {}
        for (path, g), (_, p), scale, k in zip(g_items, ref, scales, keep):
            moments = {name: unflatten(p, signed, state["params"][path][name]) for name, signed in _MOMENTS}
            new_p = p.detach().clone()
            single_param_adam(
                new_p, g, step_t, moments["exp_avg"], moments["exp_avg_sq"], None,
                torch.tensor(lr * float(scale), dtype=torch.float32), b1, b2, wd if k else 0.0, eps, True, False,
            )
            out.append(new_p - p)
            new_params[path] = {name: flatten(m) for name, m in moments.items()}
        return replace_leaves(grads, out), {"count": count, "params": new_params}

    return GradientTransformation(init, update)
