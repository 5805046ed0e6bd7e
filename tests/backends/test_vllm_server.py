"""The vLLM server engine against a real vLLM server (one per pytest run, started by
`python -m programs.vllm_serve` from `.venv-vllm`, on 127.0.0.1 and a free port, stopped by Ctrl-C
at the end, which must take its children with it): its rollout log-probs against
our forward on the same tokens, seeded reproducibility, and our forward again after a LoRA sync and
after a full-weight sync, on prompts longer than one 16-token KV block (the stale-cache trap)."""
import pytest
import torch

from backends.rollout import Sampling
from backends.rollout.vllm_server import VLLM_VENV, SETUP_HINT, VllmServerEngine, VllmServerError, free_port, save_untied
from pure import rng

pytestmark = pytest.mark.skipif(not (VLLM_VENV / "bin" / "python").is_file(),
                                reason=f"no vLLM venv ({VLLM_VENV}); create it with `{SETUP_HINT}`")

PROMPTS = ["Tell me three things about the sea and the sky, please, in order, and then say why each is true.",
           "What is the capital of France? Answer in one long sentence, with all of your reasons, and a date."]


@pytest.fixture(scope="module")  # this module is the only user: one server per pytest run, gone after it
def served(tmp_path_factory):
    """`python -m programs.vllm_serve` on a tiny model, as a user starts it; Ctrl-C (SIGINT) at the end."""
    import signal
    import subprocess
    import sys

    import yaml

    from backends.hf import load_tokenizer, save_pretrained
    from backends.rollout.vllm_server import wait_healthy
    from pure.models import ModelConfig, init

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    # head size 64: vLLM's CPU attention kernels take the usual head sizes only
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    root = tmp_path_factory.mktemp("vllm")
    params = init(config, rng.key(0))
    save_pretrained(params, config, tokenizer, root / "model")
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert all(len(p) > 16 for p in prompts), [len(p) for p in prompts]
    port = free_port()
    (root / "serve.yaml").write_text(yaml.safe_dump({
        "base_model": str(root / "model"), "datasets": [{"path": "unused.jsonl"}], "learning_rate": 1e-5,
        "adapter": "lora", "lora_r": 8, "lora_target_linear": True, "sequence_len": 256, "output_dir": str(root / "run"),
        "vllm": {"host": "127.0.0.1", "port": port}, "trl": {"vllm_lora_sync": True}}))
    proc = subprocess.Popen([sys.executable, "-m", "programs.vllm_serve", "--config", str(root / "serve.yaml")],
                            stdout=open(root / "serve.out", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_healthy("127.0.0.1", port, 400, proc, root / "serve.out")
        yield {"engine": VllmServerEngine("127.0.0.1", port), "config": config, "params": params,
               "tokenizer": tokenizer, "root": root, "prompts": prompts, "port": port, "proc": proc}
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        out = (root / "serve.out").read_text()
        assert code == 0 and "vLLM server stopped" in out, out[-2000:]
        with pytest.raises(VllmServerError):  # the server and its children are gone
            VllmServerEngine("127.0.0.1", port, timeout=2)


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
