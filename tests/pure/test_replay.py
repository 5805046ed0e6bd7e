"""The replay buffer and deferred re-rolling of GRPO (pure.replay): TRL's score on hand-computed
numbers, the size-best buffer and its ties, score-proportional draws from a key, the re-roll queue."""
import copy
import json
import math

import pytest
import torch

from pure import rng
from pure.advantages import group_advantages
from pure.replay import (defer_prompts, fill_from_replay, has_signal, reroll_active, reroll_prompts,
                         replay_score, update_replay)

NAN = float("nan")


def group(prompt, rewards, advantages=None, **extra):
    """A group of len(rewards) completions; advantages default to rewards minus their mean."""
    n = len(rewards)
    if advantages is None:
        mean = sum(rewards) / n
        advantages = [r - mean for r in rewards]
    return {"prompt": prompt, "completion_ids": [[prompt, i] for i in range(n)], "rewards": list(rewards),
            "advantages": list(advantages), "sampling_logps": [[-0.5, -0.25] for _ in range(n)],
            "finish_reasons": ["stop"] * n, **extra}


def flat(prompt, value=0.0, n=4):
    return group(prompt, [value] * n, [0.0] * n)


# --- has_signal ---------------------------------------------------------------------------------

def test_has_signal_true_when_advantages_differ():
    assert has_signal(group(0, [1.0, 0.0, 0.0, 1.0]))


def test_has_signal_false_when_all_advantages_zero():
    assert not has_signal(flat(0, 1.0))


def test_has_signal_false_for_a_constant_group_despite_mean_rounding():
    # float32 rounding of the group mean leaves equal, nonzero advantages on a constant group
    G = 8
    advantages = group_advantages(torch.full((G, 1), 0.3), [1.0], G).advantages
    assert (advantages != 0).all()  # the case this rule is for
    assert not has_signal(group(0, [0.3] * G, advantages.tolist()))


def test_has_signal_skips_unscorable_completions():
    # the NaN-reward row has advantage 0; the scorable rows all carry the same rounding residue
    assert not has_signal(group(0, [0.3, 0.3, NAN], [1e-4, 1e-4, 0.0]))
    assert has_signal(group(0, [1.0, 0.0, NAN], [0.7, -0.7, 0.0]))


def test_has_signal_false_with_one_completion():
    assert not has_signal(group(0, [1.0], [0.5]))


def test_has_signal_from_advantages_when_weighted_rewards_tie():
    # GDPO: the weighted sums tie (reward std 0, TRL would skip it) but the advantages differ
    assert has_signal(group(0, [3.0, 3.0], [0.8, -0.8]))


# --- replay_score (TRL's formula) ---------------------------------------------------------------

def test_replay_score_is_trl_std_times_sum_abs_advantages():
    # rewards [1, 0, 0, 1]: mean 0.5, Bessel variance 4 * 0.25 / 3 = 1/3; Σ|A| = 1 + 1 + 1 + 1 = 4
    g = group(0, [1.0, 0.0, 0.0, 1.0], [1.0, -1.0, -1.0, 1.0])
    assert replay_score(g) == pytest.approx(4 / math.sqrt(3), rel=1e-12)
    # rewards [2, 0, 1]: mean 1, Bessel variance (1 + 1 + 0) / 2 = 1; Σ|A| = 0.5 + 0.25 + 0 = 0.75
    assert replay_score(group(1, [2.0, 0.0, 1.0], [0.5, -0.25, 0.0])) == pytest.approx(0.75, rel=1e-12)


def test_replay_score_matches_trl_tensor_expression():
    rewards = torch.tensor([[0.2, 0.9, 0.4, 0.4], [1.0, 3.0, 2.0, 0.0]], dtype=torch.float64)
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    advantages = advantages / (rewards.std(dim=1, keepdim=True) + 1e-4)
    group_std = rewards.std(dim=1, keepdim=True).expand_as(rewards)
    trl = (advantages.abs() * group_std).sum(dim=-1)  # update_replay_buffer's line
    for g in range(2):
        ours = replay_score(group(g, rewards[g].tolist(), advantages[g].tolist()))
        assert ours == pytest.approx(trl[g].item(), rel=1e-12)


def test_replay_score_skips_nan_rewards():
    # scorable rewards [1, 0]: std sqrt(0.5); Σ|A| over them = 2
    assert replay_score(group(0, [1.0, 0.0, NAN], [1.0, -1.0, 0.0])) == pytest.approx(math.sqrt(0.5) * 2)


