"""The native rollout engine against full forwards without a cache: greedy tokens, processed
log-probs, stop tokens, key-reproducibility and prompt-major order."""
import dataclasses

import pytest
import torch

from backends.rollout import Rollouts, Sampling
from backends.rollout.native import NativeEngine
from pure import rng
from pure.lora import LoraConfig, init_lora
from pure.models import forward, init
from pure.sampling import process_logits, token_presence
from tests.tiny import TINY

PROMPTS = [[5, 9, 14, 3, 7], [11, 2], [40, 41, 42]]


def tiny_policy(dtype=torch.float64):
    """Random float64 params and a LoRA delta with B != 0, so the adapter changes the function."""
    params = init(TINY, rng.key(0), dtype=dtype)
    lora_config = LoraConfig(r=2, alpha=4)
    lora = init_lora(params, lora_config, rng.key(1), target_linear=True, dtype=dtype)
    lora = {p: dict(e, B=rng.normal(rng.fold_in(rng.key(2), i), e["B"].shape, dtype=dtype, std=0.05))
            for i, (p, e) in enumerate(lora.items())}
    return params, lora, lora_config


def full_logits(params, lora, lora_config, sequence):
    """Last-position logits [V] of one sequence, by a full forward with no cache and no padding."""
    out = forward(params, torch.tensor([sequence]), TINY, lora=lora, lora_config=lora_config)
    return out.logits[0, -1]


def test_greedy_rollouts_equal_argmax_over_full_forwards():
    params, lora, lora_config = tiny_policy()
    # half the params frozen, half in the policy: the engine binds one over the other
    frozen = {k: v for i, (k, v) in enumerate(sorted(params.items())) if i % 2}
    trainable = {k: v for k, v in params.items() if k not in frozen}
    engine = NativeEngine(TINY, frozen, lora_config=lora_config)
    out = engine.generate({"params": trainable, "lora": lora}, PROMPTS, 2, Sampling(max_tokens=6, temperature=0.0),
                          rng.key(3))
    assert out.prompt_ids == [p for p in PROMPTS for _ in range(2)]
    assert out.finish_reasons == ["length"] * 6
    for prompt, completion in zip(out.prompt_ids, out.completion_ids):
        sequence = list(prompt)
        for token in completion:
            assert token == int(full_logits(params, lora, lora_config, sequence).argmax())
            sequence.append(token)
        assert len(completion) == 6


def test_logprobs_are_the_processed_log_softmax_of_full_forwards_at_the_sampled_tokens():
    params, lora, lora_config = tiny_policy()
    sampling = Sampling(max_tokens=5, temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3)
    engine = NativeEngine(TINY, params, lora_config=lora_config)
    out = engine.generate({"params": {}, "lora": lora}, PROMPTS, 3, sampling, rng.key(4))
    assert len(out) == 9
    for prompt, completion, logprobs in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        sequence = list(prompt)
        for token, logprob in zip(completion, logprobs):
            present = token_presence(torch.tensor([sequence]), TINY.vocab_size)
            processed = process_logits(full_logits(params, lora, lora_config, sequence)[None], temperature=0.7,
                                       top_k=20, top_p=0.9, min_p=0.02, present=present, repetition_penalty=1.3)
            expected = processed.log_softmax(-1)[0, token].item()
            assert abs(logprob - expected) < 1e-10  # float64 params: cache vs no cache differ in op order only
            sequence.append(token)


def test_fp32_logprobs_match_full_forwards_to_fp32_precision():
    params = init(TINY, rng.key(0))
    out = NativeEngine(TINY, params).generate({"params": {}}, PROMPTS[:2], 2, Sampling(max_tokens=4), rng.key(5))
    for prompt, completion, logprobs in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        sequence = list(prompt)
        for token, logprob in zip(completion, logprobs):
            expected = full_logits(params, None, None, sequence).log_softmax(-1)[token].item()
            assert abs(logprob - expected) < 1e-4  # fp32: cached vs full attention round differently
            sequence.append(token)


