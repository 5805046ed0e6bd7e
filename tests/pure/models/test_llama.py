"""The pure Llama-family forward against transformers, packing, KV cache and LoRA.

Parity tolerance: fp32 on both sides, differences come only from op order -> 1e-4 absolute on logits.
"""
import pytest
import torch
import transformers

from pure import rng
from pure.lora import LoraConfig, init_lora, merge_lora
from pure.models import config_from_hf, empty_cache, forward, init

FP32_TOL = 1e-4

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

HF_CONFIGS = {
    "llama-untied": (transformers.LlamaConfig, dict(TINY, tie_word_embeddings=False)),
    "llama-tied": (transformers.LlamaConfig, dict(TINY, tie_word_embeddings=True)),
    "llama3-rope-scaling": (transformers.LlamaConfig, dict(TINY, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16), rope_theta=500000.0)),
    "llama-attention-bias": (transformers.LlamaConfig, dict(TINY, attention_bias=True, mlp_bias=True)),
    "mistral-sliding-window": (transformers.MistralConfig, dict(TINY, sliding_window=5)),
    "qwen2-qkv-bias": (transformers.Qwen2Config, dict(TINY, tie_word_embeddings=True)),
    "qwen3-qk-norm": (transformers.Qwen3Config, dict(TINY, head_dim=24, tie_word_embeddings=False)),
    "qwen3-attention-bias": (transformers.Qwen3Config, dict(TINY, attention_bias=True)),
    "mistral-attention-bias-ignored": (transformers.MistralConfig, dict(TINY, attention_bias=True)),
}


def hf_model(name, seed=0):
    cls, kwargs = HF_CONFIGS[name]
    torch.manual_seed(seed)  # transformers initialises from the global generator; only the reference uses it
    model = transformers.AutoModelForCausalLM.from_config(cls(**kwargs), attn_implementation="sdpa").eval()
    # Norm weights start at one: randomise them so a missing or misplaced norm shows in the logits.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def params_of(model):
    config = config_from_hf(model.config.to_dict())
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return params, config


