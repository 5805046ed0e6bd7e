"""The measuring helpers: every formulation is timed on the same bound inputs, and peak memory on
CPU is the process's max RSS."""
import torch

from kernels.measure import TimingInputs, max_rss_mb, measure_formulations, peak_memory_mb


def test_every_formulation_runs_forward_and_backward_on_the_bound_inputs():
    calls = {"double": [], "square": []}

    def recording(name, fn):
        def formulation(x, scale):
            calls[name].append(scale)
            return fn(x) * scale
        return formulation

    x = torch.ones(4, requires_grad=True)
    inputs = TimingInputs((x,), (0,), lambda fn: lambda x: fn(x, 3.0))
    seconds = measure_formulations({"double": recording("double", lambda x: 2 * x),
                                    "square": recording("square", lambda x: x * x)}, inputs, repeats=2, rounds=2)
    assert set(seconds) == {"double", "square"} and all(s > 0 for s in seconds.values())
    # one warm-up call, then repeats x rounds timed calls, each with the bound constant
    assert calls == {"double": [3.0] * 5, "square": [3.0] * 5}
    assert x.grad is None  # torch.autograd.grad: nothing accumulates between runs


def test_peak_memory_on_cpu_is_the_max_rss():
    before = max_rss_mb()
    peak = peak_memory_mb(torch.device("cpu"))
    assert peak["peak_mb"] == peak["rss_mb"] >= before > 0