# --- update_replay ------------------------------------------------------------------------------

def scores(buffer):
    return [g["score"] for g in buffer]


def prompts_of(groups):
    return [g["prompt"] for g in groups]


def test_update_replay_adds_only_groups_with_signal_with_their_score():
    groups = [group(0, [1.0, 0.0]), flat(1), group(2, [2.0, 0.0, 1.0])]
    buffer = update_replay([], groups, 10)
    assert prompts_of(buffer) == [0, 2]
    assert scores(buffer) == [replay_score(groups[0]), replay_score(groups[2])]


def test_update_replay_keeps_the_size_best_oldest_first():
    old = update_replay([], [group(0, [1.0, 0.0]), group(1, [4.0, 0.0])], 10)  # scores 0.71, 11.3
    new = [group(2, [2.0, 0.0]), group(3, [0.5, 0.0])]  # scores 2.83, 0.18
    buffer = update_replay(old, new, 2)
    assert prompts_of(buffer) == [1, 2]
    assert len(update_replay(old, new, 3)) == 3


@pytest.mark.parametrize("size", [0, None])
def test_update_replay_size_zero_or_none_is_empty(size):
    assert update_replay([], [group(0, [1.0, 0.0])], size) == []


def test_update_replay_negative_size_is_refused():
    with pytest.raises(ValueError, match="size"):
        update_replay([], [], -1)


def test_update_replay_ties_go_to_the_newer_group():
    g = [1.0, 0.0]
    buffer = update_replay([], [group(0, g)], 1)
    assert prompts_of(update_replay(buffer, [group(1, g)], 1)) == [1]  # a batch over the buffer
    assert prompts_of(update_replay([], [group(2, g), group(3, g)], 1)) == [3]  # later in the batch
    # and again when the tie is not at the boundary: the oldest of three equals leaves
    three = update_replay([], [group(4, g), group(5, g), group(6, g)], 2)
    assert prompts_of(three) == [5, 6]


def test_update_replay_does_not_mutate_its_inputs():
    buffer = update_replay([], [group(0, [1.0, 0.0])], 4)
    groups = [group(1, [3.0, 0.0]), flat(2)]
    before = copy.deepcopy((buffer, groups))
    update_replay(buffer, groups, 1)
    assert (buffer, groups) == before
    assert "score" not in groups[0]


def test_buffer_json_round_trip_is_equal():
    buffer = update_replay([], [group(0, [1.0, 0.0, 0.5]), group(1, [0.25, 0.75])], 4)
    assert json.loads(json.dumps(buffer)) == buffer
    # and a round-tripped buffer behaves the same
    new = [group(2, [2.0, 0.0])]
    assert update_replay(json.loads(json.dumps(buffer)), new, 2) == update_replay(buffer, new, 2)


# --- fill_from_replay ---------------------------------------------------------------------------

BUFFER = update_replay([], [group(10 + i, [float(i + 1), 0.0]) for i in range(5)], 5)


def test_fill_replaces_only_groups_without_signal_in_their_slots():
    batch = [flat(0), group(1, [1.0, 0.0]), flat(2)]
    out, replaced = fill_from_replay(batch, BUFFER, rng.key(0))
    assert replaced == 2
    assert out[1] is batch[1]
    assert prompts_of(out)[0] >= 10 and prompts_of(out)[2] >= 10
    assert out[0]["prompt"] != out[2]["prompt"]  # without replacement within one call


def test_fill_replayed_group_keeps_its_own_scores():
    out, _ = fill_from_replay([flat(0)], BUFFER, rng.key(1))
    source = next(g for g in BUFFER if g["prompt"] == out[0]["prompt"])
    for field in ("rewards", "advantages", "sampling_logps", "completion_ids", "finish_reasons"):
        assert out[0][field] == source[field]
    assert "score" not in out[0]


def test_fill_with_empty_buffer_replaces_nothing():
    batch = [flat(0), flat(1)]
    out, replaced = fill_from_replay(batch, [], rng.key(0))
    assert (out, replaced) == (batch, 0)


def test_fill_with_more_empty_groups_than_buffer_fills_the_first_slots():
    buffer = BUFFER[:2]
    batch = [flat(0), flat(1), group(2, [1.0, 0.0]), flat(3)]
    out, replaced = fill_from_replay(batch, buffer, rng.key(0))
    assert replaced == 2
    assert sorted(prompts_of(out[:2])) == [10, 11]
    assert out[2:] == batch[2:]


