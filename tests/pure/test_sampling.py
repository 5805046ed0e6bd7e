"""Sampling with the KV cache: batching with left padding changes nothing; the key decides."""
import torch

from pure import rng
from pure.models import ModelConfig, init
from pure.sampling import generate_tokens, sample_logits

CONFIG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


def run(params, prompts, **kw):
    return torch.stack(list(generate_tokens(params, CONFIG, prompts, max_new_tokens=6, **kw)), dim=1)


def test_left_padded_batch_decodes_each_row_as_alone():
    params = init(CONFIG, rng.key(0))
    prompts = [[5, 9, 14, 3, 7], [11, 2]]
    together = run(params, prompts)
    for i, p in enumerate(prompts):
        alone = run(params, [p])
        assert torch.equal(together[i], alone[0])


def test_sampling_is_a_function_of_the_key():
    params = init(CONFIG, rng.key(0))
    a = run(params, [[1, 2, 3]], key=rng.key(4), temperature=1.0)
    b = run(params, [[1, 2, 3]], key=rng.key(4), temperature=1.0)
    c = run(params, [[1, 2, 3]], key=rng.key(5), temperature=1.0)
    torch.manual_seed(123)
    d = run(params, [[1, 2, 3]], key=rng.key(4), temperature=1.0)
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = rng.normal(rng.key(1), (8, 50))
    assert torch.equal(sample_logits(logits, rng.key(2), 1.0, top_k=1), logits.argmax(-1))
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(200, 4)
    drawn = torch.stack([sample_logits(probs, k, 1.0, top_p=0.7) for k in rng.split(rng.key(3), 20)])
    assert set(drawn.unique().tolist()) <= {0, 1}


def test_generation_stops_at_eos():
    params = init(CONFIG, rng.key(0))
    first = run(params, [[1, 2, 3]])[0, 0].item()
    steps = list(generate_tokens(params, CONFIG, [[1, 2, 3]], max_new_tokens=6, eos_token_ids=[first]))
    assert len(steps) == 1
