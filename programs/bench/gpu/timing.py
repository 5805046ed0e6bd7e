"""Timing on the device: the suite's time budget, every formulation of each kernel at the model's
shapes, and a train step's step time."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import lora_linear, rmsnorm, swiglu
from kernels.measure import elapsed_seconds, measure_formulations
from kernels.triton_jit import triton_usable
from programs.bench.gpu.cases import LLAMA_3_2_1B
from pure.models.config import ModelConfig


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
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_size
    # (name, the kernel's formulations, a function making its inputs): inputs are made one case at a time
    cases = [(f"rms_norm[{tokens}x{h}]", _formulations(rmsnorm, rmsnorm.rms_norm_triton, device),
              lambda: rmsnorm.timing_inputs(dtype, tokens, h, device)),
             (f"swiglu[{tokens}x{i}]", _formulations(swiglu, swiglu.swiglu_triton, device),
              lambda: swiglu.timing_inputs(dtype, tokens, i, device))]
    for name, fan_in, fan_out in (("q_proj", h, h), ("k_proj", h, kv), ("gate_proj", h, i), ("down_proj", i, h)):
        cases.append((f"lora_linear {name}[{tokens}x{fan_in}->{fan_out} r={r}]",
                      _formulations(lora_linear, lora_linear.lora_linear_triton, device),
                      lambda fan_in=fan_in, fan_out=fan_out: lora_linear.timing_inputs(dtype, tokens, fan_in, fan_out,
                                                                                       r, device)))
    timings = {}
    for name, formulations, make_inputs in cases:
        seconds = measure_formulations(formulations, make_inputs(), repeats=repeats, rounds=2)
        timings[name] = {k: round(v * 1e3, 4) for k, v in seconds.items()}
    return {"dtype": str(dtype).removeprefix("torch."), "unit": "ms forward+backward (median)",
            "dispatched": {"rms_norm": rmsnorm.select_rms_norm(device, dtype).__name__,
                           "swiglu": swiglu.select_swiglu(device, dtype).__name__,
                           "lora_linear": lora_linear.select_lora_linear(device, dtype).__name__},
            "timings": timings}


def time_steps(step: Callable[[], float], device: torch.device, steps: int, warmup: int) -> dict:
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
