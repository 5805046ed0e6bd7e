"""Numeric precision of a run: axolotl's `bf16`, `fp16`, `tf32`, `bfloat16`, `float16`, `float32`
keys resolved, once, to a `PrecisionPlan` for a device.

    plan = resolve_precision(bf16=config.bf16, fp16=config.fp16, tf32=config.tf32,
                             bfloat16=config.bfloat16, float16=config.float16,
                             float32=config.float32, device=device)
    params = cast_params(params, plan)                 # storage dtype (fp32 master weights for AMP)
    with autocast_context(plan, device):               # compute dtype of the matmuls
        state, metrics = train_step(state, batch)

Semantics (axolotl's config reference and mixed-precision page):

| keys | params stored in | matmuls run in | eval params |
|---|---|---|---|
| nothing / `float32: true` / `bf16: auto` where bf16 is not picked | fp32 | fp32 | fp32 |
| `bf16: true` (AMP) | fp32 (master weights) | bf16 (autocast) | fp32 |
| `bf16: full` (HF `bf16_full_eval`) | fp32 | bf16 | bf16 |
| `bfloat16: true` (no AMP) | bf16 | bf16 | bf16 |
| `float16: true` (no AMP) | fp16 | fp16 | fp16 |
| `fp16: true` (AMP) | fp32 (master weights) | fp16 (autocast), dynamic loss scaling | fp32 |

`bf16: auto` picks bf16 AMP only on CUDA devices with bf16 support (axolotl's
`is_torch_bf16_gpu_available`), fp32 everywhere else: the choice depends on the device, never on
a timing, so the same config on the same machine always trains the same numbers. Measured on this
project's CPU (Xeon with avx512_bf16, no AMX; 1 thread, 512x576 @ 576x1536): F.linear fp32
17.5 GFLOP/s, bf16 45.9, bf16 autocast from fp32 inputs 42.3, fp16 0.4. So `bf16: true` is
worth trying on such CPUs, while fp16 on CPU is not.

`fp16: true` (fp16 autocast) trains with dynamic loss scaling (`pure.train.LossScaling`: the
loss is scaled before `grad_and_value`, the gradient unscaled after, and a step whose gradient is
not finite is skipped while the scale backs off); the plan says so with `loss_scaling`, and the
loop puts the scaler's state into `TrainState`. It runs on CPU too (the tests use it there) but
slowly: CPU fp16 matmuls are emulated (0.4 GFLOP/s above). `float16: true` is refused on CPU
(the same slowness, and no fp32 master copy to fall back on). `tf32` only matters on CUDA (Ampere
or newer): `auto` turns it on there, and `autocast_context` sets it for the duration of the block.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from pure.tree import cast


class PrecisionError(ValueError):
    """A precision setting this device (or puretune) cannot run; names the key."""


@dataclass(frozen=True)
class PrecisionPlan:
    """param_dtype: the dtype params (and the optimizer's master copy) are stored in.
    autocast_dtype: the dtype autocast runs matmuls in, or None for no autocast.
    eval_param_dtype: params are cast to this for evaluation (`bf16: full`).
    tf32: allow TF32 matmuls on CUDA. reason: one line saying how the keys resolved.
    loss_scaling: the train step needs dynamic loss scaling (fp16 autocast)."""

    param_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None
    eval_param_dtype: torch.dtype = torch.float32
    tf32: bool = False
    reason: str = "fp32"
    loss_scaling: bool = False

    @property
    def is_fp32(self) -> bool:
        return self.param_dtype == torch.float32 and self.autocast_dtype is None and not self.tf32


def _device(device: str | torch.device) -> torch.device:
    return torch.device(device) if not isinstance(device, torch.device) else device


def cuda_supports_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cuda_supports_tf32(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(*, bf16: Any = "auto", fp16: Any = None, tf32: Any = "auto", bfloat16: Any = None,
                      float16: Any = None, float32: Any = None,
                      device: str | torch.device = "cpu") -> PrecisionPlan:
    """The plan for these config values on `device`; `PrecisionError` names the offending key."""
    dev = _device(device)
    if bf16 not in (None, True, False, "auto", "full"):
        raise PrecisionError(f"bf16: expected true, false, 'auto' or 'full', got {bf16!r}")
    if tf32 not in (None, True, False, "auto"):
        raise PrecisionError(f"tf32: expected true, false or 'auto', got {tf32!r}")
    explicit_bf16 = bf16 in (True, "full")
    if fp16 and explicit_bf16:
        raise PrecisionError("bf16 and fp16 cannot both be set; choose one")
    if bfloat16 and float16:
        raise PrecisionError("bfloat16 and float16 cannot both be true; choose one")
    if float32 and (explicit_bf16 or fp16 or bfloat16 or float16):
        raise PrecisionError("float32: true cannot be combined with bf16/fp16/bfloat16/float16")
    if float16 and dev.type == "cpu":
        raise PrecisionError("float16: true is refused on CPU: torch has no fast fp16 matmul there "
                             "(measured 0.4 GFLOP/s against 17.5 in fp32); use bf16: true or float32")
    if bf16 is True and dev.type == "cuda" and not cuda_supports_bf16(dev):
        raise PrecisionError(f"bf16: true but {dev} has no bf16 support (needs Ampere or newer); use float32")

    use_tf32 = bool(tf32 is True or (tf32 == "auto" and cuda_supports_tf32(dev))) and dev.type == "cuda"
    if bfloat16 or float16:
        low = torch.bfloat16 if bfloat16 else torch.float16
        name = "bfloat16" if bfloat16 else "float16"
        autocast = low if explicit_bf16 and low == torch.bfloat16 else None
        return PrecisionPlan(param_dtype=low, autocast_dtype=autocast, eval_param_dtype=low, tf32=use_tf32,
                             reason=f"{name}: true: params in {name}, no fp32 master copy")
    if fp16:
        slow = " (slow on CPU: fp16 matmuls are emulated there)" if dev.type == "cpu" else ""
        return PrecisionPlan(autocast_dtype=torch.float16, tf32=use_tf32, loss_scaling=True,
                             reason=f"fp16: true: fp32 master weights, fp16 autocast, dynamic loss scaling{slow}")
    if explicit_bf16:
        full = bf16 == "full"
        return PrecisionPlan(autocast_dtype=torch.bfloat16, tf32=use_tf32,
                             eval_param_dtype=torch.bfloat16 if full else torch.float32,
                             reason=f"bf16: {'full' if full else 'true'}: fp32 master weights, bf16 autocast"
                                    + (", bf16 eval" if full else ""))
    if bf16 == "auto" and not float32 and cuda_supports_bf16(dev):
        return PrecisionPlan(autocast_dtype=torch.bfloat16, tf32=use_tf32,
                             reason=f"bf16: auto: {dev} supports bf16, so fp32 master weights, bf16 autocast")
    why = "bf16: auto: fp32 on a device without CUDA bf16" if bf16 == "auto" and not float32 else "fp32"
    return PrecisionPlan(tf32=use_tf32, reason=why + (", tf32 matmuls" if use_tf32 else ""))


def cast_params(params, plan: PrecisionPlan, *, for_eval: bool = False):
    """`params` (any pytree) with floating leaves in the plan's storage dtype (`eval_param_dtype`
    when `for_eval`); integer and bool leaves untouched, nothing copied when already right."""
    dtype = plan.eval_param_dtype if for_eval else plan.param_dtype
    return cast(params, dtype)


@contextlib.contextmanager
def autocast_context(plan: PrecisionPlan, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run the block with the plan's autocast dtype (none for fp32 and pure low-precision plans)
    and, on CUDA, with TF32 matmuls allowed as the plan says; both are restored on exit."""
    dev = _device(device)
    with contextlib.ExitStack() as stack:
        if dev.type == "cuda":
            stack.enter_context(_tf32(plan.tf32))
        if plan.autocast_dtype is not None:
            stack.enter_context(torch.autocast(device_type=dev.type, dtype=plan.autocast_dtype))
        yield


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
