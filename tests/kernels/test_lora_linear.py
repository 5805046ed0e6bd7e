"""LoRA linear kernels vs `pure.lora.lora_linear`: forward and the gradients of x, W, bias, A, B.

The fused Triton matmul runs under the interpreter on CPU with 16x16x16 tiles, so the tiny shapes
here still span several row, column and K tiles with ragged edges; skipped without triton.
Relative-norm tolerances: 1e-5 in float32 (summation order), 1e-2 in bfloat16 (8-bit mantissa;
the interpreter truncates float32 -> bfloat16 instead of rounding).
"""
import pytest
import torch

from kernels.lora_linear import (CPU_CHOICE, CPU_FORMULATIONS, lora_dropout, lora_linear_triton, select_lora_linear,
                                 timing_inputs)
from kernels.measure import measure_formulations
from kernels.triton_jit import triton_installed
from pure import rng
from pure.lora import LoraConfig, lora_linear
from tests.tiny import TINY

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
needs_triton = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def forward_and_grads(fn, lead, fan_in, fan_out, config, dtype, bias=False, dropout_key=None, train_weight=False):
    """fn's output and the gradients of x, A, B (and W, bias when trained) for a fixed upstream."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, fan_in, generator=g).to(dtype).requires_grad_()
    weight = (fan_in ** -0.5 * torch.randn(fan_out, fan_in, generator=g)).to(dtype).requires_grad_(train_weight)
    b = (0.1 * torch.randn(fan_out, generator=g)).to(dtype).requires_grad_() if bias else None
    entry = {"A": (fan_in ** -0.5 * torch.randn(config.r, fan_in, generator=g)).requires_grad_(),
             "B": (0.3 * torch.randn(fan_out, config.r, generator=g)).requires_grad_()}
    out = fn(x, weight, b, entry, config, dropout_key)
    upstream = torch.randn(out.shape, generator=g).to(dtype)
    inputs = [x, entry["A"], entry["B"]] + ([weight] if train_weight else []) + ([b] if bias else [])
    return (out, *torch.autograd.grad(out, inputs, upstream))


def assert_matches_reference(fn, lead, fan_in, fan_out, config, dtype, **kwargs):
    expected = forward_and_grads(lora_linear, lead, fan_in, fan_out, config, dtype, **kwargs)
    actual = forward_and_grads(fn, lead, fan_in, fan_out, config, dtype, **kwargs)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        assert relative_error(a, e) <= TOLERANCE[dtype], (i, relative_error(a, e))


# alpha 7 / r 4: a scale (1.75) that is not a power of two, so multiplying by it rounds
LORA = LoraConfig(r=4, alpha=7)
SHAPES = [((2, 9), 40, 24), ((37,), 33, 17)]
ALTERNATIVES = sorted(name for name in CPU_FORMULATIONS if name != "reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,fan_in,fan_out", SHAPES + [((2, 64), 576, 1536)])
@pytest.mark.parametrize("name", ALTERNATIVES)
def test_cpu_formulations_match_the_reference(name, lead, fan_in, fan_out, dtype):
    assert_matches_reference(CPU_FORMULATIONS[name], lead, fan_in, fan_out, LORA, dtype, bias=True)


@pytest.mark.parametrize("name", ALTERNATIVES)
def test_cpu_formulations_draw_the_same_dropout_mask(name):
    config = LoraConfig(r=3, alpha=5, dropout=0.3)
    assert_matches_reference(CPU_FORMULATIONS[name], (2, 9), 40, 24, config, torch.float32, dropout_key=rng.key(9))


@pytest.mark.parametrize("name", ALTERNATIVES)
def test_cpu_formulations_train_the_base_weight_when_asked(name):
    assert_matches_reference(CPU_FORMULATIONS[name], (2, 9), 40, 24, LORA, torch.float32, train_weight=True)


def test_dropout_helper_is_the_references_mask():
    x = torch.randn(4, 10)
    config = LoraConfig(r=2, dropout=0.5)
    dropped = lora_dropout(x, config, rng.key(3))
    keep = rng.dropout_mask(rng.key(3), 0.5, x.shape).to(x.dtype)
    assert torch.equal(dropped, x * keep / 0.5)  # 0.5 is exact at 16 bits
    assert lora_dropout(x, config, None) is None and lora_dropout(x, LoraConfig(r=2), rng.key(3)) is None


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,fan_in,fan_out,bias", [(*SHAPES[0], True), (*SHAPES[1], False)])
def test_triton_fused_matmul_matches_the_reference_in_the_interpreter(lead, fan_in, fan_out, bias, dtype):
    assert_matches_reference(lora_linear_triton, lead, fan_in, fan_out, LORA, dtype, bias=bias)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_with_dropout_matches_the_reference(dtype):
    config = LoraConfig(r=3, alpha=5, dropout=0.3)
    assert_matches_reference(lora_linear_triton, (2, 9), 40, 24, config, dtype, bias=True, dropout_key=rng.key(9))


@needs_triton
def test_triton_trains_the_base_weight_and_rank_above_the_tile():
    # r = 20 pads the low-rank tile to 32; W's gradient comes from the same Function
    assert_matches_reference(lora_linear_triton, (21,), 40, 24, LoraConfig(r=20, alpha=10), torch.float32,
                             train_weight=True)


@needs_triton
def test_triton_works_under_torch_func_grad_with_a_frozen_input():
    # as in layer 0 of a LoRA model: x needs no gradient, only the adapter does
    g = torch.Generator().manual_seed(4)
    x, weight = torch.randn(2, 9, 40, generator=g), 0.1 * torch.randn(24, 40, generator=g)
    lora = {"A": 0.1 * torch.randn(4, 40, generator=g), "B": 0.1 * torch.randn(24, 4, generator=g)}

    def loss(fn):
        return lambda lora: ((fn(x, weight, None, lora, LORA) - 1) ** 2).mean()

    grads, value = torch.func.grad_and_value(loss(lora_linear_triton))(lora)
    grads_ref, value_ref = torch.func.grad_and_value(loss(lora_linear))(lora)
    assert relative_error(value, value_ref) <= 1e-5
    for name in ("A", "B"):
        assert relative_error(grads[name], grads_ref[name]) <= 1e-5


def test_dora_and_mismatched_dtypes_fall_back_to_the_reference():
    g = torch.Generator().manual_seed(5)
    x, weight = torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g)
    dora = LoraConfig(r=2, use_dora=True)
    entry = {"A": torch.randn(2, 8, generator=g), "B": torch.randn(6, 2, generator=g), "m": torch.rand(6, generator=g)}
    fns = [fn for name, fn in CPU_FORMULATIONS.items() if name != "reference"]
    fns += [lora_linear_triton] if triton_installed() else []
    for fn in fns:
        assert torch.equal(fn(x, weight, None, entry, dora), lora_linear(x, weight, None, entry, dora))
    half_weight = weight.bfloat16()  # a base weight in another dtype than x: whatever the reference does
    with pytest.raises(RuntimeError, match="same dtype") as expected:
        lora_linear(x, half_weight, None, entry, LoraConfig(r=2))
    for fn in [CPU_FORMULATIONS["function"]] + ([lora_linear_triton] if triton_installed() else []):
        with pytest.raises(RuntimeError) as raised:
            fn(x, half_weight, None, entry, LoraConfig(r=2))
        assert str(raised.value) == str(expected.value)


def test_cpu_dispatch_follows_the_measured_choice():
    for dtype in (torch.float32, torch.bfloat16):
        assert select_lora_linear("cpu", dtype) is CPU_FORMULATIONS[CPU_CHOICE[dtype]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cuda_request_without_a_gpu_falls_back_to_the_reference():
    assert select_lora_linear("cuda", torch.bfloat16) is lora_linear


def test_measurement_times_every_formulation():
    timings = measure_formulations(CPU_FORMULATIONS, timing_inputs(tokens=8, in_features=16, out_features=24, r=4),
                                   repeats=1)
    assert set(timings) == set(CPU_FORMULATIONS) and all(t > 0 for t in timings.values())


@needs_triton
def test_a_lora_train_step_on_the_triton_kernels_matches_the_reference_step(monkeypatch):
    # The whole pure step: packed rows, LoRA dropout, rematerialised layers, torch.func.grad_and_value.
    # Until the forward takes kernels as arguments, the test swaps them into the model module.
    import pure.models.llama as llama
    from kernels.rmsnorm import rms_norm_triton
    from pure.losses import sft
    from pure.lora import init_lora
    from pure.models import init
    from pure.optim import sgd
    from pure.train import init_train_state, make_apply, make_train_step

    config = TINY
    params = init(config, rng.key(0))
    lora_config = LoraConfig(r=4, alpha=8, dropout=0.1)
    delta = {path: dict(entry, B=rng.normal(rng.fold_in(rng.key(2), i), entry["B"].shape, std=0.02))
             for i, (path, entry) in enumerate(init_lora(params, lora_config, rng.key(1), target_linear=True).items())}
    ids = rng.randint(rng.key(5), 0, config.vocab_size, (2, 12))
    batch = {"input_ids": ids, "labels": ids.clone(), "segment_ids": torch.tensor([[1] * 5 + [2] * 7, [1] * 12]),
             "positions": torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.arange(12)])}

    def one_step():
        optimizer = sgd(0.5)
        bind = make_apply(config, params, lora_config=lora_config, checkpoint_layers=True)
        step = make_train_step(sft, optimizer, bind)
        return step(init_train_state({"lora": delta}, optimizer, rng.key(3)), [batch])

    reference_state, reference_metrics = one_step()
    monkeypatch.setattr(llama, "rms_norm", rms_norm_triton)
    monkeypatch.setattr(llama, "lora_linear", lora_linear_triton)
    state, metrics = one_step()
    for name in ("train/loss", "train/grad_norm"):  # fp32, other summation order
        assert relative_error(metrics[name], reference_metrics[name]) <= 1e-5
    for path in delta:
        for name in ("A", "B"):
            assert relative_error(state.trainable["lora"][path][name],
                                  reference_state.trainable["lora"][path][name]) <= 1e-5
