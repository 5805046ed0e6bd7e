"""Off-policy corrections of GRPO (TRL's vLLM IS correction, OPSM, the bias-corrected KL) against
float64 references written from TRL's formulas, and their place in the loss on a tiny model."""
import math

import pytest
import torch

from pure import rng
from pure.data.rollout_batch import collate_rollouts
from pure.losses import grpo_token_losses, make_grpo
from pure.losses.grpo import IS_MODES, importance_sampling_ratio, off_policy_mask, sampling_metrics
from pure.models.llama import init
from pure.train import make_apply
from tests.tiny import TINY

F64 = 1e-10  # float64 reference vs the same float64 math

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
OLD = torch.tensor([[-1.0, -0.5, -2.0, -9.0], [-0.3, -1.2, -7.0, -7.0], [-0.8, -0.9, -1.1, -0.2]],
                   dtype=torch.float64)
# the sampler's log-probs: row 0 close, row 1 far below old (ratio > cap), row 2 above old
SAMPLING = OLD + torch.tensor([[0.1, -0.2, 0.05, 5.0], [-0.9, -0.8, 3.0, 3.0], [0.3, 0.2, 0.4, 0.1]],
                              dtype=torch.float64)


def reference_ratio(mode, cap_max, cap_min=None):
    """TRL's `vllm_importance_sampling_ratio`, written out row by row in float64."""
    rows = []
    for i in range(3):
        m = MASK[i]
        d = [(OLD[i, t] - SAMPLING[i, t]).item() * m[t].item() for t in range(4)]
        values = [math.exp(sum(d))] if mode.startswith("sequence") else [math.exp(x) for x in d]
        lo, hi = (-math.inf if cap_min is None else cap_min), (math.inf if cap_max is None else cap_max)
        if mode.endswith("truncate"):
            values = [min(max(v, lo), hi) for v in values]
        else:
            values = [0.0 if (v < lo or v > hi) else v for v in values]
        rows.append(values)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("cap_min", [None, 0.9])
def test_importance_sampling_ratio_is_trls(mode, cap_min):
    got = importance_sampling_ratio(OLD, SAMPLING, MASK, mode, cap_max=3.0, cap_min=cap_min)
    want = reference_ratio(mode, 3.0, cap_min)
    assert got.shape == ((3, 1) if mode.startswith("sequence") else (3, 4))
    torch.testing.assert_close(got, want, atol=F64, rtol=0)
    # the fixture exercises both bounds: something is capped or masked in every mode
    uncapped = reference_ratio(mode.split("_")[0] + "_truncate", None)
    assert not torch.equal(got, uncapped)


def test_importance_sampling_ratio_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="sequence_mask"):
        importance_sampling_ratio(OLD, SAMPLING, MASK, "token_clip")


def test_off_policy_mask_drops_negative_advantage_rows_past_the_threshold():
    logps = OLD.clone()
    adv = torch.tensor([-1.0, -1.0, 0.5], dtype=torch.float64)
    keep = off_policy_mask(adv, logps, SAMPLING, MASK, threshold=0.0)
    # mean (sampling - logps) over active tokens: row 0 -0.05/3 (kept), row 1 -0.85 (kept), row 2 0.25 but A >= 0
    torch.testing.assert_close(keep, torch.tensor([[1.0], [1.0], [1.0]], dtype=torch.float64))
    flipped = off_policy_mask(adv, logps, OLD - (SAMPLING - OLD), MASK, threshold=0.0)
    torch.testing.assert_close(flipped, torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64))
    # negated advantages: rows 0, 1 kept (A > 0); row 2 (mean -0.25) drops once the threshold is below it
    assert off_policy_mask(-adv, logps, OLD - (SAMPLING - OLD), MASK, threshold=-0.3).tolist() == [[1.0], [1.0], [0.0]]


