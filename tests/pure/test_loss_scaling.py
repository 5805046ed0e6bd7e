"""Dynamic loss scaling for fp16 mixed precision: exactness, skipping, backoff, growth."""
import pytest
import torch

from backends.precision import autocast_context, resolve_precision
from pure.optim import sgd
from pure.train import LossScaling, all_finite, next_loss_scale
from pure.tree import tree_leaves
from tests.pure.test_train import batch_rows, micro_batches, setup


def scaled(state, scaling: LossScaling):
    return state.replace(loss_scale=scaling.init())


def leaves_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(tree_leaves(a), tree_leaves(b)))


def test_a_power_of_two_scale_leaves_the_fp32_update_bit_identical():
    # Multiplying by 2**k is exact in fp32 (no overflow or underflow here) and every backward op is
    # linear in its incoming gradient, so scaled-then-unscaled gradients equal the plain ones bit for bit.
    state, step, _ = setup(dropout=0.1)
    batch = micro_batches(*batch_rows(4), 2)
    plain, plain_metrics = step(state, batch)
    new, metrics = step(scaled(state, LossScaling(init_scale=2.0 ** 12)), batch)
    assert leaves_equal(plain.trainable, new.trainable) and leaves_equal(plain.opt_state, new.opt_state)
    assert torch.equal(plain_metrics["train/loss"], metrics["train/loss"])  # logged loss is unscaled
    assert metrics["train/skipped_step"].item() == 0.0 and metrics["train/loss_scale"].item() == 2.0 ** 12
    assert new.loss_scale["good_steps"].item() == 1 and new.loss_scale["scale"].item() == 2.0 ** 12


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off():
    state, step, _ = setup()
    batch = micro_batches(*batch_rows(4), 4)
    # 3e38 times the loss overflows fp32 in the backward: the gradient is inf/NaN.
    start = scaled(state, LossScaling(init_scale=3e38))
    new, metrics = step(start, batch)
    assert new.step == 1  # the data was consumed and the step counted
    assert leaves_equal(new.trainable, start.trainable)  # params untouched
    assert leaves_equal(new.opt_state, start.opt_state)  # so are the moments and the bias-correction count
    assert metrics["train/skipped_step"].item() == 1.0 and torch.isfinite(metrics["train/loss"])
    assert new.loss_scale["scale"].item() == pytest.approx(1.5e38)
    assert new.loss_scale["skipped_steps"].item() == 1 and new.loss_scale["good_steps"].item() == 0
    # Backing off until the gradient fits, then training resumes.
    state = new
    for _ in range(12):
        state, metrics = step(state, batch)
    assert metrics["train/skipped_step"].item() == 0.0
    assert not leaves_equal(state.trainable, start.trainable)


def test_the_scale_grows_after_growth_interval_finite_steps():
    s = LossScaling(init_scale=8.0, growth_interval=3).init()
    finite, overflow = torch.tensor(True), torch.tensor(False)
    for expected_scale, expected_good in ((8.0, 1), (8.0, 2), (16.0, 0), (16.0, 1)):
        s = next_loss_scale(s, finite)
        assert (s["scale"].item(), s["good_steps"].item()) == (expected_scale, expected_good)
    s = next_loss_scale(s, overflow)
    assert (s["scale"].item(), s["good_steps"].item(), s["skipped_steps"].item()) == (8.0, 0, 1)


def test_all_finite_sees_inf_and_nan_anywhere_in_the_tree():
    tree = {"a": torch.ones(3), "b": {"c": torch.zeros(2, 2)}}
    assert all_finite(tree).item()
    for bad in (float("inf"), float("-inf"), float("nan")):
        tree["b"]["c"][1, 1] = bad
        assert not all_finite(tree).item()


@pytest.mark.parametrize("bad", [
    dict(init_scale=0.0), dict(growth_factor=1.0), dict(backoff_factor=1.0), dict(growth_interval=0)])
def test_invalid_loss_scaling_is_refused(bad):
    with pytest.raises(ValueError, match="invalid loss scaling"):
        LossScaling(**bad)


def test_fp16_autocast_with_loss_scaling_tracks_fp32_and_keeps_fp32_master_weights():
    # SGD, whose update is proportional to the gradient (Adam's first step is sign(g) * lr, which
    # flips where a gradient entry is near zero and says little about the gradient's accuracy).
    state, step, _ = setup(optimizer=sgd(0.5))
    batch = micro_batches(*batch_rows(4), 2)
    reference, ref_metrics = step(state, batch)
    plan = resolve_precision(fp16=True, device="cpu")
    assert plan.autocast_dtype == torch.float16 and plan.loss_scaling and plan.param_dtype == torch.float32
    with autocast_context(plan, "cpu"):
        new, metrics = step(scaled(state, LossScaling()), batch)
    assert metrics["train/skipped_step"].item() == 0.0
    assert all(t.dtype == torch.float32 for t in tree_leaves(new.trainable))
    # fp16 keeps 11 mantissa bits (2**-11 ~ 5e-4 relative per op): loss and gradient norm stay
    # within 1e-2 of fp32 on this two-layer model.
    assert metrics["train/loss"].item() == pytest.approx(ref_metrics["train/loss"].item(), rel=1e-2)
    assert metrics["train/grad_norm"].item() == pytest.approx(ref_metrics["train/grad_norm"].item(), rel=1e-2)
    start = tree_leaves(state.trainable)
    delta16 = torch.cat([(a - s).flatten() for a, s in zip(tree_leaves(new.trainable), start)])
    delta32 = torch.cat([(b - s).flatten() for b, s in zip(tree_leaves(reference.trainable), start)])
    assert ((delta16 - delta32).norm() / delta32.norm()).item() < 1e-2
