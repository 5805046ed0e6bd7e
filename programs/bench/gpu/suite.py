"""The GPU suite's sections in order, each against the time budget (the package docstring lists them)."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from kernels.measure import synchronize
from programs.bench.gpu.benchmark import run_benchmark
from programs.bench.gpu.cases import DOCUMENT_LENGTHS, LLAMA_3_2_1B, kernel_cases
from programs.bench.gpu.checks import check_attention, check_kernels
from programs.bench.gpu.timing import Budget, time_kernels
from pure.models.config import ModelConfig
from pure.models.llama import sdpa_attention


def run_section(results: dict, name: str, budget: Budget, needed: float, log: Callable, fn: Callable) -> None:
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
    """Run every section (the package docstring) within `budget_s` seconds; return the report as a dict
    and write it as JSON to `out_json` when given. The keyword arguments exist so the CPU tests can
    run the same code on a tiny model; a GPU session calls it with none."""
    from backends.flops import measure_matmul_peak

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run_gpu_suite: no CUDA device is visible (torch.cuda.is_available() is False)")
    budget = Budget(budget_s)
    results: dict = {"suite": "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    dtype = torch.bfloat16
    run_section(results, "environment", budget, 0, log, lambda: environment(device))
    run_section(results, "kernels", budget, 20, log, lambda: check_kernels(device, cases_fn=kernel_cases_fn))
    run_section(results, "kernel_timings", budget, 30, log,
             lambda: time_kernels(device, dtype, tokens=time_kernels_at, config=config, r=lora_rank,
                                  repeats=timing_repeats))
    run_section(results, "attention", budget, 20, log, lambda: check_attention(
        device, dtype, timing_documents=document_lengths, repeats=timing_repeats,
        timing_heads=(config.num_attention_heads, config.num_key_value_heads, config.head_size)))
    # A dispatched attention that failed its check (or did not run) does not get to time the model:
    # the benchmark falls back to the masked reference and says so.
    attention_fn = None if results["attention"].get("passed") else sdpa_attention
    run_section(results, "peak", budget, 10, log, lambda: measure_matmul_peak(device, size=peak_size, dtype=dtype))
    peak = results["peak"].get("flops_per_s")
    if peak:
        run_section(results, "benchmark", budget, 60, log, lambda: run_benchmark(
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
