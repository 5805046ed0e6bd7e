"""Group advantages as TRL's GRPOTrainer computes them: hand-computed numbers with None (NaN)
rewards, unscorable rows, every scale_rewards mode, and GDPO's normalize_then_sum."""
import math
import statistics

import pytest
import torch

from pure.advantages import all_zero_advantages, group_advantages, nanstd, reward_metrics

F64 = 1e-12  # float64 arithmetic vs the same arithmetic written out by hand
NAN = float("nan")
EPS = 1e-4  # TRL's std guard

# Two prompts x three generations, two reward functions with weights (1, 0.5). Row 1's second
# function returned None; row 2 is unscorable (both None).
REWARDS = torch.tensor([[1.0, 2.0], [0.0, NAN], [NAN, NAN],
                        [2.0, 0.0], [1.0, 4.0], [0.5, 2.0]], dtype=torch.float64)
WEIGHTS = [1.0, 0.5]
# Weighted sums, None terms skipped: [1 + 1, 0, NaN, 2, 1 + 2, 0.5 + 1]
R = [2.0, 0.0, None, 2.0, 3.0, 1.5]
GROUP_MEAN = [1.0, 1.0, 1.0, 6.5 / 3, 6.5 / 3, 6.5 / 3]
# Bessel-corrected stds: group 0 of {2, 0}: sqrt(2); group 1 of {2, 3, 1.5}: sqrt(7/12); batch of
# the five scored rewards (mean 1.7, squared deviations summing to 4.8): sqrt(4.8 / 4) = sqrt(1.2).
GROUP_STD = [math.sqrt(2)] * 3 + [math.sqrt(7 / 12)] * 3
BATCH_STD = math.sqrt(1.2)


def expected(scale):
    out = []
    for r, m, s in zip(R, GROUP_MEAN, GROUP_STD):
        if r is None:
            out.append(0.0)  # unscorable: no signal
        elif scale == "group":
            out.append((r - m) / (s + EPS))
        elif scale == "batch":
            out.append((r - m) / (BATCH_STD + EPS))
        else:
            out.append(r - m)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
def test_sum_then_normalize_hand_computed(scale):
    got = group_advantages(REWARDS, WEIGHTS, 3, scale_rewards=scale)
    name = {True: "group", False: "none"}.get(scale, scale)
    torch.testing.assert_close(got.advantages, expected(name), atol=F64, rtol=0)
    torch.testing.assert_close(got.rewards, torch.tensor([NAN if r is None else r for r in R], dtype=torch.float64),
                               equal_nan=True)
    assert not got.std_is_zero.any()


def test_stds_are_bessel_corrected_and_match_statistics_stdev():
    assert abs(math.sqrt(7 / 12) - statistics.stdev([2.0, 3.0, 1.5])) < F64
    assert abs(BATCH_STD - statistics.stdev([2.0, 0.0, 2.0, 3.0, 1.5])) < F64
    assert torch.isnan(nanstd(torch.tensor([1.0, NAN], dtype=torch.float64)))  # one value: NaN, as TRL's


def test_unscorable_row_gets_zero_and_is_left_out_of_the_baseline():
    got = group_advantages(REWARDS, WEIGHTS, 3)
    assert got.advantages[2] == 0
    # Had the unscorable row counted as reward 0, group 0's mean would be 2/3, not 1.
    assert got.advantages[0] == -got.advantages[1]


def test_a_group_with_one_scored_completion_gets_zero_advantages():
    rewards = torch.tensor([[1.0], [NAN], [NAN], [0.0], [1.0], [1.0]], dtype=torch.float64)
    got = group_advantages(rewards, [1.0], 3)
    assert got.advantages[:3].tolist() == [0.0, 0.0, 0.0]  # NaN std -> NaN -> 0
    assert not got.std_is_zero[:3].any()  # isclose(NaN, 0) is False, as in TRL


def test_zero_std_groups_and_all_zero_advantages():
    rewards = torch.tensor([[1.0], [1.0], [1.0], [0.0], [1.0], [0.5]], dtype=torch.float64)
    got = group_advantages(rewards, [1.0], 3)
    assert got.std_is_zero.tolist() == [True] * 3 + [False] * 3
    assert got.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert not all_zero_advantages(got.advantages)
    same = group_advantages(torch.ones(6, 1, dtype=torch.float64), [1.0], 3)
    assert all_zero_advantages(same.advantages)
    assert not all_zero_advantages(torch.tensor([0.0, 1e-30]))
    metrics = reward_metrics(rewards, [1.0], ["acc"], got)
    assert metrics["frac_reward_zero_std"] == 0.5


