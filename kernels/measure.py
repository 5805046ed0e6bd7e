"""Timing of a kernel's forward + backward, the measurement the dispatchers' choices rest on.

Wall clock (`time.perf_counter`) on CPU, CUDA events on GPU; candidates are timed in interleaved
rounds after one warm-up call each and compared by their medians, so one preempted run (a shared
CPU) does not decide.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes on `device` (CUDA events there, wall clock on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def forward_backward(fn: Callable[..., torch.Tensor], args: Sequence, grad_of: Sequence[int]) -> Callable[[], None]:
    """A closure running `fn(*args)` and the backward of the sum of its output w.r.t. `args[i]`, i in grad_of.

    `torch.autograd.grad` with a fixed upstream gradient of ones, so nothing accumulates between runs.
    """

    def run():
        inputs = [args[i] for i in grad_of]
        out = fn(*args)
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def compare_formulations(
    candidates: dict[str, Callable[..., torch.Tensor]],
    args: Sequence,
    grad_of: Sequence[int],
    repeats: int = 10,
    rounds: int = 3,
) -> dict[str, float]:
    """Median forward+backward seconds of each candidate on the same inputs.

    The candidates are timed in interleaved rounds (a, b, c, a, b, c, ...) so a slow patch of a
    shared machine hits all of them alike; each result is the median over every run of every round.
    """
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    runs = {name: forward_backward(fn, args, grad_of) for name, fn in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for name, run in runs.items():
        run()  # warm-up (allocator, one-time compilation)
    for _ in range(rounds):
        for name, run in runs.items():
            synchronize(device)
            samples[name].extend(elapsed_seconds(run, device) for _ in range(repeats))
    return {name: statistics.median(values) for name, values in samples.items()}


def select_elementwise(device, dtype, triton_version: Callable, cpu_formulations: dict[str, Callable],
                       cpu_choice: dict, reference: Callable) -> Callable:
    """The dispatch rule of the elementwise kernels (RMSNorm, SwiGLU): the Triton version on CUDA
    with triton installed, the formulation `cpu_choice` names for the dtype on CPU (the reference
    where none was chosen), the reference elsewhere."""
    from kernels.triton_jit import triton_usable

    if triton_usable(device) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return triton_version
    if torch.device(device).type == "cpu":
        return cpu_formulations[cpu_choice.get(dtype, "reference")]
    return reference
