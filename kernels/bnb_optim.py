"""AdamW with 8-bit optimizer state, over bitsandbytes' blockwise kernel (CUDA only).

The kernel updates the parameter and its state in place; ``adamw_8bit`` gives it fresh copies,
so from the outside it is a pure ``GradientTransformation`` like ``pure.optim.adamw``.
"""

from __future__ import annotations

import inspect

import torch

from pure.optim import GradientTransformation, scale_by_adam
from pure.optim.base import PathFn, PyTree, as_schedule, device_of, new_count, next_count, path_values
from pure.schedules import Schedule
from pure.tree import leaves_with_paths, replace_leaves


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
    """AdamW with blockwise 8-bit moments (Dettmers et al. 2022), via ``bitsandbytes``:

    p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), m and v stored as 8-bit codes with a
    per-block absmax scale.

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
    wd_schedule = as_schedule(weight_decay)
    lr_fn = as_schedule(lr_schedule)

    def init(params):
        items = leaves_with_paths(params)
        large = [(path, p) for path, p in items if p.numel() >= min_8bit_size]
        large_paths = {path for path, _ in large}
        device = device_of(params)
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
            "count": new_count(),
            "qmap1": bnbf.create_dynamic_map(signed=True).to(device),
            "qmap2": bnbf.create_dynamic_map(signed=False).to(device),
            "q8": q8,
            "small": small.init({path: p for path, p in items if path not in large_paths}),
        }

    def update(grads, state, params=None, step=0):
        if params is None:
            raise ValueError("adamw_8bit needs params")
        count, t = next_count(state["count"])
        lr = lr_fn(step)
        wd = wd_schedule(step)
        g_items = leaves_with_paths(grads)
        p_items = dict(leaves_with_paths(params))
        ref = [(path, p_items[path]) for path, _ in g_items]
        scales = {path: s for (path, _), s in zip(ref, path_values(lr_scales, ref, 1.0))}
        keep = {path: k for (path, _), k in zip(ref, path_values(decay_mask, ref, True))}
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
