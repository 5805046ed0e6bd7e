"""Correctness on the device: each kernel case and each attention formulation vs its plain-torch
reference, forward and every input gradient, as relative errors against a bound per dtype."""
from __future__ import annotations

import traceback

import torch

from kernels.attention import attention_candidates, flash_attn_available, select_attention
from kernels.measure import compare_formulations
from programs.bench.gpu.cases import kernel_cases
from pure.models.llama import attention_mask, sdpa_attention

# Relative error bounds (||a - b|| / ||b||): float32 differs from the reference only in summation
# order (~1e-7 seen); bfloat16 in where the 8-bit mantissa is rounded (~4e-3 seen).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    denominator = e.norm().item()
    difference = (a - e).norm().item()
    return difference / denominator if denominator > 0 else difference


def _grads(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream)


def _compare(fn, reference, make_inputs, dtype) -> dict:
    """Forward and every input gradient of fn vs reference on the same inputs; relative errors."""
    inputs, call = make_inputs()
    out_ref = call(reference)
    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(7)).to(out_ref)
    grads_ref = _grads(out_ref, inputs, upstream)
    out = call(fn)
    grads = _grads(out, inputs, upstream)
    errors = {"forward": relative_error(out, out_ref)}
    errors.update({f"grad_{i}": relative_error(g, r) for i, (g, r) in enumerate(zip(grads, grads_ref))})
    worst = max(errors.values())
    return {"errors": {k: float(f"{v:.3e}") for k, v in errors.items()}, "worst": worst,
            "passed": bool(worst <= TOLERANCE[dtype])}


def check_kernels(device, dtypes=(torch.float32, torch.bfloat16), cases_fn=kernel_cases) -> dict:
    """Every case of `cases_fn` for each dtype: relative errors, pass/fail, the implementation run."""
    records = []
    for dtype in dtypes:
        for name, fn, reference, make in cases_fn(device, dtype):
            record = {"case": name, "dtype": str(dtype).removeprefix("torch."), "implementation": fn.__name__}
            record.update(_compare(fn, reference, make, dtype))
            records.append(record)
    return {"cases": records, "all_passed": all(r["passed"] for r in records),
            "failed": [f"{r['case']} {r['dtype']}" for r in records if not r["passed"]]}


def _packed_segments(document_lengths, pad: int) -> torch.Tensor:
    """Segment ids [rows, width] of packed rows, each row padded with a segment of its own (as
    collate_packed pads); `document_lengths` is one tuple of lengths per row."""
    width = max(sum(row) for row in document_lengths) + pad
    segments = torch.zeros(len(document_lengths), width, dtype=torch.long)
    for row, lengths in enumerate(document_lengths):
        bounds = torch.tensor([0, *lengths]).cumsum(0)
        for doc in range(len(lengths)):
            segments[row, bounds[doc]:bounds[doc + 1]] = doc + 1
        segments[row, bounds[-1]:] = len(lengths) + 1
    return segments


def _attention_call(fn, segments):
    """`fn` as the model calls it: no mask for the varlen formulations, the segment mask otherwise."""
    mask = None if getattr(fn, "varlen", False) else attention_mask(segments, segments, 0, None)
    return lambda q, k, v: fn(q, k, v, mask, False, segments)


def check_attention(device, dtype=torch.bfloat16, document_lengths=((100, 60, 96), (200, 56)),
                    heads: int = 8, kv_heads: int = 2, head_dim: int = 64,
                    timing_documents=None, timing_heads=None, repeats: int = 10) -> dict:
    """Every attention formulation for this device (`kernels.attention.attention_candidates`) vs SDPA
    with the segment mask on packed rows: forward, and the q / k / v gradients by autograd and by
    `torch.func.vjp` (the train step differentiates through torch.func). Then, where
    `timing_documents` (one packed row) is given, each passing formulation's forward + backward
    time at `timing_heads` = (heads, kv_heads, head_dim): the numbers the CUDA dispatch should rest on.
    `passed` is the verdict on the dispatched one (`select_attention`), which the benchmark uses."""
    candidates = attention_candidates(device, dtype)
    chosen = select_attention(device, dtype)
    segments = _packed_segments(document_lengths, pad=8).to(device)
    g = torch.Generator().manual_seed(0)
    B, T = segments.shape
    q = torch.randn(B, heads, T, head_dim, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, kv_heads, T, head_dim, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, kv_heads, T, head_dim, generator=g).to(device, dtype).requires_grad_()
    reference = _attention_call(sdpa_attention, segments)
    expected = reference(q, k, v)
    upstream = torch.randn(expected.shape, generator=g).to(device, dtype)
    grads_expected = torch.autograd.grad(expected, (q, k, v), upstream)
    report: dict = {}
    for name, fn in candidates.items():
        record = report.setdefault(name, {})
        try:
            call = _attention_call(fn, segments)
            actual = call(q, k, v)
            errors = {"forward": relative_error(actual, expected)}
            grads = torch.autograd.grad(actual, (q, k, v), upstream)
            errors.update({f"grad_{n}": relative_error(a, e) for n, a, e in zip("qkv", grads, grads_expected)})
            _, vjp = torch.func.vjp(call, q.detach(), k.detach(), v.detach())
            errors.update({f"func_grad_{n}": relative_error(a, e)
                           for n, a, e in zip("qkv", vjp(upstream), grads_expected)})
            record["errors"] = {key: float(f"{e:.3e}") for key, e in errors.items()}
            record["passed"] = bool(max(errors.values()) <= TOLERANCE[dtype])
        except Exception as error:
            record.update(passed=False, error=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc(limit=6).splitlines()[-12:])
    if timing_documents is not None:
        heads_t, kv_t, dim_t = timing_heads or (heads, kv_heads, head_dim)
        row = _packed_segments((tuple(timing_documents),), pad=0).to(device)
        shapes = [(1, heads_t, row.shape[1], dim_t), (1, kv_t, row.shape[1], dim_t), (1, kv_t, row.shape[1], dim_t)]
        args = [torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for shape in shapes]
        timed = {name: _attention_call(fn, row) for name, fn in candidates.items() if report[name]["passed"]}
        seconds = compare_formulations(timed, args, grad_of=(0, 1, 2), repeats=repeats)
        for name, value in seconds.items():
            report[name]["fwd_bwd_ms"] = round(value * 1e3, 4)
    return {"implementation": chosen.__name__, "flash_attn_installed": flash_attn_available(device),
            "dtype": str(dtype).removeprefix("torch."), "candidates": report,
            "passed": bool(report[_candidate_name(candidates, chosen)]["passed"])}


def _candidate_name(candidates: dict, fn) -> str:
    return next(name for name, candidate in candidates.items() if candidate is fn)