def test_normalize_then_sum_hand_computed():
    """GDPO: z-score each function within its group, weighted nansum, then normalise over the batch.
    Function 2 has one score in group 0 (row 0), so its std there is NaN and it adds nothing to row 0."""
    g0_f1 = [(1.0 - 0.5) / (math.sqrt(0.5) + EPS), (0.0 - 0.5) / (math.sqrt(0.5) + EPS)]
    s1 = math.sqrt(7 / 12) + EPS  # function 1 in group 1: {2, 1, 0.5}, mean 7/6
    g1_f1 = [(2.0 - 7 / 6) / s1, (1.0 - 7 / 6) / s1, (0.5 - 7 / 6) / s1]
    g1_f2 = [(0.0 - 2.0) / (2.0 + EPS), (4.0 - 2.0) / (2.0 + EPS), 0.0]  # {0, 4, 2}: mean 2, std 2
    S = [g0_f1[0], g0_f1[1]] + [a + 0.5 * b for a, b in zip(g1_f1, g1_f2)]
    mean, std = statistics.mean(S), statistics.stdev(S)
    want = [(S[0] - mean) / (std + EPS), (S[1] - mean) / (std + EPS), 0.0] + [(s - mean) / (std + EPS) for s in S[2:]]
    for scale in ("group", "batch", "none"):  # scale_rewards is not read by normalize_then_sum, as in TRL
        got = group_advantages(REWARDS, WEIGHTS, 3, aggregation="normalize_then_sum", scale_rewards=scale)
        torch.testing.assert_close(got.advantages, torch.tensor(want, dtype=torch.float64), atol=F64, rtol=0)
    # The rewards it reports are the raw weighted sums, as TRL logs them.
    torch.testing.assert_close(got.rewards, group_advantages(REWARDS, WEIGHTS, 3).rewards, equal_nan=True)


def test_gdpo_with_one_reward_is_grpo_renormalised_over_the_batch():
    """With one reward function of weight 1 and every row scored, GDPO's per-function z-scores are
    exactly GRPO's group advantages A, whose batch mean is 0 (each group's deviations sum to 0), so
    GDPO = A / (std(A) + 1e-4): the same advantages up to one positive factor per batch."""
    rewards = torch.tensor([[0.2], [1.0], [0.7], [0.0], [0.0], [1.0], [3.0], [1.5], [2.0]], dtype=torch.float64)
    grpo = group_advantages(rewards, [1.0], 3).advantages
    gdpo = group_advantages(rewards, [1.0], 3, aggregation="normalize_then_sum").advantages
    assert abs(grpo.mean()) < F64
    torch.testing.assert_close(gdpo, grpo / (statistics.stdev(grpo.tolist()) + EPS), atol=F64, rtol=0)


def test_reward_metrics_names_and_values():
    got = group_advantages(REWARDS, WEIGHTS, 3)
    metrics = reward_metrics(REWARDS, WEIGHTS, ["format", "accuracy"], got)
    assert set(metrics) == {"reward", "reward_std", "rewards/format/mean", "rewards/format/std",
                            "rewards/accuracy/mean", "rewards/accuracy/std", "frac_reward_zero_std"}
    assert abs(metrics["rewards/format/mean"] - statistics.mean([1.0, 0.0, 2.0, 1.0, 0.5])) < F64
    assert abs(metrics["rewards/format/std"] - statistics.stdev([1.0, 0.0, 2.0, 1.0, 0.5])) < F64
    assert abs(metrics["rewards/accuracy/mean"] - statistics.mean([2.0, 0.0, 4.0, 2.0])) < F64
    assert abs(metrics["rewards/accuracy/std"] - statistics.stdev([2.0, 0.0, 4.0, 2.0])) < F64
    assert abs(metrics["reward"] - 1.7) < F64 and abs(metrics["reward_std"] - BATCH_STD) < F64
    assert metrics["frac_reward_zero_std"] == 0.0


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(REWARDS, WEIGHTS, 4)
    with pytest.raises(ValueError, match="one weight per function"):
        group_advantages(REWARDS, [1.0], 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(REWARDS, WEIGHTS, 3, scale_rewards="row")
    with pytest.raises(ValueError, match="aggregation"):
        group_advantages(REWARDS, WEIGHTS, 3, aggregation="max")
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        group_advantages(REWARDS[:, 0], WEIGHTS, 3)
    with pytest.raises(ValueError, match="reward names"):
        reward_metrics(REWARDS, WEIGHTS, ["format"], group_advantages(REWARDS, WEIGHTS, 3))
