"""The vLLM server engine against the run's real vLLM server (tests/conftest.py: one per pytest
run, started by `python -m programs.vllm_serve` from `.venv-vllm`): its rollout log-probs against
our forward on the same tokens, seeded reproducibility, and our forward again after a LoRA sync and
after a full-weight sync, on prompts longer than one 16-token KV block (the stale-cache trap)."""
import pytest
import torch

from backends.rollout import Sampling
from backends.rollout.vllm_server import VllmServerEngine, VllmServerError, free_port, save_untied
from pure import rng

PROMPTS = ["Tell me three things about the sea and the sky, please, in order, and then say why each is true.",
           "What is the capital of France? Answer in one long sentence, with all of your reasons, and a date."]


@pytest.fixture(scope="module")
def served(vllm_server):
    """The run's server (tests/conftest.py) with what these tests compare against."""
    prompts = [vllm_server.tokenizer(p)["input_ids"] for p in PROMPTS]
    assert all(len(p) > 16 for p in prompts), [len(p) for p in prompts]
    engine = vllm_server.engine()
    yield {"engine": engine, "config": vllm_server.config, "params": vllm_server.params,
           "tokenizer": vllm_server.tokenizer, "root": vllm_server.root, "prompts": prompts, "port": vllm_server.port}
    # leave the server as it was started: the base weights, no adapter
    from backends.rollout.vllm_server import save_untied

    save_untied(vllm_server.params, vllm_server.config, vllm_server.tokenizer, vllm_server.root / "base-again")
    engine.sync_full(vllm_server.root / "base-again")


def our_logprobs(params, config, prompt, completion, temperature, lora=None, lora_config=None):
    from pure.models import forward

    tokens = torch.tensor([prompt + completion])
    logits = forward(params, tokens, config, lora=lora, lora_config=lora_config).logits[0].double()
    logp = (logits / temperature).log_softmax(-1)
    return torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(completion)])


def assert_matches_ours(served, rollouts, params, temperature, **lora):
    for prompt, completion, logprobs in zip(rollouts.prompt_ids, rollouts.completion_ids, rollouts.logprobs):
        ours = our_logprobs(params, served["config"], prompt, completion, temperature, **lora)
        # fp32 on both sides, different kernels: the note measured 2.3e-5 to 3.4e-5
        torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), ours, atol=1e-4, rtol=0)


def test_rollout_logprobs_match_our_forward_and_seeds_reproduce(served):
    engine, sampling = served["engine"], Sampling(max_tokens=8, temperature=0.7)
    a = engine.generate({}, served["prompts"], 3, sampling, rng.key(1))
    assert len(a) == 6 and all(len(c) == 8 for c in a.completion_ids) and set(a.finish_reasons) == {"length"}
    assert_matches_ours(served, a, served["params"], 0.7)
    assert engine.generate({}, served["prompts"], 3, sampling, rng.key(1)) == a
    assert engine.generate({}, served["prompts"], 3, sampling, rng.key(2)).completion_ids != a.completion_ids


def test_a_generation_over_one_steps_token_budget_samples_seeded(served):
    """24 requests x n 4 of 100-token prompts: 9600 prompt tokens, over vLLM's default 2048 per step.
    With chunked prefill on, a split prompt rewinds its seeded CPU generator and kills the engine."""
    prompts = [rng.randint(rng.fold_in(rng.key(11), i), 0, served["config"].vocab_size, (100,)).tolist()
               for i in range(24)]
    sampling = Sampling(max_tokens=2, temperature=1.0)
    a = served["engine"].generate({}, prompts, 4, sampling, rng.key(3))
    assert len(a) == 96 and all(len(c) == 2 for c in a.completion_ids)
    assert served["engine"].generate({}, prompts, 4, sampling, rng.key(3)) == a


def test_after_a_lora_sync_the_server_samples_the_new_policy(served):
    from backends.export import save_peft_adapter
    from pure.lora import LoraConfig, init_lora

    lora_config = LoraConfig(r=4, alpha=8)
    delta = init_lora(served["params"], lora_config, rng.key(3), target_linear=True)
    delta = {m: {**e, "B": rng.normal(rng.fold_in(rng.key(4), i), e["B"].shape) * 0.5} for i, (m, e) in enumerate(delta.items())}
    for version in (1, 2):  # a new folder per version
        folder = save_peft_adapter(served["root"] / f"adapter-{version}", delta, lora_config,
                                   base_model_name_or_path=str(served["root"] / "model"))
        seconds = served["engine"].sync_lora(folder)
        assert seconds > 0
        out = served["engine"].generate({}, served["prompts"], 2, Sampling(max_tokens=6), rng.key(5))
        assert_matches_ours(served, out, served["params"], 1.0, lora=delta, lora_config=lora_config)
        delta = {m: {**e, "B": e["B"] * -1} for m, e in delta.items()}
    served["engine"].lora_name = None  # back to the base model for the other tests


def test_after_a_full_sync_the_server_samples_the_new_weights(served):
    from pure.models import init

    new = init(served["config"], rng.key(9))
    save_untied(new, served["config"], served["tokenizer"], served["root"] / "weights-1")
    assert served["engine"].sync_full(served["root"] / "weights-1") > 0
    out = served["engine"].generate({}, served["prompts"], 2, Sampling(max_tokens=6), rng.key(6))
    assert_matches_ours(served, out, new, 1.0)


def test_no_server_is_one_clear_error():
    with pytest.raises(VllmServerError, match="no vLLM server answering at http://127.0.0.1:.*programs.vllm_serve"):
        VllmServerEngine("127.0.0.1", free_port(), timeout=2)


def test_the_rollout_bench_measures_the_server(served):
    from programs.bench.rollout import measure_server

    lines = []
    result = measure_server(served["engine"], served["prompts"], 2, Sampling(max_tokens=4), repeats=2, log=lines.append)
    assert result["generated_tokens"] == 2 * 2 * 2 * 4 and len(result["runs"]) == 2 and len(lines) == 2
    assert result["generated_tokens_per_s"] > 0 and result["cpu_seconds"] is None  # the server's CPU is not ours
