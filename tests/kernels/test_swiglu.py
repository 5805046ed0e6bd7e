"""SwiGLU kernels vs `F.silu(gate) * up`: forward and both gradients, every formulation.

Triton runs under the interpreter on CPU (tiny shapes), skipped where triton is not installed.
Relative-norm tolerances: 1e-5 in float32 (operation order), 1e-2 in bfloat16 (8-bit mantissa; the
interpreter truncates float32 -> bfloat16 instead of rounding).
"""
import pytest
import torch

from kernels.measure import measure_formulations
from kernels.swiglu import (CPU_CHOICE, CPU_FORMULATIONS, select_swiglu, swiglu_reference, swiglu_triton,
                            timing_inputs)
from kernels.triton_jit import triton_installed

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
needs_triton = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def forward_and_grads(fn, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (3 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()  # both tails of the sigmoid
    up = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    out = fn(gate, up)
    upstream = torch.randn(out.shape, generator=g).to(dtype)
    return (out, *torch.autograd.grad(out, (gate, up), upstream))


def assert_matches_reference(fn, shape, dtype):
    for name, a, e in zip(("h", "d_gate", "d_up"), forward_and_grads(fn, shape, dtype),
                          forward_and_grads(swiglu_reference, shape, dtype)):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert relative_error(a, e) <= TOLERANCE[dtype], (name, relative_error(a, e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 8), (3, 5, 40), (64, 1536)])
@pytest.mark.parametrize("name", sorted(name for name in CPU_FORMULATIONS if name != "reference"))
def test_cpu_formulations_match_the_reference(name, shape, dtype):
    assert_matches_reference(CPU_FORMULATIONS[name], shape, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3), (3, 5, 40), (2, 1100)])
def test_triton_kernels_match_the_reference_in_the_interpreter(shape, dtype):
    # (2, 1100): 2200 elements span three 1024-element blocks, the last one masked
    assert_matches_reference(swiglu_triton, shape, dtype)


@needs_triton
def test_triton_accepts_non_contiguous_inputs():
    g = torch.Generator().manual_seed(2)
    both = torch.randn(6, 2, 20, generator=g)
    gate, up = both[:, 0], both[:, 1]  # strided views, as a fused gate_up projection would give
    assert not gate.is_contiguous()
    assert relative_error(swiglu_triton(gate, up), swiglu_reference(gate, up)) <= 1e-5


@needs_triton
def test_triton_works_under_torch_func_grad():
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(5, 24, generator=g), torch.randn(5, 24, generator=g)

    def loss(fn):
        return lambda gate, up: (fn(gate, up) ** 2).sum()

    grads, value = torch.func.grad_and_value(loss(swiglu_triton), argnums=(0, 1))(gate, up)
    grads_ref, value_ref = torch.func.grad_and_value(loss(swiglu_reference), argnums=(0, 1))(gate, up)
    assert relative_error(value, value_ref) <= 1e-5
    assert all(relative_error(a, e) <= 1e-5 for a, e in zip(grads, grads_ref))


@needs_triton
def test_triton_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="must have the same shape and dtype"):
        swiglu_triton(torch.randn(2, 8), torch.randn(2, 7))


def test_cpu_dispatch_follows_the_measured_choice():
    for dtype in (torch.float32, torch.bfloat16):
        assert select_swiglu("cpu", dtype) is CPU_FORMULATIONS[CPU_CHOICE[dtype]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cuda_request_without_a_gpu_falls_back_to_the_reference():
    assert select_swiglu("cuda", torch.bfloat16) is swiglu_reference


def test_measurement_times_every_formulation():
    timings = measure_formulations(CPU_FORMULATIONS, timing_inputs(tokens=8, width=16), repeats=1)
    assert set(timings) == set(CPU_FORMULATIONS) and all(t > 0 for t in timings.values())
