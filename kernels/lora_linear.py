"""The LoRA linear (Hu et al. 2021) in one pass and one backward: Triton on CUDA, torch on CPU.

    y = x W^T + b + s (drop(x) A^T) B^T,     x [M, in], W [out, in], A [r, in], B [out, r]

Reference: `pure.lora.lora_linear(x, weight, bias, entry, config, key=None)`. Autograd of the
reference runs five GEMMs forward+backward plus the elementwise passes `* s` and `base + low_rank`
over [M, out] and the `dx_base + dx_low` sum over [M, in]. Here both directions are one fused
matmul with a low-rank side path,

    out = X Wk + s (X P) C        (X P accumulated in the same loop over X's K tiles, and kept)

forward:  X = x,  Wk = W^T, P = A^T, C = B^T  -> y, and xa = x A^T is saved for the backward;
backward: X = dy, Wk = W,   P = B,   C = A    -> dx, and g = dy B is kept;
then dA = s g^T x and dB = s dy^T xa are two thin GEMMs ([r, M] x [M, in], [out, M] x [M, r]) left
to torch (cuBLAS / the CPU BLAS; not fused, not compared with a Triton version). Every column block
of the fused kernel recomputes X P for its rows (r / BLOCK_N more tensor-core work, 12.5% at r = 16,
BLOCK_N = 128) instead of making a second pass over X; the programs of the first column block store it.
On CPU the same autograd.Function runs on BLAS GEMMs (`addmm` folds the low-rank term in).

With LoRA dropout the low-rank path reads drop(x), not x: xa = drop(x) A^T is a separate small GEMM,
the fused kernel adds s xa B^T, and the backward returns dL/d drop(x) = s g A to autograd (which
applies the mask). DoRA, or a weight whose dtype differs from x, falls back to the reference. A
quantised base (`kernels.quantized`) takes the same Function, its weight dequantised by
bitsandbytes in the forward and again in the backward (never kept dense).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.triton_jit import kernel_for, next_power_of_2, triton_usable
from kernels.quantized import QuantizedWeight, dequantize, quantized_lora_linear
from pure import rng
from pure.lora import LoraConfig, lora_dropout, lora_keep_mask, lora_linear

try:  # the kernel bodies below resolve `tl` only when they are compiled
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

LoraLinearFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------- the fused matmul


def _matmul_lowrank_torch(x, w, scale, c=None, p=None, z=None, bias=None):
    """(x w + s z c + bias, z) with z = x p when p is given; BLAS GEMMs, the low-rank term added in
    place by `addmm_` (beta = 1), so no separate elementwise pass."""
    if p is not None:
        z = x @ p
    out = torch.addmm(bias, x, w) if bias is not None else x @ w
    if c is not None:
        out.addmm_(z, c, alpha=scale)
    return out, z


def _matmul_lowrank_kernel(
    x_ptr, w_ptr, p_ptr, c_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, R, scale,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_pk, stride_pr,
    stride_cr, stride_cn, stride_zm, stride_zr, stride_om, stride_on,
    LOW_RANK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = x w (+ s z c) (+ bias). LOW_RANK: 0 none; 1 z = x p, accumulated in the loop over x's
    K tiles and stored by the programs of the first column block; 2 z read from z_ptr.
    UPCAST feeds float32 tiles to tl.dot (the interpreter's dot multiplies bf16 bit patterns)."""
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    # Grouped order: GROUP_M row blocks sweep the column blocks together, so their w tiles stay in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok, n_ok, r_ok = rm < M, rn < N, rr < R
    x_tile = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    w_tile = w_ptr + rk[:, None] * stride_wk + rn[None, :].to(tl.int64) * stride_wn
    p_tile = p_ptr + rk[:, None] * stride_pk + rr[None, :] * stride_pr

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    z_acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + rk) < K
        xs = tl.load(x_tile, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        ws = tl.load(w_tile, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            xs, ws = xs.to(tl.float32), ws.to(tl.float32)
        acc = tl.dot(xs, ws, acc, input_precision=PRECISION)
        if LOW_RANK == 1:
            ps = tl.load(p_tile, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                ps = ps.to(tl.float32)
            z_acc = tl.dot(xs, ps, z_acc, input_precision=PRECISION)
            p_tile += BLOCK_K * stride_pk
        x_tile += BLOCK_K * stride_xk
        w_tile += BLOCK_K * stride_wk

    if LOW_RANK != 0:
        z_tile = z_ptr + rm[:, None].to(tl.int64) * stride_zm + rr[None, :] * stride_zr
        z_mask = m_ok[:, None] & r_ok[None, :]
        if LOW_RANK == 1:
            z = z_acc.to(z_ptr.dtype.element_ty)  # rounded to the input dtype, as x A^T is in the reference
            rows_to_store = tl.where(pid_n == 0, M, 0)  # only the first column block writes z
            tl.store(z_tile, z, mask=(rm[:, None] < rows_to_store) & r_ok[None, :])
        else:
            z = tl.load(z_tile, mask=z_mask, other=0.0)
        cs = tl.load(c_ptr + rr[:, None] * stride_cr + rn[None, :] * stride_cn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            z, cs = z.to(tl.float32), cs.to(tl.float32)
        acc += scale * tl.dot(z, cs, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_tile = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Tile shapes tried on CUDA for bf16/fp16, the autotuner keeps the fastest per (N, K, r, variant):
# common tensor-core tiles for transformer projections (not tuned on a GPU yet; see programs.bench.gpu).
_CUDA_CONFIGS = (
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
)
_CUDA_FP32_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
# The interpreter: the smallest tiles tl.dot takes, so tiny test shapes still span several tiles.
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
_GROUP_M = 8

@functools.cache
def _cuda_kernel():
    """The kernel compiled for CUDA behind `triton.autotune` (built once, on first use). The tile is
    tuned per projection shape (N, K, r, variant), not per token count M: unpacked batches change M
    every step, and retuning each time would cost more than a tile chosen at another M loses."""
    configs = [triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")},
                             num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in _CUDA_CONFIGS]
    return triton.autotune(configs, key=["N", "K", "R", "LOW_RANK", "HAS_BIAS"])(
        kernel_for(_matmul_lowrank_kernel, torch.device("cuda")))


# The launch is a torch custom op: under `torch.func.grad` an autograd.Function's backward sees
# functorch-wrapped tensors, which have no storage for Triton to read; an op call unwraps them.


@torch.library.custom_op("puretune::matmul_lowrank", mutates_args=(),
                         schema="(Tensor x, Tensor w, float scale, Tensor? c, Tensor? p, Tensor? z, Tensor? bias)"
                                " -> (Tensor, Tensor)")
def _matmul_lowrank_op(x, w, scale, c, p, z, bias):
    """(out, z) with out = x w + s z c + bias by the Triton kernel; z = x p is computed and returned
    when p is given (else an empty tensor is returned: an op's output may not alias its input)."""
    M, K = x.shape
    N = w.shape[1]
    mode = 0 if c is None else (1 if p is not None else 2)
    R = c.shape[0] if c is not None else 1
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    z_out = torch.empty(M if mode == 1 else 0, R, dtype=x.dtype, device=x.device)
    if mode == 1:
        z = z_out
    if M == 0 or N == 0:
        return out, z_out
    dummy = out  # pointer for the arguments a variant never reads
    pk, pr = (p.stride(0), p.stride(1)) if p is not None else (0, 0)
    cr, cn = (c.stride(0), c.stride(1)) if c is not None else (0, 0)
    zm, zr = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    args = (x, w, p if p is not None else dummy, c if c is not None else dummy, z if z is not None else dummy,
            bias if bias is not None else dummy, out, M, N, K, R, float(scale),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), pk, pr, cr, cn, zm, zr, out.stride(0), out.stride(1))
    meta = dict(LOW_RANK=mode, HAS_BIAS=bias is not None, BLOCK_R=max(16, next_power_of_2(R)), GROUP_M=_GROUP_M)
    if x.device.type == "cuda" and x.dtype != torch.float32:
        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

        _cuda_kernel()[grid](*args, UPCAST=False, PRECISION="ieee", **meta)
    elif x.device.type == "cuda":
        # float32 in, float32 accuracy: IEEE products unless the user opted into TF32 for matmuls.
        # One fixed tile shape: float32 is for checks and small runs, not worth autotuning compiles.
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        cfg = _CUDA_FP32_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        kernel_for(_matmul_lowrank_kernel, x.device)[grid](*args, UPCAST=False, PRECISION=precision, **cfg, **meta)
    else:
        cfg = _INTERPRETER_CONFIG
        grid = (-(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"]),)
        kernel_for(_matmul_lowrank_kernel, x.device)[grid](*args, UPCAST=True, PRECISION="ieee", **cfg, **meta)
    return out, z_out


@_matmul_lowrank_op.register_fake
def _(x, w, scale, c, p, z, bias):
    R = c.shape[0] if c is not None else 1
    return x.new_empty(x.shape[0], w.shape[1]), x.new_empty(x.shape[0] if p is not None else 0, R)


def _matmul_lowrank_triton(x, w, scale, c=None, p=None, z=None, bias=None):
    """The Triton version of `_matmul_lowrank_torch`: x [M, K], w [K, N] (any strides), p [K, R],
    c [R, N], z [M, R]; returns (out [M, N] in x's dtype, z)."""
    out, z_new = _matmul_lowrank_op(x, w, float(scale), c, p, z, bias)
    return out, (z_new if p is not None else z)


# --------------------------------------------------------------------------- autograd


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (drop(x) A^T) B^T with the closed-form backward; `use_triton` picks the
    fused Triton matmul or the BLAS one (`addmm` with the low-rank term folded in).

    Dropout comes in as the bool keep mask and the keep probability q: drop(x) = (x * keep) / q, with
    1/q folded into the [r, in]-sized A (and s/q into the [M, r]-sized dy B in the backward), so no
    [M, in] pass scales anything. The backward adds s ((dy B) A) * keep into dx in one pass (addcmul)
    and recomputes x * keep for dA instead of keeping drop(x): per dropout the saved activation is
    the 1-byte mask, not the 4-byte dropped input plus a 4-byte multiplier as autograd over
    `x * mask` would keep.

    A frozen base in a bitsandbytes format (`kernels.quantized.QuantizedWeight`) is dequantised into
    x's dtype in the forward and again in the backward; only the quantised weight is kept."""

    @staticmethod
    def forward(x, weight, bias, a, b, scale, keep, keep_prob, use_triton):
        matmul = _matmul_lowrank_triton if use_triton else _matmul_lowrank_torch
        rows = x.reshape(-1, x.shape[-1])
        weight = dequantize(weight, x.dtype) if isinstance(weight, QuantizedWeight) else weight
        if keep is None:
            out, xa = matmul(rows, weight.t(), scale, c=b.t(), p=a.t(), bias=bias)
        else:
            xa = _as_float(keep, rows).mul_(rows) @ (a.t() * (1.0 / keep_prob))
            out, _ = matmul(rows, weight.t(), scale, c=b.t(), z=xa, bias=bias)
        return out.view(*x.shape[:-1], weight.shape[0]), xa

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, a, b, scale, keep, keep_prob, use_triton = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.quantized = weight if isinstance(weight, QuantizedWeight) else None
        ctx.save_for_backward(x, weight if ctx.quantized is None else None, a, b, output[1], keep)
        ctx.scale, ctx.keep_prob, ctx.use_triton = scale, keep_prob, use_triton

    @staticmethod
    @torch.no_grad()  # first-order only: the backward itself is not differentiated
    def backward(ctx, grad, _grad_xa):
        x, weight, a, b, xa, keep = ctx.saved_tensors
        if ctx.quantized is not None:
            weight = dequantize(ctx.quantized, x.dtype)
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        scale = ctx.scale
        matmul = _matmul_lowrank_triton if ctx.use_triton else _matmul_lowrank_torch
        rows = x.reshape(-1, x.shape[-1])
        dy = grad.reshape(-1, weight.shape[0])
        dx = None
        if keep is None:
            if need_x:
                dx, g = matmul(dy, weight, scale, c=a, p=b)  # dx = dy W + s (dy B) A, one pass over dy
            else:
                g = dy @ b
            d_a = scale * (g.t() @ rows) if need_a else None
        else:
            kept = _as_float(keep, rows)
            g = (dy @ b) * (scale / ctx.keep_prob)  # [M, r]
            if need_x:
                dx, _ = matmul(dy, weight, scale)
                dx.addcmul_(g @ a, kept)
            d_a = g.t() @ kept.mul_(rows) if need_a else None  # kept becomes x * keep in place
        d_b = scale * (dy.t() @ xa) if need_b else None
        d_w = dy.t() @ rows if need_w else None
        d_bias = dy.sum(0) if need_bias else None
        dx = dx.view(x.shape) if dx is not None else None
        return dx, d_w, d_bias, d_a, d_b, None, None, None, None


def _as_float(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool mask as 0/1 in `like`'s dtype and shape (through uint8: torch's bool->float cast is
    several times slower than uint8->float on CPU)."""
    return keep.view(torch.uint8).to(like.dtype).reshape(like.shape)


def _apply(x, weight, bias, entry, config: LoraConfig, key, use_triton: bool):
    quantized = isinstance(weight, QuantizedWeight)
    dtype = (weight.compute_dtype or x.dtype) if quantized else weight.dtype
    if (config.use_dora or dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)
            or torch.is_autocast_enabled(x.device.type)):  # autocast picks the dtypes: the reference lets it
        return (quantized_lora_linear if quantized else lora_linear)(x, weight, bias, entry, config, key)
    a, b = entry["A"].to(x.dtype), entry["B"].to(x.dtype)
    keep = lora_keep_mask(x, config, key)
    keep_prob = rng.keep_probability(config.dropout) if keep is not None else 1.0
    return _LoraLinearFunction.apply(x, weight, bias, a, b, config.scale, keep, keep_prob, use_triton)[0]


def lora_linear_triton(x, weight, bias, entry, config: LoraConfig, key=None):
    """The LoRA linear by the fused Triton matmul (compiled on CUDA, interpreted on CPU)."""
    return _apply(x, weight, bias, entry, config, key, use_triton=True)


def lora_linear_function(x, weight, bias, entry, config: LoraConfig, key=None):
    """The LoRA linear through the same `autograd.Function`, on BLAS GEMMs (`addmm` fusing the adds)."""
    return _apply(x, weight, bias, entry, config, key, use_triton=False)


# --------------------------------------------------------------------------- other torch formulations


def lora_linear_addmm(x, weight, bias, entry, config: LoraConfig, key=None):
    """Autograd over `addmm`: y = addmm(x W^T + b, drop(x) A^T, B^T, alpha=s), saving the `* s` and `+` passes."""
    if config.use_dora:
        return lora_linear(x, weight, bias, entry, config, key)
    dropped = lora_dropout(x, config, key)
    a, b = entry["A"].to(x.dtype), entry["B"].to(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    xa = (dropped.reshape(rows.shape) if dropped is not None else rows) @ a.t()
    out = torch.addmm(F.linear(rows, weight, bias), xa, b.t(), alpha=config.scale)
    return out.view(*x.shape[:-1], weight.shape[0])


def lora_linear_concat(x, weight, bias, entry, config: LoraConfig, key=None):
    """One GEMM over concatenated inputs: [x, s drop(x) A^T] [W, B]^T + b (copies W into the concatenation)."""
    if config.use_dora:
        return lora_linear(x, weight, bias, entry, config, key)
    dropped = lora_dropout(x, config, key)
    a, b = entry["A"].to(x.dtype), entry["B"].to(x.dtype)
    xa = F.linear(dropped if dropped is not None else x, a) * config.scale
    return F.linear(torch.cat([x, xa], dim=-1), torch.cat([weight, b], dim=1), bias)


# --------------------------------------------------------------------------- dispatch

CPU_FORMULATIONS: dict[str, LoraLinearFn] = {
    "reference": lora_linear,
    "addmm": lora_linear_addmm,
    "function": lora_linear_function,
    "concat": lora_linear_concat,
}

# Chosen by `kernels.measure.measure_formulations(CPU_FORMULATIONS, timing_inputs(dtype))` at
# SmolLM2-135M shape (x [2048, 576] -> 1536, r = 16), forward + backward w.r.t. x, A and B; see
# CPU_MEASUREMENT for the numbers.
CPU_CHOICE = {torch.float32: "function", torch.bfloat16: "function"}
CPU_MEASUREMENT = """
Median ms of forward + backward, 3 trials, 1 torch thread, on a 2-core CPU shared by ~8 jobs (noisy):
float32:  reference 275.7 / 245.2 / 280.5   addmm 261.1 / 221.7 / 262.4
          function  272.1 / 220.0 / 254.8   concat 387.3 / 316.2 / 376.0
bfloat16: reference 108.7 / 109.0 / 110.7   addmm 108.3 / 107.0 / 106.0
          function  106.2 / 105.1 / 105.6   concat 150.8 / 151.9 / 147.9
The torch `Function` is fastest or tied-fastest in every trial (3-10% under the reference); the
margins are small against the noise, the concatenation is clearly slowest (it copies W every call).
"""


def select_lora_linear(device: torch.device | str, dtype: torch.dtype) -> LoraLinearFn:
    """The fastest LoRA linear for `device` and `dtype`, with the reference's signature
    `(x, weight, bias, entry, config, key=None)`.

    CUDA with triton installed: the fused Triton matmul for bf16/fp16 (tensor-core tiles, autotuned);
    for float32 the torch `Function` on cuBLAS, since the Triton float32 path (IEEE FMA products,
    one untuned tile) is there for checks. Neither CUDA choice has been timed yet:
    `programs.bench.gpu` times reference, torch Function and Triton side by side. Otherwise the torch
    formulation measured fastest on CPU for that dtype (`CPU_CHOICE`), the reference where nothing
    was measured.
    """
    if triton_usable(device) and dtype in (torch.bfloat16, torch.float16):
        return lora_linear_triton
    if triton_usable(device) and dtype == torch.float32:
        return lora_linear_function
    if torch.device(device).type == "cpu":
        return CPU_FORMULATIONS[CPU_CHOICE.get(dtype, "reference")]
    return lora_linear


def timing_inputs(dtype=torch.float32, tokens: int = 2048, in_features: int = 576, out_features: int = 1536,
                  r: int = 16, device="cpu"):
    """x [tokens, in_features], A and B (float32, as the adapter is kept) differentiated, W frozen,
    for `kernels.measure.measure_formulations`; the defaults are the SmolLM2-135M shape `CPU_CHOICE`
    was measured at."""
    from kernels.measure import TimingInputs

    generator = torch.Generator().manual_seed(0)
    config = LoraConfig(r=r, alpha=2 * r)
    x = torch.randn(tokens, in_features, generator=generator).to(device, dtype).requires_grad_()
    weight = (0.02 * torch.randn(out_features, in_features, generator=generator)).to(device, dtype)
    a = (0.02 * torch.randn(r, in_features, generator=generator)).to(device).requires_grad_()
    b = (0.02 * torch.randn(out_features, r, generator=generator)).to(device).requires_grad_()
    return TimingInputs((x, a, b), (0, 1, 2),
                        lambda fn: lambda x, a, b: fn(x, weight, None, {"A": a, "B": b}, config))
