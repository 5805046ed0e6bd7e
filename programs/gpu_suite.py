"""The GPU suite: kernel correctness on CUDA and the Llama-3.2-1B-shaped training benchmark.

    run_gpu_suite(out_json=None) -> dict           (`python -m programs.bench --suite gpu`)

One script a GPU session runs in under 8 minutes with nothing but the repo and the image's
torch / transformers / triton (flash-attn and peft used when installed, skipped otherwise; nothing
is downloaded). Sections, each timed against a budget and recorded as skipped or failed (with the
error) rather than ending the run:

  environment  versions, device name, triton / flash-attn / peft availability
  kernels      every dispatched kernel, and every Triton kernel (RMSNorm, SwiGLU, LoRA linear with
               and without bias and dropout, the fused linear + cross-entropy head frozen and
               trained, whole-vocabulary and vocabulary-tiled), forward and backward vs its
               plain-torch reference on
               random inputs at several shapes, float32 (relative error <= 1e-5) and bfloat16
               (<= 1e-2)
  kernel_timings  forward+backward time of every formulation of each kernel (the torch ones and
               Triton) at the 1B model's shapes in bf16: the numbers a CUDA dispatch rests on
  attention    every attention formulation for the device (masked SDPA, SDPA per document, torch's
               varlen flash kernel, flash-attn varlen when installed) vs `sdpa_attention` with the
               segment mask on packed rows, forward and backward (autograd and torch.func), and each
               one's time at the benchmark's shapes; a dispatched one that fails is not benchmarked
  peak         the measured bf16 matmul peak (an 8192^3 matmul), and the datasheet peak if known
  benchmark    a Llama-3.2-1B-shaped random model in bf16, one packed row of 2048 tokens:
               our LoRA step (r=16, all linear layers), HF transformers + PEFT LoRA on the same
               weights and batch (manual loop, torch.optim.AdamW), our full fine-tune and HF's.

MFU = model FLOPs per step / step time / peak FLOP/s, with the model FLOPs of `backends.flops`
(PaLM appendix B, attention within documents, frozen weights without weight gradients):

    F = 4 N_frozen T + 6 N_trained T + 12 n_layers d_attn P + c_head V E S

(P = sum over documents of L(L+1)/2 causal pairs, S = supervised tokens, c_head 4 frozen / 6
trained). `mfu_6n` is the convention many trainers print, (6 (N_matmul + V E) T + 12 n_layers
d_attn P) / time / peak, which credits a LoRA step with base-weight gradients it never computes.
The kernels the model used are listed with each result: the dispatched RMSNorm / SwiGLU / LoRA
linear reach the model only once `pure.train.make_apply` takes them (`rms_norm_fn`, `swiglu_fn`,
`lora_linear_fn`); until then the benchmark runs the references (and the dispatched attention).

Every piece takes a `device`, so the CPU tests run the whole suite on a tiny model.
"""
from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import inspect
import json
import platform
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kernels.attention import attention_candidates, flash_attn_available, select_attention
from kernels.linear_ce import chunked_token_logprobs, select_token_logprob_fn
from kernels.lora_linear import lora_linear_triton, select_lora_linear
from kernels.measure import compare_formulations, elapsed_seconds, synchronize
from kernels.rmsnorm import rms_norm_triton, select_rms_norm
from kernels.swiglu import select_swiglu, swiglu_reference, swiglu_triton
from kernels.triton_jit import triton_usable
from pure import rng
from pure.linear_ce import reference_token_logprobs
from pure.losses.common import IGNORE_INDEX
from pure.lora import LoraConfig, init_lora, lora_linear
from pure.models.config import ModelConfig
from pure.models.llama import attention_mask, init, rms_norm, sdpa_attention

LLAMA_3_2_1B = ModelConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
)
# Documents of one packed 2048-token row (a spread of lengths, as packing produces).
DOCUMENT_LENGTHS = (700, 420, 333, 257, 190, 148)

