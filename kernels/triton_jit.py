"""Triton as an optional dependency: availability, and jit-compiling a kernel for a tensor's device.

Triton compiles for CUDA; on CPU the only way to run a Triton kernel is its interpreter, which
executes the kernel body with numpy, program by program. The interpreter is chosen when a
`triton.jit` decorator runs, so each kernel here is kept as a plain Python function and compiled
twice on demand: once for CUDA, once interpreted for CPU tensors (tests on tiny shapes). The
dispatchers never pick an interpreted kernel for real work; it is orders of magnitude slower.

A consequence for kernel bodies: the interpreted copy cannot call the `@triton.jit` functions of
`triton.language` that were compiled when triton was imported (`tl.sum`, `tl.zeros`, `tl.sigmoid`,
`tl.cdiv`, `tl.max`, ...), so kernels here use builtins only: `tl.reduce(x, 0,
tl.standard._sum_combine)`, `tl.full`, `1 / (1 + tl.exp(-x))`, integer arithmetic. And the
interpreter multiplies bfloat16 tiles as raw bits in `tl.dot` and truncates float32 -> bfloat16,
so kernels upcast tiles before `tl.dot` when interpreted (the LoRA matmul's UPCAST).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device | str) -> bool:
    """True where a compiled Triton kernel runs: a CUDA device with triton installed."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and triton_installed()


@functools.cache
def _compile(fn: Callable, interpret: bool):
    import triton

    if not interpret:
        return triton.jit(fn)
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "scope"):
        # triton >= 3.4 reads TRITON_INTERPRET through `knobs` when the decorator runs.
        with knobs.runtime.scope():
            knobs.runtime.interpret = True
            return triton.jit(fn)
    from triton.runtime.interpreter import InterpretedFunction  # older triton

    return InterpretedFunction(fn)


def kernel_for(fn: Callable, device: torch.device):
    """`fn` jit-compiled for `device`: compiled on CUDA, interpreted on CPU."""
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"Triton kernels run on cuda (compiled) or cpu (interpreter), not on {device.type!r}")
    return _compile(fn, device.type == "cpu")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