def test_fill_is_deterministic_for_a_key():
    batch = [flat(0), flat(1)]
    assert fill_from_replay(batch, BUFFER, rng.key(7)) == fill_from_replay(batch, BUFFER, rng.key(7))


def test_fill_draws_differ_with_the_key():
    batch = [flat(0), flat(1)]
    draws = {tuple(prompts_of(fill_from_replay(batch, BUFFER, rng.key(s))[0])) for s in range(20)}
    assert len(draws) > 1


def test_fill_draws_proportionally_to_score():
    # scores 1 : 3 (rewards [0, 1] and [0, 1] with |A| sums 1 and 3): the second about 75% of draws
    buffer = [dict(group(20, [1.0, 0.0]), score=1.0), dict(group(21, [1.0, 0.0]), score=3.0)]
    n = 2000
    picks = [fill_from_replay([flat(0)], buffer, rng.fold_in(rng.key(3), i))[0][0]["prompt"] for i in range(n)]
    share = picks.count(21) / n
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)


def test_fill_never_draws_a_zero_score_group_while_others_are_left():
    buffer = [dict(group(20, [1.0, 0.0]), score=0.0), dict(group(21, [1.0, 0.0]), score=1.0)]
    for s in range(30):
        assert fill_from_replay([flat(0)], buffer, rng.key(s))[0][0]["prompt"] == 21
    out, replaced = fill_from_replay([flat(0), flat(1)], buffer, rng.key(0))
    assert replaced == 2 and sorted(prompts_of(out)) == [20, 21]


def test_fill_does_not_mutate_its_inputs():
    batch = [flat(0), group(1, [1.0, 0.0])]
    buffer = copy.deepcopy(BUFFER)
    before = copy.deepcopy((batch, buffer))
    fill_from_replay(batch, buffer, rng.key(0))
    assert (batch, buffer) == before


# --- defer_prompts ------------------------------------------------------------------------------

def test_defer_appends_prompts_without_signal_oldest_first():
    groups = [flat(5), group(6, [1.0, 0.0]), flat(7), flat(5)]
    assert defer_prompts([3], groups) == [3, 5, 7]


def test_defer_does_not_duplicate_queued_prompts():
    assert defer_prompts([7, 3], [flat(3), flat(8)]) == [7, 3, 8]


def test_defer_does_not_mutate_the_queue():
    queue = [1]
    defer_prompts(queue, [flat(2)])
    assert queue == [1]


# --- reroll_prompts -----------------------------------------------------------------------------

def test_reroll_replaces_the_last_prompts_with_the_oldest_queued():
    prompts, queue = reroll_prompts([0, 1, 2, 3], [9, 8, 7], 2, True)
    assert prompts == [0, 1, 9, 8]
    assert queue == [7]


def test_reroll_skips_queued_prompts_already_in_the_generation():
    prompts, queue = reroll_prompts([0, 1, 2, 3], [2, 9], 2, True)
    assert prompts == [0, 1, 2, 9]
    assert queue == [2]


def test_reroll_inactive_leaves_both_unchanged():
    assert reroll_prompts([0, 1], [9], 1, False) == ([0, 1], [9])


def test_reroll_takes_at_most_what_is_queued_and_what_is_generated():
    assert reroll_prompts([0, 1, 2], [9], 5, True) == ([0, 1, 9], [])
    assert reroll_prompts([0], [9, 8], 5, True) == ([9], [8])
    assert reroll_prompts([0, 1], [], 1, True) == ([0, 1], [])
    assert reroll_prompts([0, 1], [9], 0, True) == ([0, 1], [9])


def test_reroll_does_not_mutate_its_inputs():
    prompts, queue = [0, 1, 2], [9, 8]
    reroll_prompts(prompts, queue, 1, True)
    assert (prompts, queue) == ([0, 1, 2], [9, 8])


# --- reroll_active ------------------------------------------------------------------------------

def test_reroll_active_from_the_fraction_of_training():
    assert [reroll_active(s, 10, 0.5) for s in (0, 4, 5, 9)] == [False, False, True, True]


def test_reroll_active_compares_with_the_decimal_fraction():
    assert 0.07 * 100 > 7  # 7.000000000000001: the float product would start one step late
    assert reroll_active(7, 100, 0.07)
    assert not reroll_active(6, 100, 0.07)


def test_reroll_active_fraction_one_is_never():
    assert not any(reroll_active(s, 10, 1.0) for s in range(12))


def test_reroll_active_fraction_zero_is_always():
    assert reroll_active(0, 10, 0.0)
