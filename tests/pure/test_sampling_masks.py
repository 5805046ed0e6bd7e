"""The rollout logit processing, against hand-computed examples: repetition penalty, top-k, top-p,
min-p, and drawing with the processed log-probs."""
import math

import pytest
import torch

from pure import rng
from pure.sampling import (apply_repetition_penalty, inverse_cdf, min_p_mask, process_logits, sample_with_logprobs,
                           token_presence, top_k_mask, top_p_mask)

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero()[:, 0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_previous_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    previous = torch.tensor([[0, 1, 1, -1, -1]])  # repeats count once; -1 is padding
    out = apply_repetition_penalty(logits, previous, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]
    assert torch.equal(apply_repetition_penalty(logits, previous, 1.0), logits)


def test_token_presence_marks_each_rows_tokens_and_ignores_padding():
    present = token_presence(torch.tensor([[2, 0, -1], [-1, -1, 3]]), 4)
    assert present.tolist() == [[True, False, True, False], [False, False, False, True]]


def test_top_k_keeps_the_k_largest():
    assert kept(top_k_mask(LOGITS, 2)) == [0, 1]
    assert kept(top_k_mask(LOGITS, 1)) == [0]
    assert kept(top_k_mask(LOGITS, 0)) == [0, 1, 2, 3]  # 0 is off


def test_top_p_keeps_the_smallest_set_reaching_p_and_at_least_one_token():
    assert kept(top_p_mask(LOGITS, 0.3)) == [0]
    assert kept(top_p_mask(LOGITS, 0.75)) == [0, 1]
    assert kept(top_p_mask(LOGITS, 0.9)) == [0, 1, 2]
    assert kept(top_p_mask(LOGITS, 1e-6)) == [0]
    assert kept(top_p_mask(LOGITS, 1.0)) == [0, 1, 2, 3]
    shuffled = LOGITS[:, [2, 0, 3, 1]]  # the nucleus is found whatever the vocabulary order
    assert kept(top_p_mask(shuffled, 0.75)) == [1, 3]


def test_min_p_drops_tokens_below_min_p_times_the_top_probability():
    assert kept(min_p_mask(LOGITS, 0.2)) == [0, 1, 2]  # threshold 0.1
    assert kept(min_p_mask(LOGITS, 0.5)) == [0, 1]  # threshold 0.25
    assert kept(min_p_mask(LOGITS, 0.0)) == [0, 1, 2, 3]


def test_process_logits_penalises_then_scales_then_truncates():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    present = torch.tensor([[True, False, False, False]])
    out = process_logits(logits, temperature=0.5, top_k=3, present=present, repetition_penalty=4.0)
    assert out[0, :3].tolist() == [1.0, 2.0, 0.0] and out[0, 3] == float("-inf")
    greedy = process_logits(logits, temperature=0.0, top_k=1, present=present, repetition_penalty=4.0)
    assert greedy.tolist() == [[0.5, 1.0, 0.0, -1.0]]  # greedy: the penalty only, no truncation


def test_inverse_cdf_hits_each_token_in_proportion_and_never_a_zero_weight_one():
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 2.0, 0.0]])
    u = torch.linspace(0, 1 - 2**-53, 600, dtype=torch.float64)[:, None]
    for block in (1, 3, 256):  # the two-level search does not depend on the block size
        counts = torch.bincount(inverse_cdf(weights.expand(600, 8), u, block=block), minlength=8)
        assert counts.tolist() == [0, 100, 0, 300, 0, 0, 200, 0]


def test_samples_follow_the_processed_distribution_and_report_its_logprob():
    logits = torch.tensor([[0.0, math.log(3.0), math.log(6.0), -5.0]]).expand(6000, 4)
    tokens, logprobs = sample_with_logprobs(logits, rng.key(0), top_k=3)
    share = torch.bincount(tokens, minlength=4) / 6000
    # 6000 draws: the standard error of a share is below 0.007, so 0.03 is > 4 sigma
    assert torch.allclose(share, torch.tensor([0.1, 0.3, 0.6, 0.0]), atol=0.03)
    expected = torch.tensor([0.1, 0.3, 0.6]).log()[tokens]
    assert torch.allclose(logprobs, expected, atol=1e-6)  # fp32 log-softmax of exact values


def test_top_k_one_sampling_is_greedy_and_greedy_reports_the_log_softmax_at_the_argmax():
    logits = rng.normal(rng.key(1), (16, 50), dtype=torch.float64)
    tokens, logprobs = sample_with_logprobs(logits, rng.key(2), temperature=0.8, top_k=1)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.equal(logprobs, torch.zeros(16, dtype=torch.float64))  # all mass on one token
    greedy, greedy_logprobs = sample_with_logprobs(logits, None, temperature=0.0)
    assert torch.equal(greedy, logits.argmax(-1))
    expected = logits.log_softmax(-1).gather(-1, greedy[:, None])[:, 0]
    assert torch.allclose(greedy_logprobs, expected, atol=1e-12)  # float64


def test_sampling_is_a_function_of_the_key():
    logits = rng.normal(rng.key(3), (8, 50))
    a = sample_with_logprobs(logits, rng.key(4), top_p=0.9)
    b = sample_with_logprobs(logits, rng.key(4), top_p=0.9)
    c = sample_with_logprobs(logits, rng.key(5), top_p=0.9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_a_sampled_token_is_always_inside_the_truncated_set(top_p):
    logits = rng.normal(rng.key(6), (64, 200))
    processed = process_logits(logits, temperature=0.7, top_p=top_p, min_p=0.01)
    tokens, logprobs = sample_with_logprobs(logits, rng.key(7), temperature=0.7, top_p=top_p, min_p=0.01)
    assert torch.isfinite(processed.gather(-1, tokens[:, None])).all() and torch.isfinite(logprobs).all()
