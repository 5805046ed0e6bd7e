"""SwiGLU activation (Shazeer 2020, "GLU Variants Improve Transformer"): Triton for CUDA, torch for CPU.

    h = silu(g) * u,   silu(g) = g * sigmoid(g)

Reference: `swiglu_reference(gate, up) = F.silu(gate) * up`, what `pure.models.llama` computes
between gate_proj/up_proj and down_proj. Backward with s = sigmoid(g) and upstream d = dL/dh:

    dL/du = d * g * s
    dL/dg = d * u * s * (1 + g * (1 - s))

The Triton kernels are elementwise over the flattened tensors, one block per program: the forward
reads g and u once and writes h; the backward reads d, g, u once and writes both gradients
(autograd of the reference runs two elementwise kernels forward and three back). Arithmetic in
float32, each result rounded once to the input dtype.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kernels.triton_jit import kernel_for

try:  # the kernel bodies below resolve `tl` only when they are compiled
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    tl = None

from pure.models.llama import swiglu  # noqa: E402

SwiGLUFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


swiglu_reference = swiglu  # pure.models.llama's: the reference every SwiGLU here is tested against


# --------------------------------------------------------------------------- torch formulations


def swiglu_sigmoid(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = gate * sigmoid(gate) * up, written out (autograd through three ops)."""
    return gate * torch.sigmoid(gate) * up


class _SwiGLUFunction(torch.autograd.Function):
    """SwiGLU with the closed-form backward: saves g and u only (autograd of the reference also
    keeps silu(g), a third [tokens, intermediate] tensor per layer: 12.6 MB per layer for SmolLM2
    at 2048 tokens, 377 MB over its 30 layers). The backward recomputes silu(g) and uses aten's
    fused `silu_backward` for dL/dg = (d u) s (1 + g (1 - s)): four elementwise passes against the
    reference's three."""

    @staticmethod
    def forward(gate, up):
        return F.silu(gate) * up

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    @torch.no_grad()  # first-order only
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        d_gate = d_up = None
        if ctx.needs_input_grad[0]:
            d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            d_up = grad * F.silu(gate)
        return d_gate, d_up


def swiglu_function(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU through a torch `autograd.Function` with the closed-form backward."""
    return _SwiGLUFunction.apply(gate, up)


# --------------------------------------------------------------------------- Triton

_BLOCK = 1024


def _swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # One rounding, of the product (the reference also rounds silu(g) to the input dtype first).
    tl.store(h_ptr + offsets, (g / (1.0 + tl.exp(-g)) * u).to(h_ptr.dtype.element_ty), mask=mask)


def _swiglu_backward_kernel(d_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    d = tl.load(d_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(du_ptr + offsets, (d * g * s).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offsets, (d * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (max(1, -(-n // _BLOCK)),)


# The launches are torch custom ops: under `torch.func.grad` an autograd.Function's backward sees
# functorch-wrapped tensors, which have no storage for Triton to read; an op call unwraps them.


@torch.library.custom_op("puretune::swiglu_forward", mutates_args=(), schema="(Tensor gate, Tensor up) -> Tensor")
def _swiglu_forward_op(gate, up):
    g, u = gate.contiguous(), up.contiguous()
    h = torch.empty_like(g)
    if g.numel():
        kernel_for(_swiglu_forward_kernel, g.device)[_grid(g.numel())](g, u, h, g.numel(), BLOCK=_BLOCK)
    return h


@_swiglu_forward_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("puretune::swiglu_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)")
def _swiglu_backward_op(grad, gate, up):
    g, u, d = gate.contiguous(), up.contiguous(), grad.contiguous()
    d_gate, d_up = torch.empty_like(g), torch.empty_like(u)
    if g.numel():
        kernel_for(_swiglu_backward_kernel, g.device)[_grid(g.numel())](d, g, u, d_gate, d_up, g.numel(), BLOCK=_BLOCK)
    return d_gate, d_up


@_swiglu_backward_op.register_fake
def _(grad, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


class _TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(gate, up):
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                             "must have the same shape and dtype")
        return _swiglu_forward_op(gate, up)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        with torch.no_grad():  # first-order: the backward itself is not differentiated
            d_gate, d_up = _swiglu_backward_op(grad, gate, up)
        return (d_gate if ctx.needs_input_grad[0] else None), (d_up if ctx.needs_input_grad[1] else None)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU by the Triton kernels (compiled on CUDA, interpreted on CPU), differentiable under
    `torch.autograd` and `torch.func.grad`."""
    return _TritonSwiGLU.apply(gate, up)


# --------------------------------------------------------------------------- dispatch

CPU_FORMULATIONS: dict[str, SwiGLUFn] = {
    "reference": swiglu_reference,
    "sigmoid": swiglu_sigmoid,
    "function": swiglu_function,
}

# Chosen at SmolLM2-135M shape (gate, up [2048, 1536]) by speed and saved memory: the Function is
# about 1 ms per layer slower than autograd over the reference (about 0.3% of a SmolLM2 LoRA step)
# and keeps a third fewer activations (see `_SwiGLUFunction`); the numbers of
# `kernels.measure.measure_formulations(CPU_FORMULATIONS, timing_inputs(dtype))`:
CPU_CHOICE = {torch.float32: "function", torch.bfloat16: "function"}
CPU_MEASUREMENT = """
Median ms of forward + backward, 10 repeats, quiet 2-core CPU (2026-11-28), three trials:
float32:  reference 7.8 / 7.3 / 7.0    sigmoid 17.1 / 12.1 / 11.2   function 11.4 / 8.5 / 8.0
bfloat16: reference 4.9 / 4.5          sigmoid 6.5 / 5.5            function 6.4 / 5.9
"""


def select_swiglu(device: torch.device | str, dtype: torch.dtype) -> SwiGLUFn:
    """The fastest SwiGLU for `device` and `dtype`, with the reference's signature `(gate, up)`.

    CUDA with triton installed: the Triton kernels. Otherwise the torch formulation chosen on CPU
    for that dtype (`CPU_CHOICE`), the reference where nothing was chosen.
    """
    from kernels.measure import select_elementwise

    return select_elementwise(device, dtype, swiglu_triton, CPU_FORMULATIONS, CPU_CHOICE, swiglu_reference)


def timing_inputs(dtype=torch.float32, tokens: int = 2048, width: int = 1536, device="cpu"):
    """gate and up [tokens, width], both differentiated, for `kernels.measure.measure_formulations`;
    the defaults are the SmolLM2-135M shape `CPU_CHOICE` was measured at."""
    from kernels.measure import TimingInputs

    generator = torch.Generator().manual_seed(0)
    gate = torch.randn(tokens, width, generator=generator).to(device, dtype).requires_grad_()
    up = torch.randn(tokens, width, generator=generator).to(device, dtype).requires_grad_()
    return TimingInputs((gate, up), (0, 1), lambda fn: fn)