# Relative error bounds (||a - b|| / ||b||): float32 differs from the reference only in summation
# order (~1e-7 seen); bfloat16 in where the 8-bit mantissa is rounded (~4e-3 seen).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), by device-name substring.
DATASHEET_BF16_PEAK = (
    ("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100 NVL", 835.0e12), ("H100", 989.4e12),
    ("A100", 312.0e12), ("L40S", 362.0e12), ("A10G", 70.0e12), ("L4", 121.0e12),
)


# --------------------------------------------------------------------------- small pieces


@dataclass
class Budget:
    """Seconds left of the suite's allowance; sections ask before they start."""

    seconds: float
    start: float = 0.0

    def __post_init__(self):
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, needed: float) -> bool:
        return self.left() >= needed


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    denominator = e.norm().item()
    difference = (a - e).norm().item()
    return difference / denominator if denominator > 0 else difference


def datasheet_peak(device_name: str) -> float | None:
    for fragment, flops in DATASHEET_BF16_PEAK:
        if fragment in device_name:
            return flops
    return None


def model_kernels(device, dtype) -> dict[str, Callable]:
    """The dispatched kernels, by the keyword names the model forward takes them under."""
    return {"rms_norm_fn": select_rms_norm(device, dtype), "swiglu_fn": select_swiglu(device, dtype),
            "lora_linear_fn": select_lora_linear(device, dtype)}


def _accepted_kwargs(fn: Callable, candidates: dict) -> dict:
    """The entries of `candidates` that `fn` takes as keyword arguments."""
    parameters = inspect.signature(fn).parameters
    return {k: v for k, v in candidates.items() if k in parameters}