def trl_per_token_loss(logps, old, ref, adv, mask, is_ratio, sampling, threshold, bias_kl, beta, eps=0.2):
    """TRL's `_compute_loss` for loss_type grpo at token level, step by step (float64)."""
    A = adv[:, None]
    kl_div = sampling - logps.detach()
    avg = (kl_div * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    opsm = ((A >= 0) | (avg <= threshold)).double()
    coef_1 = torch.exp(logps - old)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    if bias_kl:
        kl = kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    loss = -torch.min(coef_1 * A, coef_2 * A)
    loss = loss * opsm
    loss = loss * is_ratio
    return loss + beta * kl


@pytest.mark.parametrize("bias_kl", [False, True])
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_token_losses_apply_the_corrections_in_trls_order(bias_kl, mode):
    logps = (OLD + torch.tensor([[0.3, -0.1, 0.2, 0.0], [0.05, -0.4, 0.0, 0.0], [-0.3, 0.1, 0.25, 0.6]],
                                dtype=torch.float64)).requires_grad_(True)
    ref = OLD - 0.1
    adv = torch.tensor([0.8, -0.6, -0.2], dtype=torch.float64)
    is_ratio = importance_sampling_ratio(OLD, SAMPLING, MASK, mode)
    got, parts = grpo_token_losses(logps, OLD, ref, adv, MASK, loss_type="grpo", beta=0.05, is_ratio=is_ratio,
                                   sampling_logps=SAMPLING, off_policy_mask_threshold=0.05,
                                   use_bias_correction_kl=bias_kl)
    want = trl_per_token_loss(logps, OLD, ref, adv, MASK, is_ratio, SAMPLING, 0.05, bias_kl, 0.05)
    torch.testing.assert_close(got, want, atol=F64, rtol=0)
    g_got, = torch.autograd.grad((got * MASK).sum(), logps)
    g_want, = torch.autograd.grad((want * MASK).sum(), logps)
    torch.testing.assert_close(g_got, g_want, atol=F64, rtol=0)
    # row 2 (A < 0) has mean sampling - logps 0.0875 > 0.05: dropped
    assert parts["off_policy_mask"].tolist() == [[1.0], [1.0], [0.0]]
    # each piece matters: without it the loss differs
    for off in ({"is_ratio": None}, {"off_policy_mask_threshold": None}, {"use_bias_correction_kl": not bias_kl}):
        kwargs = dict(is_ratio=is_ratio, sampling_logps=SAMPLING, off_policy_mask_threshold=0.05,
                      use_bias_correction_kl=bias_kl) | off
        other, _ = grpo_token_losses(logps, OLD, ref, adv, MASK, loss_type="grpo", beta=0.05, **kwargs)
        assert not torch.allclose(other, got), off


def test_off_policy_mask_falls_back_to_the_old_logps():
    logps = (OLD + 0.5).requires_grad_(True)
    adv = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64)
    got, parts = grpo_token_losses(logps, OLD, None, adv, MASK, loss_type="grpo", off_policy_mask_threshold=-0.4)
    # mean(old - logps) = -0.5 <= -0.4 for every row: all kept
    assert parts["off_policy_mask"].tolist() == [[1.0], [1.0], [1.0]]
    _, parts = grpo_token_losses(logps, OLD, None, adv, MASK, loss_type="grpo", off_policy_mask_threshold=-0.6)
    assert parts["off_policy_mask"].tolist() == [[0.0], [0.0], [0.0]]


def test_sampling_metrics_are_trls_over_all_micro_batches():
    mode = "token_mask"
    ratio = importance_sampling_ratio(OLD, SAMPLING, MASK, mode)
    halves = [{"old_logps": OLD[s], "sampling_logps": SAMPLING[s], "completion_mask": MASK[s], "is_ratio": ratio[s]}
              for s in (slice(0, 1), slice(1, 3))]
    got = sampling_metrics(halves, mode)
    active = MASK > 0
    delta = (OLD - SAMPLING).abs()[active]
    flat = ratio[active]
    assert got["sampling/sampling_logp_difference/mean"] == pytest.approx(delta.mean().item(), abs=F64)
    assert got["sampling/sampling_logp_difference/max"] == pytest.approx(delta.max().item(), abs=F64)
    assert got["sampling/importance_sampling_ratio/min"] == pytest.approx(flat.min().item(), abs=F64)
    assert got["sampling/importance_sampling_ratio/mean"] == pytest.approx(flat.mean().item(), abs=F64)
    assert got["sampling/importance_sampling_ratio/max"] == pytest.approx(flat.max().item(), abs=F64)
    seq = importance_sampling_ratio(OLD, SAMPLING, MASK, "sequence_truncate")
    got = sampling_metrics([{"old_logps": OLD, "sampling_logps": SAMPLING, "completion_mask": MASK, "is_ratio": seq}],
                           "sequence_truncate")
    assert got["sampling/importance_sampling_ratio/mean"] == pytest.approx(seq.mean().item(), abs=F64)


def test_collate_rollouts_carries_the_sampling_logps():
    mb = collate_rollouts([[5, 6], [7]], [[1, 2, 3], [4]], [0.5, -0.5], 0, sampling_logps=[[-0.1, -0.2, -0.3], [-0.4]])
    torch.testing.assert_close(mb["sampling_logps"], torch.tensor([[-0.1, -0.2, -0.3], [-0.4, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        collate_rollouts([[5, 6], [7]], [[1, 2, 3], [4]], [0.5, -0.5], 0, sampling_logps=[[-0.1, -0.2, -0.3], []])


def test_make_grpo_reads_the_is_ratio_and_reports_the_dropped_rows():
    params = init(TINY, rng.key(0))
    policy = make_apply(TINY, params)({})
    mb = collate_rollouts([[3, 4, 5], [6, 7]], [[8, 9, 10], [11, 12]], [1.0, -1.0], 0,
                          sampling_logps=[[-30.0, -30.0, -30.0], [0.0, 0.0]])
    loss = make_grpo("bnpo", off_policy_mask_threshold=0.5)
    totals = loss.count_fn([mb])
    plain, _ = make_grpo("bnpo").on_batch(policy, mb)
    value, metrics = loss.on_batch(policy, mb)
    # row 1 (A < 0) has sampling log-probs far above the policy's: dropped; row 0 has A > 0: kept
    assert metrics["off_policy_mask/dropped_ratio"].item() == pytest.approx(0.5)
    assert not torch.allclose(value, plain)
    weighted, _ = make_grpo("bnpo").on_batch(policy, {**mb, "is_ratio": torch.full((2, 1), 2.0)})
    torch.testing.assert_close(weighted, 2 * plain)  # fp32: a factor 2 is exact
    assert int(totals["total_rows"]) == 2