def test_same_key_gives_identical_rollouts_and_another_key_others():
    params = init(TINY, rng.key(0))
    engine = NativeEngine(TINY, params)
    sampling = Sampling(max_tokens=8, top_p=0.95)
    a = engine.generate({"params": {}}, PROMPTS, 4, sampling, rng.key(6))
    b = engine.generate({"params": {}}, PROMPTS, 4, sampling, rng.key(6))
    c = engine.generate({"params": {}}, PROMPTS, 4, sampling, rng.key(7))
    torch.manual_seed(99)  # torch's global generator plays no part
    d = engine.generate({"params": {}}, PROMPTS, 4, sampling, rng.key(6))
    assert a == b == d
    assert a.completion_ids != c.completion_ids
    assert len({tuple(x) for x in a.completion_ids}) > 1  # the n samples of a prompt differ


def test_stop_tokens_end_rows_with_the_stop_token_included():
    params = init(TINY, rng.key(0))
    stops = tuple(range(0, 61, 10))  # 7 of 61 tokens: some rows stop within 8 tokens, some do not
    sampling = Sampling(max_tokens=8, stop_token_ids=stops)
    out = NativeEngine(TINY, params).generate({"params": {}}, PROMPTS, 4, sampling, rng.key(8))
    assert set(out.finish_reasons) == {"stop", "length"}
    for completion, logprobs, reason in zip(out.completion_ids, out.logprobs, out.finish_reasons):
        assert len(logprobs) == len(completion)
        if reason == "stop":
            assert completion[-1] in stops and not set(completion[:-1]) & set(stops)
        else:
            assert len(completion) == 8 and not set(completion) & set(stops)


def test_all_rows_stopping_ends_the_rollout_early():
    params = init(TINY, rng.key(0))
    out = NativeEngine(TINY, params).generate({"params": {}}, PROMPTS, 2,
                                              Sampling(max_tokens=50, stop_token_ids=tuple(range(61))), rng.key(9))
    assert out.finish_reasons == ["stop"] * 6 and all(len(c) == 1 for c in out.completion_ids)


def test_chunks_of_max_batch_rows_keep_the_prompt_major_order():
    params = init(TINY, rng.key(0))
    greedy = Sampling(max_tokens=4, temperature=0.0)
    whole = NativeEngine(TINY, params).generate({"params": {}}, PROMPTS, 2, greedy, rng.key(10))
    chunked = NativeEngine(TINY, params, max_batch_rows=3).generate({"params": {}}, PROMPTS, 2, greedy, rng.key(10))
    assert chunked.prompt_ids == whole.prompt_ids and chunked.completion_ids == whole.completion_ids
    sampled = NativeEngine(TINY, params, max_batch_rows=2).generate({"params": {}}, PROMPTS, 2,
                                                                    Sampling(max_tokens=4), rng.key(10))
    again = NativeEngine(TINY, params, max_batch_rows=2).generate({"params": {}}, PROMPTS, 2,
                                                                  Sampling(max_tokens=4), rng.key(10))
    assert sampled == again


def test_rollouts_run_without_gradients():
    params = {k: v.requires_grad_() for k, v in init(TINY, rng.key(0)).items()}
    out = NativeEngine(TINY, {}).generate({"params": params}, PROMPTS, 1, Sampling(max_tokens=2), rng.key(11))
    assert isinstance(out, Rollouts) and all(p.grad is None for p in params.values())


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, "max_tokens must be an integer >= 1"),
    ("temperature", -0.1, "temperature must be >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_k", -2, "top_k must be an integer >= 1, or 0 / -1 for off"),
    ("min_p", 1.5, r"min_p must be in \[0, 1\]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("stop_token_ids", [2], "stop_token_ids must be a tuple"),
])
def test_sampling_rejects_bad_settings(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(Sampling(max_tokens=4), **{field: value})


def test_generate_rejects_bad_prompts_and_batch_sizes():
    engine = NativeEngine(TINY, init(TINY, rng.key(0)), max_batch_rows=2)
    with pytest.raises(ValueError, match=r"prompt 1 must be a non-empty list of token ids in \[0, 61\)"):
        engine.generate({"params": {}}, [[1], [61]], 1, Sampling(max_tokens=2), rng.key(0))
    with pytest.raises(ValueError, match="n = 3 completions of one prompt do not fit max_batch_rows = 2"):
        engine.generate({"params": {}}, [[1]], 3, Sampling(max_tokens=2), rng.key(0))