def packed_batch(config: ModelConfig, document_lengths, key: torch.Tensor, device) -> dict:
    """One packed row [1, sum(lengths)]: random tokens, every token trained, positions restarting
    per document, segment ids 1, 2, ... (what `pure.data.packing.collate_packed` produces)."""
    total = sum(document_lengths)
    ids = rng.randint(key, 0, config.vocab_size, (1, total))
    segments = torch.cat([torch.full((n,), i + 1, dtype=torch.long) for i, n in enumerate(document_lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in document_lengths])[None]
    batch = {"input_ids": ids, "labels": ids.clone(), "positions": positions, "segment_ids": segments}
    return {k: v.to(device) for k, v in batch.items()}


def hf_labels(batch: dict) -> torch.Tensor:
    """Labels for a transformers model (which shifts them itself): the first token of every
    document is not a target, so no document learns to predict the next one's start."""
    labels = batch["labels"].clone()
    seg = batch["segment_ids"]
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return labels.masked_fill(starts, -100)


def supervised_tokens(batch: dict) -> int:
    return int((hf_labels(batch)[:, 1:] != -100).sum())


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _section(results: dict, name: str, budget: Budget, needed: float, log: Callable, fn: Callable) -> None:
    """Run one section into results[name]: skipped when the budget is short, the error when it fails."""
    if not budget.allows(needed):
        results[name] = {"skipped": f"time budget: {budget.left():.0f} s left, the section needs ~{needed:.0f} s"}
        log(f"[gpu-suite] {name}: skipped (budget)")
        return
    began = time.perf_counter()
    log(f"[gpu-suite] {name} ...")
    try:
        results[name] = fn()
    except Exception as error:  # a failed section is reported, the suite goes on
        results[name] = {"error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc(limit=6).splitlines()[-12:]}
    results[name]["seconds"] = round(time.perf_counter() - began, 2)
    log(f"[gpu-suite] {name}: {'failed' if 'error' in results[name] else 'done'} in {results[name]['seconds']} s")


# --------------------------------------------------------------------------- correctness


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


def _rms_case(shape, dtype, device):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
        w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device, dtype).requires_grad_()
        return (x, w), lambda fn: fn(x, w, 1e-5)
    return make


def _swiglu_case(shape, dtype, device):
    def make():
        g = torch.Generator().manual_seed(0)
        gate = (2 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
        up = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
        return (gate, up), lambda fn: fn(gate, up)
    return make


def _lora_case(tokens, in_features, out_features, r, dtype, device, bias=False, dropout=0.0):
    config = LoraConfig(r=r, alpha=1.5 * r, dropout=dropout)

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, in_features, generator=g).to(device, dtype).requires_grad_()
        w = (in_features ** -0.5 * torch.randn(out_features, in_features, generator=g)).to(device, dtype)
        b = (0.1 * torch.randn(out_features, generator=g)).to(device, dtype).requires_grad_() if bias else None
        a = (in_features ** -0.5 * torch.randn(r, in_features, generator=g)).to(device).requires_grad_()
        bb = (0.1 * torch.randn(out_features, r, generator=g)).to(device).requires_grad_()
        key = rng.key(3) if dropout else None
        inputs = (x, a, bb) + ((b,) if bias else ())
        return inputs, lambda fn: fn(x, w, b, {"A": a, "B": bb}, config, key)
    return make


def _linear_ce_case(tokens, hidden_size, vocab, dtype, device, train_head):
    def make():
        g = torch.Generator().manual_seed(0)
        h = torch.randn(tokens, hidden_size, generator=g).to(device, dtype).requires_grad_()
        w = (hidden_size ** -0.5 * torch.randn(vocab, hidden_size, generator=g)).to(device, dtype)
        w.requires_grad_(train_head)
        t = torch.randint(0, vocab, (tokens,), generator=g)
        t[::7] = IGNORE_INDEX  # masked prompt tokens
        t = t.to(device)
        return ((h, w) if train_head else (h,)), lambda fn: fn(h, w, t).logprobs
    return make


def _token_logprob_implementations(device, dtype) -> list[Callable]:
    """The dispatched head, and the vocabulary-tiled form (at least three tiles of at most 4096 rows),
    so the online log-sum-exp is checked on every device whatever the dispatcher picks."""
    dispatched = select_token_logprob_fn(device, dtype)

    def token_logprobs_dispatched(h, w, t):
        return dispatched(h, w, t)

    def token_logprobs_vocab_tiled(h, w, t):
        return chunked_token_logprobs(h, w, t, chunk_size=1024, vocab_chunk=min(4096, -(-w.shape[0] // 3)))

    return [token_logprobs_dispatched, token_logprobs_vocab_tiled]


def _implementations(dispatched: Callable, triton_version: Callable, device) -> list[Callable]:
    """The dispatched kernel, and the Triton one too where it runs compiled (if not the same)."""
    return [dispatched] + ([triton_version] if triton_usable(device) and triton_version is not dispatched else [])


def kernel_cases(device, dtype) -> list[tuple[str, Callable, Callable, Callable]]:
    """(name, implementation, reference, inputs) for every kernel at several shapes, including
    widths that are not multiples of any tile and the 1B model's own: the dispatched kernel, and
    the Triton kernel as well on CUDA (float32 LoRA dispatches to torch but Triton is checked)."""
    cases = []
    for shape in ((7, 576), (2, 1000, 2048), (3, 5, 40)):
        for fn in _implementations(select_rms_norm(device, dtype), rms_norm_triton, device):
            cases.append((f"rms_norm{list(shape)}", fn, rms_norm, _rms_case(shape, dtype, device)))
    for shape in ((7, 1536), (2048, 8192), (3, 5, 40)):
        for fn in _implementations(select_swiglu(device, dtype), swiglu_triton, device):
            cases.append((f"swiglu{list(shape)}", fn, swiglu_reference, _swiglu_case(shape, dtype, device)))
    lora_shapes = ((2048, 2048, 512, 16, False, 0.0), (1000, 576, 1536, 16, True, 0.0),
                   (333, 2048, 8192, 16, False, 0.1), (37, 40, 24, 3, True, 0.0))
    for tokens, fan_in, fan_out, r, bias, dropout in lora_shapes:
        variant = (" bias" if bias else "") + (" dropout" if dropout else "")
        name = f"lora_linear[{tokens}x{fan_in}->{fan_out} r={r}{variant}]"
        for fn in _implementations(select_lora_linear(device, dtype), lora_linear_triton, device):
            cases.append((name, fn, lora_linear, _lora_case(tokens, fan_in, fan_out, r, dtype, device, bias, dropout)))
    # the 1B model's head (frozen, as in LoRA), SmolLM2's head trained (full fine-tuning), a tiny one
    for tokens, hidden_size, vocab, train_head in ((1000, 2048, 128256, False), (300, 576, 49152, True),
                                                   (37, 40, 61, True)):
        name = f"linear_ce[{tokens}x{hidden_size} V={vocab}{' head trained' if train_head else ''}]"
        for fn in _token_logprob_implementations(device, dtype):
            cases.append((name, fn, reference_token_logprobs,
                          _linear_ce_case(tokens, hidden_size, vocab, dtype, device, train_head)))
    return cases


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


def _formulations(module, triton_version: Callable, device) -> dict[str, Callable]:
    """Every torch formulation a kernel module offers, plus its Triton kernel where that runs compiled."""
    candidates = dict(module.CPU_FORMULATIONS)
    if triton_usable(device):
        candidates["triton"] = triton_version
    return candidates


def time_kernels(device, dtype=torch.bfloat16, tokens: int = 2048, config: ModelConfig = LLAMA_3_2_1B,
                 r: int = 16, repeats: int = 10) -> dict:
    """Forward+backward milliseconds of every formulation of each kernel (the torch ones the CPU
    dispatch chose among, and Triton on CUDA) at the model's shapes: what a CUDA dispatch should
    be chosen by."""
    from kernels import lora_linear as lora_module, rmsnorm as rms_module, swiglu as swiglu_module

    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_size
    timings = {}

    def record(name, candidates, args, grad_of):
        ms = compare_formulations(candidates, args, grad_of, repeats=repeats, rounds=2)
        timings[name] = {k: round(v * 1e3, 4) for k, v in ms.items()}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, h, generator=g).to(device, dtype).requires_grad_()
    w = torch.ones(h, device=device, dtype=dtype).requires_grad_()
    rms_candidates = {k: (lambda f: lambda x, w: f(x, w, 1e-5))(f)
                      for k, f in _formulations(rms_module, rms_norm_triton, device).items()}
    record(f"rms_norm[{tokens}x{h}]", rms_candidates, (x, w), (0, 1))
    gate = torch.randn(tokens, i, generator=g).to(device, dtype).requires_grad_()
    up = torch.randn(tokens, i, generator=g).to(device, dtype).requires_grad_()
    record(f"swiglu[{tokens}x{i}]", _formulations(swiglu_module, swiglu_triton, device), (gate, up), (0, 1))
    lora_config = LoraConfig(r=r, alpha=2 * r)
    for name, fan_in, fan_out in (("q_proj", h, h), ("k_proj", h, kv), ("gate_proj", h, i), ("down_proj", i, h)):
        xs = torch.randn(tokens, fan_in, generator=g).to(device, dtype).requires_grad_()
        weight = (fan_in ** -0.5 * torch.randn(fan_out, fan_in, generator=g)).to(device, dtype)
        a = (fan_in ** -0.5 * torch.randn(r, fan_in, generator=g)).to(device).requires_grad_()
        b = (0.01 * torch.randn(fan_out, r, generator=g)).to(device).requires_grad_()
        candidates = {label: (lambda f, weight=weight: lambda xs, a, b: f(xs, weight, None, {"A": a, "B": b},
                                                                          lora_config))(f)
                      for label, f in _formulations(lora_module, lora_linear_triton, device).items()}
        record(f"lora_linear {name}[{tokens}x{fan_in}->{fan_out} r={r}]", candidates, (xs, a, b), (0, 1, 2))
    return {"dtype": str(dtype).removeprefix("torch."), "unit": "ms forward+backward (median)",
            "dispatched": {"rms_norm": select_rms_norm(device, dtype).__name__,
                           "swiglu": select_swiglu(device, dtype).__name__,
                           "lora_linear": select_lora_linear(device, dtype).__name__},
            "timings": timings}


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


# --------------------------------------------------------------------------- benchmark


def _time_steps(step: Callable[[], float], device: torch.device, steps: int, warmup: int) -> dict:
    """Run `warmup` untimed steps, then `steps` timed ones; `step()` returns the loss as a float
    (which synchronises). Times by CUDA events on GPU, wall clock on CPU."""
    losses = []
    for _ in range(warmup):
        losses.append(step())
    times = []
    for _ in range(steps):
        holder = {}
        times.append(elapsed_seconds(lambda: holder.setdefault("loss", step()), device))
        losses.append(holder["loss"])
    return {"step_s_median": statistics.median(times), "step_s_all": [round(t, 5) for t in times],
            "losses": [round(x, 5) for x in losses]}


def _throughput(timing: dict, flops: float, flops_6n: float, tokens: int, peak: float, nominal: float | None) -> dict:
    seconds = timing["step_s_median"]
    result = {**timing, "tokens_per_s": tokens / seconds, "model_flops_per_step": flops,
              "achieved_flops_per_s": flops / seconds, "mfu": flops / seconds / peak,
              "mfu_6n": flops_6n / seconds / peak}
    if nominal:
        result["mfu_vs_datasheet"] = flops / seconds / nominal
    return result


def bench_ours(config: ModelConfig, params: dict, batch: dict, device: torch.device, *, lora_rank: int | None,
               steps: int, warmup: int, dtype: torch.dtype, attention_fn=None) -> tuple[dict, dict, list[str]]:
    """Our train step (LoRA over all linear layers, or full fine-tune when lora_rank is None):
    (timing, trainable, names of the dispatched kernels the model took). `attention_fn` defaults
    to the dispatched one."""
    from pure.losses import sft
    from pure.optim import adamw
    from pure.train import init_train_state, make_apply, make_train_step

    kernel_kwargs = _accepted_kwargs(make_apply, model_kernels(device, dtype))
    attention_fn = attention_fn or select_attention(device, dtype)
    if lora_rank is not None:
        lora_config = LoraConfig(r=lora_rank, alpha=2 * lora_rank)
        trainable = {"lora": init_lora(params, lora_config, rng.key(1), target_linear=True)}
        bind = make_apply(config, params, lora_config=lora_config, attention_fn=attention_fn, **kernel_kwargs)
    else:
        trainable = {"params": params}
        bind = make_apply(config, {}, attention_fn=attention_fn, **kernel_kwargs)
    optimizer = adamw(1e-5)
    state = {"state": init_train_state(trainable, optimizer, rng.key(2))}
    train_step = make_train_step(sft, optimizer, bind)

    def step() -> float:
        state["state"], metrics = train_step(state["state"], [batch])
        return float(metrics["train/loss"])

    timing = _time_steps(step, device, steps, warmup)
    used = sorted(kernel_kwargs) + (["attention_fn=" + attention_fn.__name__])
    return timing, state["state"].trainable, used


def _hf_model(config: ModelConfig, params: dict, device: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM of `config` holding our weights (so both start at the same loss)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pure.models.config import config_to_hf

    hf_config = LlamaConfig(**{k: v for k, v in config_to_hf(config).items() if k != "architectures"})
    implementation = "flash_attention_2" if flash_attn_available(device) and dtype != torch.float32 else "sdpa"
    hf_config._attn_implementation = implementation
    with torch.device(device):
        model = LlamaForCausalLM(hf_config).to(dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in params.items()}, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"HF model and our params disagree: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, implementation


def bench_hf(config: ModelConfig, params: dict, batch: dict, device: torch.device, *, lora_rank: int | None,
             steps: int, warmup: int, dtype: torch.dtype) -> dict:
    """transformers + PEFT LoRA (target_modules="all-linear", as ours) or a full fine-tune, a manual
    loop with torch.optim.AdamW on the same packed row (position_ids restart per document)."""
    model, implementation = _hf_model(config, params, device, dtype)
    if lora_rank is not None:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        model = get_peft_model(model, PeftLoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                     target_modules="all-linear"))
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=device.type == "cuda")
    labels = hf_labels(batch)

    def step() -> float:
        # use_cache=False: with a cache transformers does not read packed documents from position_ids.
        out = model(input_ids=batch["input_ids"], position_ids=batch["positions"], labels=labels, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    timing = _time_steps(step, device, steps, warmup)
    timing["attn_implementation"] = implementation
    timing["trained_params"] = sum(p.numel() for p in trained)
    return timing  # the model and optimizer go with this frame; the caller frees the cache


def run_benchmark(device, *, config: ModelConfig = LLAMA_3_2_1B, document_lengths=DOCUMENT_LENGTHS,
                  lora_rank: int = 16, steps: int = 6, warmup: int = 2, dtype=torch.bfloat16,
                  peak_flops: float, budget: Budget | None = None, log: Callable = print,
                  attention_fn=None) -> dict:
    """LoRA and full fine-tune, ours and HF's, on one packed row; MFU against `peak_flops`.
    `attention_fn`: ours takes the dispatched attention unless given another."""
    from backends.flops import attention_pairs, flop_counter

    device = torch.device(device)
    budget = budget or Budget(float("inf"))
    began = time.perf_counter()
    params = init(config, rng.key(0), dtype=dtype, device=device)
    batch = packed_batch(config, document_lengths, rng.key(4), device)
    tokens, supervised = sum(document_lengths), supervised_tokens(batch)
    pairs = attention_pairs(document_lengths)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    nominal = datasheet_peak(name) if device.type == "cuda" else None
    report = {"model": {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
                        "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                        "kv_heads": config.num_key_value_heads, "vocab": config.vocab_size,
                        "tied": config.tie_word_embeddings, "params": config.num_params(), "dtype": str(dtype)},
              "batch": {"tokens": tokens, "documents": list(document_lengths), "supervised": supervised},
              "init_seconds": round(time.perf_counter() - began, 2), "peak_flops_per_s": peak_flops,
              "datasheet_peak_flops_per_s": nominal}
    log(f"[gpu-suite] model ready in {report['init_seconds']} s")
    have_peft = importlib.util.find_spec("peft") is not None
    for mode, rank in (("lora", lora_rank), ("full", None)):
        section = report.setdefault(mode, {})
        if not budget.allows(30):
            section["skipped"] = "time budget"
            continue
        try:
            timing, trainable, used = bench_ours(config, params, batch, device, lora_rank=rank, steps=steps,
                                                 warmup=warmup, dtype=dtype, attention_fn=attention_fn)
            counter = flop_counter(config, trainable)
            head_and_matmul = counter.frozen_matmul_params + counter.trained_matmul_params + counter.head_params
            if rank is not None:  # the 6N convention counts the base model, not the adapter
                head_and_matmul -= sum(e["A"].numel() + e["B"].numel() for e in trainable["lora"].values())
            flops = counter.step_flops(tokens, pairs, supervised)
            flops_6n = 6 * head_and_matmul * tokens + 12 * config.num_hidden_layers * counter.attention_width * pairs
            section["formula"] = counter.formula()
            section["ours"] = _throughput(timing, flops, flops_6n, tokens, peak_flops, nominal)
            section["ours"]["kernels"] = used
            del trainable
        except Exception as error:
            section["ours"] = {"error": f"{type(error).__name__}: {error}",
                               "traceback": traceback.format_exc(limit=6).splitlines()[-12:]}
            flops = flops_6n = None
        _free(device)
        log(f"[gpu-suite] {mode} ours: {_summary(section.get('ours'))}")
        if rank is not None and not have_peft:
            section["hf"] = {"skipped": "peft is not installed"}
        elif not budget.allows(40):
            section["hf"] = {"skipped": "time budget"}
        else:
            try:
                timing = bench_hf(config, params, batch, device, lora_rank=rank, steps=steps, warmup=warmup,
                                  dtype=dtype)
                section["hf"] = (_throughput(timing, flops, flops_6n, tokens, peak_flops, nominal)
                                 if flops is not None else timing)
            except Exception as error:
                section["hf"] = {"error": f"{type(error).__name__}: {error}",
                                 "traceback": traceback.format_exc(limit=6).splitlines()[-12:]}
            _free(device)
            log(f"[gpu-suite] {mode} hf: {_summary(section.get('hf'))}")
        ours, hf = section.get("ours", {}), section.get("hf", {})
        if "step_s_median" in ours and "step_s_median" in hf:
            section["speedup_vs_hf"] = hf["step_s_median"] / ours["step_s_median"]
            # Same weights, same packed row, LoRA B = 0: the first losses must agree (bf16 rounding apart).
            first = [ours["losses"][0], hf["losses"][0]]
            section["first_loss_ours_vs_hf"] = first
            section["first_loss_agrees"] = abs(first[0] - first[1]) <= TOLERANCE[dtype] * abs(first[1])
    del params
    _free(device)
    return report


def _summary(record: dict | None) -> str:
    if not record:
        return "-"
    if "error" in record or "skipped" in record:
        return record.get("error") or record.get("skipped")
    return (f"{record['step_s_median'] * 1e3:.1f} ms/step, {record.get('tokens_per_s', 0):.0f} tok/s, "
            f"MFU {record.get('mfu', 0):.3f}")


# --------------------------------------------------------------------------- the suite


def environment(device) -> dict:
    device = torch.device(device)
    versions = {}
    for distribution in ("torch", "transformers", "triton", "flash-attn", "peft"):
        try:  # the installed distribution's metadata: no import (peft alone takes seconds)
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    info = {"versions": versions, "device": str(device), "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count)
    return info


def run_gpu_suite(out_json: str | Path | None = None, *, device="cuda", budget_s: float = 450.0,
                  config: ModelConfig = LLAMA_3_2_1B, document_lengths=DOCUMENT_LENGTHS, lora_rank: int = 16,
                  steps: int = 6, warmup: int = 2, peak_size: int = 8192, kernel_cases_fn=kernel_cases,
                  time_kernels_at: int = 2048, timing_repeats: int = 10, log: Callable = print) -> dict:
    """Run every section (module docstring) within `budget_s` seconds; return the report as a dict
    and write it as JSON to `out_json` when given. The keyword arguments exist so the CPU tests can
    run the same code on a tiny model; a GPU session calls it with none."""
    from backends.flops import measure_matmul_peak

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run_gpu_suite: no CUDA device is visible (torch.cuda.is_available() is False)")
    budget = Budget(budget_s)
    results: dict = {"suite": "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    dtype = torch.bfloat16
    _section(results, "environment", budget, 0, log, lambda: environment(device))
    _section(results, "kernels", budget, 20, log, lambda: check_kernels(device, cases_fn=kernel_cases_fn))
    _section(results, "kernel_timings", budget, 30, log,
             lambda: time_kernels(device, dtype, tokens=time_kernels_at, config=config, r=lora_rank,
                                  repeats=timing_repeats))
    _section(results, "attention", budget, 20, log, lambda: check_attention(
        device, dtype, timing_documents=document_lengths, repeats=timing_repeats,
        timing_heads=(config.num_attention_heads, config.num_key_value_heads, config.head_size)))
    # A dispatched attention that failed its check (or did not run) does not get to time the model:
    # the benchmark falls back to the masked reference and says so.
    attention_fn = None if results["attention"].get("passed") else sdpa_attention
    _section(results, "peak", budget, 10, log, lambda: measure_matmul_peak(device, size=peak_size, dtype=dtype))
    peak = results["peak"].get("flops_per_s")
    if peak:
        _section(results, "benchmark", budget, 60, log, lambda: run_benchmark(
            device, config=config, document_lengths=document_lengths, lora_rank=lora_rank, steps=steps,
            warmup=warmup, dtype=dtype, peak_flops=peak, budget=budget, log=log, attention_fn=attention_fn))
        if attention_fn is not None and "error" not in results["benchmark"]:
            results["benchmark"]["attention_fallback"] = (
                f"{results['attention'].get('implementation', 'the dispatched attention')} did not pass its check (or was not "
                "checked): ours ran with sdpa_attention (the masked reference)")
    else:
        results["benchmark"] = {"skipped": "no matmul peak was measured"}
    results["total_seconds"] = round(budget.seconds - budget.left(), 2)
    synchronize(device)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(results, indent=2, default=str))
    return results
