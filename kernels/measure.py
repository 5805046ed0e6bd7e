"""Measuring on a device: synchronisation, the time of one call, peak memory, and the timing of a
kernel's forward + backward that the dispatchers' choices rest on.

Wall clock (`time.perf_counter`) on CPU, CUDA events on GPU; candidates are timed in interleaved
rounds after one warm-up call each and compared by their medians, so one preempted run (a shared
CPU) does not decide.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
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


def max_rss_mb() -> float:
    """The peak resident set size of this process so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_mb(device: torch.device) -> dict:
    """Peak memory of this process: `peak_mb` is the CUDA allocator's peak on CUDA and the max RSS
    elsewhere; `rss_mb` is the max RSS always."""
    rss = max_rss_mb()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else rss
    return {"rss_mb": rss, "peak_mb": peak}


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


@dataclass(frozen=True)
class TimingInputs:
    """What a kernel's formulations are timed on: the tensors `args`, the indices of those the
    backward differentiates (`grad_of`), and `bind(fn)`, the formulation as a function of `args`
    alone (its other arguments, such as eps or a frozen weight, fixed)."""

    args: tuple
    grad_of: tuple[int, ...]
    bind: Callable[[Callable], Callable[..., torch.Tensor]]


def measure_formulations(formulations: dict[str, Callable], inputs: TimingInputs, repeats: int = 10,
                         rounds: int = 3) -> dict[str, float]:
    """Median seconds of forward + backward of each formulation on `inputs` (`compare_formulations`);
    a kernel module's `CPU_FORMULATIONS` on its `timing_inputs()` gives the numbers its `CPU_CHOICE`
    rests on."""
    candidates = {name: inputs.bind(fn) for name, fn in formulations.items()}
    return compare_formulations(candidates, inputs.args, inputs.grad_of, repeats=repeats, rounds=rounds)


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