def tokens(batch, length, vocab, seed=1):
    return rng.randint(rng.key(seed), 0, vocab, (batch, length))


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_parity_with_transformers_tiny(name):
    model = hf_model(name)
    params, config = params_of(model)
    ids = tokens(2, 19, config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
        ours = forward(params, ids, config).logits
    diff = (ours - expected).abs().max().item()
    print(f"\nparity {name}: max |logits diff| = {diff:.3e}")
    assert diff <= FP32_TOL


@pytest.fixture(scope="module")
def smollm():
    from safetensors.torch import load_file

    from backends.hf import embedded_model_dir
    from pure.models.config import config_from_hf
    import json

    folder = embedded_model_dir()
    config = config_from_hf(json.loads((folder / "config.json").read_text()))
    params = load_file(str(folder / "model.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return params, config, model, tokenizer


def test_logits_parity_with_transformers_smollm2(smollm):
    params, config, model, tokenizer = smollm
    prompts = ["The capital of France is", "def fibonacci(n):\n    return", "2 + 2 ="]
    worst = 0.0
    for text in prompts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            expected = model(ids).logits
            ours = forward(params, ids, config).logits
        worst = max(worst, (ours - expected).abs().max().item())
        assert ours[0, -1].argmax() == expected[0, -1].argmax()
    print(f"\nparity smollm2-135m-instruct (real weights): max |logits diff| = {worst:.3e}")
    assert worst <= FP32_TOL


@pytest.mark.parametrize("name", ["llama-untied", "qwen3-qk-norm", "mistral-sliding-window"])
def test_packed_row_equals_separate_forwards(name):
    params, config = params_of(hf_model(name))
    docs = [tokens(1, n, config.vocab_size, seed=n) for n in (7, 11, 5)]
    packed = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    segments = torch.cat([torch.full((d.shape[1],), i + 1) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        together = forward(params, packed, config, positions=positions, segment_ids=segments).logits[0]
        apart = torch.cat([forward(params, d, config).logits[0] for d in docs])
    assert (together - apart).abs().max().item() <= FP32_TOL


def test_padding_does_not_change_real_tokens():
    params, config = params_of(hf_model("llama-untied"))
    ids = tokens(1, 9, config.vocab_size)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    segments = torch.tensor([[1] * 9 + [0] * 4])
    with torch.no_grad():
        a = forward(params, ids, config).logits
        b = forward(params, padded, config, segment_ids=segments).logits[:, :9]
    assert (a - b).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-qkv-bias", "mistral-sliding-window"])
def test_greedy_decoding_with_cache_equals_full_forward(name):
    params, config = params_of(hf_model(name))
    prompt = tokens(2, 6, config.vocab_size)
    with torch.no_grad():
        out = forward(params, prompt, config, cache=empty_cache(config, 2), logits_at="last")
        cache, seq = out.cache, prompt
        for _ in range(8):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            full = forward(params, seq, config).logits[:, -1]
            assert (full - out.logits[:, -1]).abs().max().item() <= FP32_TOL
            assert torch.equal(full.argmax(-1, keepdim=True), next_token)
            seq = torch.cat([seq, next_token], dim=1)
            out = forward(params, next_token, config, cache=cache, logits_at="last")
            cache = out.cache
    assert cache.length == seq.shape[1]


def test_hidden_states_match_transformers():
    model = hf_model("llama-untied")
    params, config = params_of(model)
    ids = tokens(1, 10, config.vocab_size)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
        out = forward(params, ids, config, hidden_layers=range(config.num_hidden_layers + 1), compute_logits=False)
    assert out.logits is None
    for i, h in out.hidden_states.items():
        assert (h - expected[i]).abs().max().item() <= FP32_TOL


def test_logits_at_selected_positions_equal_full_logits():
    params, config = params_of(hf_model("llama-untied"))
    ids = tokens(2, 8, config.vocab_size)
    mask = rng.bernoulli(rng.key(3), 0.5, (2, 8))
    with torch.no_grad():
        full = forward(params, ids, config).logits
        selected = forward(params, ids, config, logits_at=mask).logits
    assert selected.shape == (int(mask.sum()), config.vocab_size)
    assert (selected - full[mask]).abs().max().item() <= FP32_TOL


def test_init_gives_a_model_of_the_requested_shape():
    _, config = params_of(hf_model("qwen3-qk-norm"))
    params = init(config, rng.key(0))
    again = init(config, rng.key(0))
    assert all(torch.equal(params[k], again[k]) for k in params)
    assert sum(p.numel() for p in params.values()) == config.num_params()
    std = params["model.layers.0.mlp.up_proj.weight"].std().item()
    assert abs(std - config.initializer_range) < 0.2 * config.initializer_range
    logits = forward(params, tokens(1, 5, config.vocab_size), config).logits
    assert torch.isfinite(logits).all()


def test_activation_checkpointing_gives_the_same_gradients():
    params, config = params_of(hf_model("llama-untied"))
    ids = tokens(2, 8, config.vocab_size)

    def loss(p, ckpt):
        return forward(p, ids, config, checkpoint_layers=ckpt).logits.logsumexp(-1).mean()

    plain = torch.func.grad(loss)(params, False)
    checkpointed = torch.func.grad(loss)(params, True)
    for k in plain:
        assert torch.allclose(plain[k], checkpointed[k], atol=1e-6), k
    # Plain autograd goes through the same recomputation.
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(leaves, True).backward()
    for k in plain:
        assert torch.allclose(plain[k], leaves[k].grad, atol=1e-6), k


# ---------------------------------------------------------------- LoRA

def lora_setup(use_dora=False, dropout=0.0, r=4):
    model = hf_model("llama-untied")
    params, config = params_of(model)
    lcfg = LoraConfig(r=r, alpha=8, dropout=dropout, use_dora=use_dora)
    delta = init_lora(params, lcfg, rng.key(5), target_linear=True)
    return model, params, config, lcfg, delta


def randomise_b(delta, seed=7):
    keys = rng.split(rng.key(seed), len(delta))
    return {p: dict(e, B=rng.normal(k, e["B"].shape, std=0.05)) for (p, e), k in zip(delta.items(), keys)}


def test_lora_with_zero_b_equals_base_model():
    _, params, config, lcfg, delta = lora_setup()
    assert len(delta) == 7 * config.num_hidden_layers
    ids = tokens(2, 9, config.vocab_size)
    with torch.no_grad():
        base = forward(params, ids, config).logits
        adapted = forward(params, ids, config, lora=delta, lora_config=lcfg).logits
    assert torch.equal(base, adapted)


@pytest.mark.parametrize("use_dora", [False, True])
def test_unmerged_lora_equals_fp32_merged_weights(use_dora):
    _, params, config, lcfg, delta = lora_setup(use_dora=use_dora)
    delta = randomise_b(delta)
    ids = tokens(2, 9, config.vocab_size)
    with torch.no_grad():
        unmerged = forward(params, ids, config, lora=delta, lora_config=lcfg).logits
        merged = forward(merge_lora(params, delta, lcfg), ids, config).logits
    assert (unmerged - merged).abs().max().item() <= FP32_TOL
    assert (unmerged - forward(params, ids, config).logits).abs().max().item() > 1e-3  # the adapter does something


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_grads_by_torch_func_match_autograd_through_peft(use_dora):
    peft = pytest.importorskip("peft")
    model, params, config, lcfg, delta = lora_setup(use_dora=use_dora)
    delta = randomise_b(delta)
    ids = tokens(2, 9, config.vocab_size)
    targets = tokens(2, 9, config.vocab_size, seed=11)

    peft_model = peft.get_peft_model(model, peft.LoraConfig(
        r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=0.0, use_dora=use_dora,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for path, entry in delta.items():
            m = modules["base_model.model." + path]
            m.lora_A["default"].weight.copy_(entry["A"])
            m.lora_B["default"].weight.copy_(entry["B"])
            if use_dora:
                m.lora_magnitude_vector["default"].weight.copy_(entry["m"])
    logits = peft_model(ids).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()

    def loss(d):
        out = forward(params, ids, config, lora=d, lora_config=lcfg).logits
        return torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())

    grads = torch.func.grad(loss)(delta)
    for path, g in grads.items():
        m = modules["base_model.model." + path]
        assert torch.allclose(g["A"], m.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4), path
        assert torch.allclose(g["B"], m.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4), path
        if use_dora:
            assert torch.allclose(g["m"], m.lora_magnitude_vector["default"].weight.grad, atol=1e-5, rtol=1e-4)


def test_lora_dropout_is_driven_by_the_key():
    _, params, config, _, delta = lora_setup(dropout=0.5)
    lcfg = LoraConfig(r=4, alpha=8, dropout=0.5)
    delta = randomise_b(delta)
    ids = tokens(1, 6, config.vocab_size)
    with torch.no_grad():
        run = lambda k: forward(params, ids, config, lora=delta, lora_config=lcfg, dropout_key=k).logits
        a, b, c = run(rng.key(1)), run(rng.key(1)), run(rng.key(2))
        no_key = forward(params, ids, config, lora=delta, lora_config=lcfg).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, no_key)


def test_lora_target_modules_by_name_and_regex():
    from pure.lora import target_paths

    _, params, config, _, _ = lora_setup()
    by_name = target_paths(params, ["q_proj", "v_proj"])
    assert by_name == [f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in ("q_proj", "v_proj")]
    by_regex = target_paths(params, r".*layers\.0\..*proj")
    assert len(by_regex) == 7
    with pytest.raises(ValueError, match="matches no linear layer"):
        target_paths(params, ["qkv_proj"])


def test_our_kernels_package_is_not_taken_for_the_hub_kernels_package():
    from transformers.utils import import_utils

    if hasattr(import_utils.is_kernels_available, "cache_clear"):  # cached from transformers 5
        import_utils.is_kernels_available.cache_clear()
    assert not import_utils.is_kernels_available()
