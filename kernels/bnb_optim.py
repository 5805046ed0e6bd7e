"""bitsandbytes' optimizers (AdamW, Lion, RMSprop, AdEMAMix; 8-bit or 32-bit state) as pure
``GradientTransformation``s, stepping with bitsandbytes' own update kernels
(``bitsandbytes.functional.optimizer_update_8bit_blockwise`` / ``optimizer_update_32bit``).

The kernels update the parameter and its state in place; ``bnb_optimizer`` hands them fresh copies
and returns ``new_p - p`` as the update, so from the outside it is pure like ``pure.optim.adamw``.
The state is a pytree of plain tensors: per parameter ``state1`` (and ``state2``), for 8-bit state
the uint8 codes plus their per-block ``absmax1``/``absmax2``; the two quantisation maps
(``qmap1`` signed, ``qmap2`` unsigned) once at the top. A checkpoint saves and restores them bit
for bit.

As ``bnb.optim.*`` does, a tensor with fewer than ``min_8bit_size`` elements keeps 32-bit state
(and steps with the 32-bit kernel) even in an 8-bit optimizer; blocks are 256 values.

"Paged" optimizers (``PagedAdamW8bit`` ...) differ only in where CUDA puts the state (unified
memory that can spill to the host); the update is the same kernel. The config's ``paged_*`` names
therefore build the same transform as the non-paged ones: on CPU bitsandbytes itself falls back to
non-paged buffers, and on CUDA the state tensors are ordinary device tensors owned by the train
state.
"""

from __future__ import annotations

import math

import torch

from pure.optim import GradientTransformation
from pure.optim.base import PathFn, PyTree, as_schedule, device_of, new_count, next_count, path_values
from pure.schedules import Schedule
from pure.tree import leaves_with_paths, replace_leaves

BLOCKSIZE = 256  # bitsandbytes' optimizers quantise state in blocks of 256 values

# kernel name -> number of state tensors (AdEMAMix's state1 holds its two EMAs stacked: (2, *shape))
KERNELS = {"adam": 2, "lion": 1, "rmsprop": 1, "ademamix": 2}


def _functional():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("bitsandbytes optimizers need the 'bitsandbytes' package (pip install bitsandbytes)") from exc
    return bnbf


def ademamix_schedules(step: int, alpha: float, b1: float, b3: float, t_alpha: int | None,
                       t_beta3: int | None) -> tuple[float, float]:
    """AdEMAMix's (Pagliardini et al. 2024) warmups of alpha and beta3, as ``bnb.optim.AdEMAMix``:

    alpha_t = min(t alpha / T_alpha, alpha);
    beta3_t = min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3).
    """
    alpha_t = min(step * alpha / t_alpha, alpha) if t_alpha else alpha
    if not t_beta3:
        return alpha_t, b3
    ln1, ln3 = math.log(b1), math.log(b3)
    scale = step / t_beta3
    return alpha_t, min(math.exp((ln1 * ln3) / ((1 - scale) * ln3 + scale * ln1)), b3)


