"""The preallocated KV cache: decoding into it in place gives what the concatenating cache gives."""
import pytest
import torch

from pure import rng
from pure.models import empty_cache, forward, init, preallocated_cache
from tests.tiny import TINY


def test_decoding_into_a_preallocated_cache_equals_the_concatenating_cache():
    params = init(TINY, rng.key(0), dtype=torch.float64)
    prompt = torch.tensor([[0, 0, 5, 9, 14], [3, 8, 11, 2, 7]])
    segments = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (segments.cumsum(-1) - 1).clamp(min=0)
    first = forward(params, prompt, TINY, positions=positions, segment_ids=segments,
                    cache=empty_cache(TINY, 2, dtype=torch.float64), logits_at="last")
    rows = torch.tensor([0, 0, 1])  # the first prompt twice, as a rollout with n = 2 expands it
    grown = first.cache._replace(keys=tuple(k[rows] for k in first.cache.keys),
                                 values=tuple(v[rows] for v in first.cache.values),
                                 segment_ids=first.cache.segment_ids[rows])
    buffered = preallocated_cache(first.cache, capacity=9, rows=rows)
    assert buffered.length == 5 and buffered.keys[0].shape[2] == 9
    pos, token = positions[rows, -1:], first.logits[rows, -1].argmax(-1, keepdim=True)
    ones = torch.ones(3, 1, dtype=torch.long)
    for _ in range(4):
        pos = pos + 1
        a = forward(params, token, TINY, positions=pos, segment_ids=ones, cache=grown, logits_at="last")
        b = forward(params, token, TINY, positions=pos, segment_ids=ones, cache=buffered, logits_at="last")
        assert torch.allclose(a.logits, b.logits, atol=1e-12, rtol=0)  # float64: only the op order may differ
        grown, buffered, token = a.cache, b.cache, a.logits[:, -1].argmax(-1, keepdim=True)
    assert buffered.length == 9


def test_a_cache_cannot_be_preallocated_below_its_length():
    cache = empty_cache(TINY, 1)._replace(segment_ids=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="capacity 3 is below the 4 tokens"):
        preallocated_cache(cache, capacity=3)
