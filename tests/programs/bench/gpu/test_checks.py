"""The correctness checks: the error measure, and the Triton kernels checked where Triton runs."""
import pytest
import torch

from kernels.triton_jit import triton_installed
from programs.bench.gpu import cases
from programs.bench.gpu.checks import check_kernels, relative_error


def test_relative_error_is_a_norm_ratio():
    assert relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert relative_error(torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0])) == pytest.approx(0.1)


@pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
def test_kernel_checks_include_the_triton_kernels_where_triton_runs(monkeypatch, tiny_cases):
    # pretend Triton runs compiled here: the interpreter stands in for CUDA on these tiny cases
    monkeypatch.setattr(cases, "triton_usable", lambda device: True)
    report = check_kernels("cpu", cases_fn=tiny_cases)
    implementations = {case["implementation"] for case in report["cases"]}
    assert {"rms_norm_triton", "swiglu_triton", "lora_linear_triton"} <= implementations
    assert report["all_passed"], report["failed"]