def bnb_optimizer(
    kernel: str,
    lr_schedule: float | Schedule,
    *,
    bits: int = 8,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.0,
    alpha: float = 0.0,
    t_alpha: int | None = None,
    t_beta3: int | None = None,
    eps: float = 1e-8,
    weight_decay: float | Schedule = 0.0,
    decay_mask: PathFn | PyTree | None = None,
    lr_scales: PathFn | PyTree | None = None,
    min_8bit_size: int = 4096,
) -> GradientTransformation:
    """A bitsandbytes optimizer, ``kernel`` one of ``KERNELS``, with ``bits`` (8 or 32) of state.

    The math is bitsandbytes' (``bnb.optim.AdamW``/``Lion``/``RMSprop``/``AdEMAMix`` with
    ``optim_bits=bits``); per kernel, with the state dequantised to fp32 and requantised after:

    adam:     m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
              p <- p (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps)
    lion:     p <- p (1 - lr wd) - lr sign(b1 m + (1-b1) g); m <- b2 m + (1-b2) g
    rmsprop:  g <- g + wd p; v <- b1 v + (1-b1) g^2; p <- p - lr g / (sqrt(v) + eps)   (b1 is alpha)
    ademamix: m1 <- b1 m1 + (1-b1) g; m2 <- b3 m2 + (1-b3) g; v as adam;
              p <- p (1 - lr wd) - lr (m1 / (1-b1^t) + alpha m2) / (sqrt(v) / sqrt(1-b2^t) + eps),
              alpha and b3 warmed up over ``t_alpha`` / ``t_beta3`` steps when given.

    Emits final updates (lr and decay included); ``lr_scales`` and ``decay_mask`` give each
    parameter its own lr multiplier and whether it decays.
    """
    if kernel not in KERNELS:
        raise ValueError(f"bnb_optimizer: unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    if bits not in (8, 32):
        raise ValueError(f"bnb_optimizer: bits must be 8 or 32, got {bits}")
    bnbf = _functional()
    two_states = KERNELS[kernel] == 2
    lr_fn, wd_fn = as_schedule(lr_schedule), as_schedule(weight_decay)

    def quantised(p) -> bool:
        return bits == 8 and p.numel() >= min_8bit_size

    def init(params):
        per_param = {}
        for path, p in leaves_with_paths(params):
            dtype = torch.uint8 if quantised(p) else torch.float32
            shape1 = (2, *p.shape) if kernel == "ademamix" else p.shape
            s = {"state1": torch.zeros(shape1, dtype=dtype, device=p.device)}
            if two_states:
                s["state2"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            if quantised(p):
                blocks = (p.numel() + BLOCKSIZE - 1) // BLOCKSIZE
                s["absmax1"] = torch.zeros((2, blocks) if kernel == "ademamix" else (blocks,),
                                           dtype=torch.float32, device=p.device)
                if two_states:
                    s["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            per_param[path] = s
        state = {"count": new_count(), "params": per_param}
        if bits == 8:
            device = device_of(params)
            state["qmap1"] = bnbf.create_dynamic_map(signed=True).to(device)
            state["qmap2"] = bnbf.create_dynamic_map(signed=False).to(device)
        return state

    def update(grads, state, params=None, step=0):
        if params is None:
            raise ValueError(f"bnb_optimizer({kernel!r}) needs params")
        count, t = next_count(state["count"])
        lr, wd = lr_fn(step), wd_fn(step)
        alpha_t, b3_t = ademamix_schedules(t, alpha, b1, b3, t_alpha, t_beta3) if kernel == "ademamix" else (alpha, b3)
        g_items = leaves_with_paths(grads)
        p_flat = dict(leaves_with_paths(params))
        ref = [(path, p_flat[path]) for path, _ in g_items]
        scales = path_values(lr_scales, ref, 1.0)
        keep = path_values(decay_mask, ref, True)
        out, new_params = [], {}
        for (path, g), (_, p), scale, k in zip(g_items, ref, scales, keep):
            s = {name: v.clone() for name, v in state["params"][path].items()}
            new_p = p.detach().clone().contiguous()
            lr_p, wd_p = lr * float(scale), (wd if k else 0.0)
            if s["state1"].dtype == torch.uint8:
                bnbf.optimizer_update_8bit_blockwise(
                    kernel, g.contiguous(), new_p, s["state1"], s.get("state2"), b1, b2, b3_t, alpha_t, eps, t,
                    lr_p, state["qmap1"], state["qmap2"] if two_states else None, s["absmax1"], s.get("absmax2"),
                    weight_decay=wd_p, gnorm_scale=1.0, skip_zeros=False,
                )
            else:
                bnbf.optimizer_update_32bit(
                    kernel, g.contiguous(), new_p, s["state1"], b1, eps, t, lr_p, state2=s.get("state2"),
                    beta2=b2, beta3=b3_t, alpha=alpha_t, weight_decay=wd_p, gnorm_scale=1.0,
                )
            out.append(new_p - p)
            new_params[path] = s
        new_state = {**state, "count": count, "params": new_params}
        return replace_leaves(grads, out), new_state

    return GradientTransformation(init, update)


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
) -> GradientTransformation:
    """AdamW with blockwise 8-bit moments (Dettmers et al. 2022), step for step
    ``bnb.optim.AdamW8bit``: ``bnb_optimizer("adam", bits=8)``."""
    return bnb_optimizer("adam", lr_schedule, bits=8, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                         decay_mask=decay_mask, lr_scales=lr_scales, min_8bit_size=min_8bit_size)
