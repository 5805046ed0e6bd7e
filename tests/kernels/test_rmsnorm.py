"""RMSNorm kernels vs `pure.models.llama.rms_norm`: forward and both gradients, every formulation.

The Triton kernels run under the Triton interpreter on CPU (tiny shapes; it is slow) and are
skipped where triton is not installed. Tolerances are relative norms ||a - b|| / ||b||: 1e-5 in
float32 (only the summation order differs) and 1e-2 in bfloat16 (8-bit mantissa; the interpreter
also truncates instead of rounding when it converts float32 to bfloat16).
"""
import pytest
import torch

from kernels.measure import measure_formulations
from kernels.rmsnorm import CPU_CHOICE, CPU_FORMULATIONS, rms_norm_triton, select_rms_norm, timing_inputs
from kernels.triton_jit import triton_installed
from pure.models.llama import rms_norm

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
needs_triton = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def forward_and_grads(fn, shape, dtype, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(weight_dtype or dtype).requires_grad_()
    out = fn(x, w, 1e-6)
    upstream = torch.randn(out.shape, generator=g).to(out.dtype)
    return (out, *torch.autograd.grad(out, (x, w), upstream))


def assert_matches_reference(fn, shape, dtype, weight_dtype=None):
    expected = forward_and_grads(rms_norm, shape, dtype, weight_dtype)
    actual = forward_and_grads(fn, shape, dtype, weight_dtype)
    for name, a, e in zip(("y", "dx", "dw"), actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert relative_error(a, e) <= TOLERANCE[dtype], (name, relative_error(a, e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 8), (3, 5, 40), (2, 64, 576)])
@pytest.mark.parametrize("name", sorted(name for name in CPU_FORMULATIONS if name != "reference"))
def test_cpu_formulations_match_the_reference(name, shape, dtype):
    assert_matches_reference(CPU_FORMULATIONS[name], shape, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16), (3, 5, 40), (9, 130)])
def test_triton_kernels_match_the_reference_in_the_interpreter(shape, dtype):
    # (9, 130): the row is not a power of two (block 256, masked) and 9 rows over 4 backward programs
    assert_matches_reference(rms_norm_triton, shape, dtype)


@needs_triton
def test_triton_keeps_the_reference_dtype_promotion_for_a_float32_weight():
    # bf16 activations with an fp32 weight give an fp32 output, as `weight * x.to(bf16)` does
    assert_matches_reference(rms_norm_triton, (3, 24), torch.bfloat16, weight_dtype=torch.float32)


@needs_triton
def test_triton_works_under_torch_func_grad():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=g)
    w = 1 + 0.1 * torch.randn(40, generator=g)

    def loss(fn):
        return lambda w, x: (fn(x, w, 1e-5) ** 3).sum()

    (dw, dx), value = torch.func.grad_and_value(loss(rms_norm_triton), argnums=(0, 1))(w, x)
    (dw_ref, dx_ref), value_ref = torch.func.grad_and_value(loss(rms_norm), argnums=(0, 1))(w, x)
    assert relative_error(value, value_ref) <= 1e-5
    assert relative_error(dw, dw_ref) <= 1e-5 and relative_error(dx, dx_ref) <= 1e-5


@needs_triton
def test_triton_rejects_a_weight_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        rms_norm_triton(torch.randn(2, 8), torch.ones(7), 1e-5)


def test_cpu_dispatch_follows_the_measured_choice():
    for dtype in (torch.float32, torch.bfloat16):
        assert select_rms_norm("cpu", dtype) is CPU_FORMULATIONS[CPU_CHOICE[dtype]]
    assert select_rms_norm("cpu", torch.float16) is rms_norm  # never measured: the reference


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cuda_request_without_a_gpu_falls_back_to_the_reference():
    assert select_rms_norm("cuda", torch.bfloat16) is rms_norm


def test_measurement_times_every_formulation():
    timings = measure_formulations(CPU_FORMULATIONS, timing_inputs(rows=8, width=16), repeats=1)
    assert set(timings) == set(CPU_FORMULATIONS) and all(t > 0 for t in timings.values())


@pytest.mark.parametrize("zeros", [0, 3])
def test_output_saving_norm_matches_the_reference_also_with_zero_weights(zeros):
    # y / w recovers n only where w != 0: a weight with zeros takes the input-saving Function.
    from kernels.rmsnorm import rms_norm_from_output

    g = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(6, 40, generator=g)).requires_grad_()
    w = 1 + 0.5 * torch.randn(40, generator=g)
    w[:zeros] = 0.0
    w.requires_grad_()
    upstream = torch.randn(6, 40, generator=g)
    results = []
    for fn in (rms_norm, rms_norm_from_output):
        out = fn(x, w, 1e-6)
        results.append((out, *torch.autograd.grad(out, (x, w), upstream)))
    for name, a, e in zip(("y", "dx", "dw"), results[1], results[0]):
        assert relative_error(a, e) <= TOLERANCE[torch.float32], (name, relative_error(a, e))
