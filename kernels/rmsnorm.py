"""RMSNorm (Zhang & Sennrich 2019): a Triton kernel for CUDA, torch formulations for CPU, a dispatcher.

    y = w * n,   n = x * r,   r = 1 / sqrt(mean(x^2) + eps)        (statistics in float32)

Reference: `pure.models.llama.rms_norm(x, weight, eps)`, which rounds n to x's dtype before the
multiplication by w, as transformers does; every version here keeps that rounding.

Backward (g = dL/dy, D the row width):

    dL/dw = sum_rows g * n
    dL/dx = r * (g w - n * mean(g w * n))

Triton: one program per row forward (saving r, one float per row); the backward runs a fixed
number of programs, each over a contiguous block of rows, writing dx per row and accumulating its
partial dL/dw in float32 registers; torch sums the [programs, D] partials (a tiny reduction).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kernels.triton_jit import kernel_for, next_power_of_2
from pure.models.llama import rms_norm

try:  # the kernel bodies below resolve `tl` only when they are compiled
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    tl = None

RMSNormFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


# --------------------------------------------------------------------------- torch formulations


def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`torch.nn.functional.rms_norm` on x, then the reference's rounding and weight product."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * normed.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with the backward written out: saves x and r (one float per row) instead of the
    float32 copies autograd keeps for the reference's chain of ops."""

    @staticmethod
    def forward(x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * (x32 * rstd).to(x.dtype), rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, output[1])

    @staticmethod
    def backward(ctx, grad, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad32 = grad.float()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gw = grad32 * weight.float()
            dx = (rstd * (gw - normed * (gw * normed).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (grad32 * normed.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm_function(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm through a torch `autograd.Function` with the closed-form backward."""
    return _RMSNormFunction.apply(x, weight, eps)[0]


class _RMSNormFromOutput(_RMSNormFunction):
    """RMSNorm whose backward reads its output y = w n instead of its input x: n = y / w. In a
    transformer y is the next linear layers' input, which they keep for their own backward, so
    nothing new is kept alive, while the input (the residual stream after each block) is freed:
    one [tokens, hidden] tensor per norm, two per layer (283 MB for SmolLM2 at 2048 tokens).
    Needs a weight without zeros (checked: otherwise the input-saving Function runs); n comes
    back within one rounding of the forward's (fp32: 1e-7 relative). The forward is inherited."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, weight, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[0], weight, output[1])

    @staticmethod
    @torch.no_grad()  # first-order only
    def backward(ctx, grad, _grad_rstd):
        y, weight, rstd = ctx.saved_tensors
        w32, y32, grad32 = weight.float(), y.float(), grad.float()
        normed = y32 * (1.0 / w32)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # mean(g w n) = mean(g y); dx = r (g w - n mean(g y)), the last two passes in place
            mean_gy = torch.linalg.vecdot(grad32, y32).unsqueeze(-1) / y.shape[-1]
            dx = (grad32 * w32).addcmul_(normed, mean_gy, value=-1.0).mul_(rstd).to(y.dtype)
        if ctx.needs_input_grad[1]:
            dw = (grad32 * normed).reshape(-1, y.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm_from_output(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm whose backward keeps the output, not the input (`_RMSNormFromOutput`)."""
    if bool((weight == 0).any()):
        return _RMSNormFunction.apply(x, weight, eps)[0]
    return _RMSNormFromOutput.apply(x, weight, eps)[0]


# --------------------------------------------------------------------------- Triton


def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, n_cols, eps,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 0, tl.standard._sum_combine) / n_cols + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference's rounding
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                              stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
                              BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.full((BLOCK,), 0.0, tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # Row pointers advance by their strides, in 64 bits, so no row * stride product overflows.
    x_row, dy_row, dx_row = x_ptr + row_start * stride_x, dy_ptr + row_start * stride_dy, dx_ptr + row_start * stride_dx
    for row in range(row_start, row_end):
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        normed = x * rstd
        dw += dy * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        gw = dy * w
        dx = rstd * (gw - normed * (tl.reduce(gw * normed, 0, tl.standard._sum_combine) / n_cols))
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        x_row += stride_x
        dy_row += stride_dy
        dx_row += stride_dx
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def _backward_programs(device: torch.device, n_rows: int) -> int:
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))  # the interpreter runs programs one by one: few, for tests


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


# The launches are torch custom ops: under `torch.func.grad` an autograd.Function's backward sees
# functorch-wrapped tensors, which have no storage for Triton to read; an op call unwraps them.


@torch.library.custom_op("puretune::rms_norm_forward", mutates_args=(),
                         schema="(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)")
def _rms_norm_forward_op(x, weight, eps):
    """(y [..., D] in promote(x, w) dtype, r [rows] float32) by the Triton forward kernel."""
    width = x.shape[-1]
    rows = x.reshape(-1, width).contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        block = next_power_of_2(width)
        kernel_for(_rms_norm_forward_kernel, x.device)[(rows.shape[0],)](
            rows, weight.contiguous(), out, rstd, rows.stride(0), out.stride(0), width, eps,
            BLOCK=block, num_warps=_num_warps(block))
    return out.view(*x.shape[:-1], width), rstd


@_rms_norm_forward_op.register_fake
def _(x, weight, eps):
    rows = x.numel() // x.shape[-1]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("puretune::rms_norm_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)")
def _rms_norm_backward_op(grad, x, weight, rstd):
    """(dL/dx in x's dtype, dL/dw in float32) by the Triton backward kernel."""
    width = x.shape[-1]
    rows = x.reshape(-1, width).contiguous()
    dy = grad.reshape(-1, width).contiguous()
    n_rows = rows.shape[0]
    dx = torch.empty_like(rows)
    programs = _backward_programs(x.device, n_rows)
    partial = torch.zeros(programs, width, dtype=torch.float32, device=x.device)
    if n_rows:
        block = next_power_of_2(width)
        kernel_for(_rms_norm_backward_kernel, x.device)[(programs,)](
            dy, rows, weight.contiguous(), rstd, dx, partial, dy.stride(0), rows.stride(0), dx.stride(0),
            n_rows, width, -(-n_rows // programs), BLOCK=block, num_warps=_num_warps(block))
    return dx.view(x.shape), partial.sum(0)


@_rms_norm_backward_op.register_fake
def _(grad, x, weight, rstd):
    return x.new_empty(x.shape), x.new_empty(x.shape[-1], dtype=torch.float32)


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, eps):
        if weight.shape != (x.shape[-1],):
            raise ValueError(
                f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) for x {tuple(x.shape)}")
        return _rms_norm_forward_op(x, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, output[1])

    @staticmethod
    def backward(ctx, grad, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        with torch.no_grad():  # first-order only: the backward itself is not differentiated
            dx, dw = _rms_norm_backward_op(grad, x, weight, rstd)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return (dx if ctx.needs_input_grad[0] else None), dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm by the Triton kernels (compiled on CUDA, interpreted on CPU), differentiable
    under `torch.autograd` and `torch.func.grad`."""
    return _TritonRMSNorm.apply(x, weight, eps)[0]


# --------------------------------------------------------------------------- dispatch

CPU_FORMULATIONS: dict[str, RMSNormFn] = {
    "reference": rms_norm,
    "native": rms_norm_native,
    "function": rms_norm_function,
    "from_output": rms_norm_from_output,
}

# Chosen at SmolLM2-135M shape (x [2048, 576]): in fp32 the output-saving Function, as fast as the
# others (below) and keeping two fewer [tokens, hidden] tensors per layer (peak RSS of a SmolLM2 LoRA
# step at 2048 tokens 5.1 -> 4.3-4.5 GB); in bf16 y / w would add bf16 rounding to n, so the native op.
CPU_CHOICE = {torch.float32: "from_output", torch.bfloat16: "native"}
CPU_MEASUREMENT = """
`measure_formulations(CPU_FORMULATIONS, timing_inputs(dtype))` (`kernels.measure`):
Median ms of forward + backward, 10 repeats, quiet 2-core CPU (2026-11-28), three trials:
float32:  reference 7.4 / 6.9 / 7.5   native 5.9 / 5.9 / 6.6   function 9.7 / 10.5 / 8.0
          from_output 6.7 / 7.3 / 5.0
bfloat16 (earlier, noisy): reference 9.0 / 9.0   native 5.1 / 5.6   function 11.6 / 13.3
"""


def select_rms_norm(device: torch.device | str, dtype: torch.dtype) -> RMSNormFn:
    """The fastest RMSNorm for `device` and `dtype`, with the reference's signature `(x, weight, eps)`.

    CUDA with triton installed: the Triton kernels. Otherwise the torch formulation chosen on CPU
    for that dtype (`CPU_CHOICE`), the reference where nothing was chosen.
    """
    from kernels.measure import select_elementwise

    return select_elementwise(device, dtype, rms_norm_triton, CPU_FORMULATIONS, CPU_CHOICE, rms_norm)


def timing_inputs(dtype=torch.float32, rows: int = 2048, width: int = 576, device="cpu"):
    """x [rows, width] and the weight, both differentiated, for `kernels.measure.measure_formulations`;
    the defaults are the SmolLM2-135M shape `CPU_CHOICE` was measured at."""
    from kernels.measure import TimingInputs

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator).to(device, dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(width, generator=generator)).to(device, dtype).requires_grad_()
    return TimingInputs((x, weight), (0, 1), lambda fn: lambda x, w: fn(x, w, 1e-5))
