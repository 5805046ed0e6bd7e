import json
import math

import pytest
import torch
import transformers

from backends import hf
from backends.hf import ModelLoadError
from pure.models.config import UnsupportedArchitectureError, expected_param_shapes

SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)

# name -> (config class, model class, extra config kwargs)
TINY_MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "llama-biases": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                     {"attention_bias": True, "mlp_bias": True}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 16}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
}


def tiny_hf_model(kind: str, seed: int = 0):
    config_cls, model_cls, extra = TINY_MODELS[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SIZES, bos_token_id=1, eos_token_id=2, **extra)).eval()
    with torch.no_grad():  # HF inits norms to ones and biases to zeros; randomise them all
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def hf_params(model):
    """The HF state dict as our loader should return it (no tied lm_head)."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def assert_params_equal(ours, reference):
    assert list(ours) == list(reference) or set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Each tiny HF model saved by transformers itself: {kind: (model, folder)}."""
    out = {}
    for kind in TINY_MODELS:
        model = tiny_hf_model(kind)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (model, folder)
    return out


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_load_params_equals_the_hf_state_dict_bit_for_bit(saved_models, kind):
    model, folder = saved_models[kind]
    config = hf.load_config(folder)
    params = hf.load_params(folder)
    assert list(params) == list(expected_param_shapes(config))
    assert_params_equal(params, hf_params(model))


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_expected_param_shapes_match_the_hf_model(saved_models, kind):
    model, folder = saved_models[kind]
    config = hf.load_config(folder)
    shapes = {n: tuple(t.shape) for n, t in hf_params(model).items()}
    assert expected_param_shapes(config) == shapes
    assert config.num_params() == sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_save_then_load_round_trip_is_bit_exact(saved_models, kind, tmp_path):
    model, folder = saved_models[kind]
    params, config, tokenizer = hf.load_pretrained(folder)
    assert tokenizer is None  # these tiny folders carry no tokenizer
    out = hf.save_pretrained(params, config, None, tmp_path / "out")
    # config.json always spells head_dim out, so a config that left it implicit gains it.
    assert hf.load_config(out) == config.replace(head_dim=config.head_size)
    assert_params_equal(hf.load_params(out), params)


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_our_saved_folder_loads_in_transformers_with_identical_weights_and_logits(saved_models, kind, tmp_path):
    model, folder = saved_models[kind]
    params, config, _ = hf.load_pretrained(folder)
    out = hf.save_pretrained(params, config, None, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    assert reloaded.dtype == torch.float32
    assert_params_equal(dict(reloaded.state_dict()), dict(model.state_dict()))
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2


def test_tied_model_is_saved_without_lm_head(saved_models, tmp_path):
    model, folder = saved_models["llama-tied"]
    params = hf.load_params(folder)
    assert "lm_head.weight" not in params
    params_with_head = {**params, "lm_head.weight": params["model.embed_tokens.weight"]}
    out = hf.save_pretrained(params_with_head, hf.load_config(folder), None, tmp_path / "tied")
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_sharded_save_and_load(saved_models, tmp_path):
    model, folder = saved_models["qwen2"]
    params, config, _ = hf.load_pretrained(folder)
    out = hf.save_pretrained(params, config, None, tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(params) and set(index["weight_map"].values()) == set(shards)
    assert_params_equal(hf.load_params(out), params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert_params_equal(dict(reloaded.state_dict()), dict(model.state_dict()))


def test_sharded_folder_written_by_transformers_loads(saved_models, tmp_path):
    model, _ = saved_models["llama"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_params_equal(hf.load_params(tmp_path), hf_params(model))


def test_pytorch_model_bin_loads_when_there_is_no_safetensors(saved_models, tmp_path):
    model, folder = saved_models["llama-tied"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(dict(model.state_dict()), tmp_path / "pytorch_model.bin")
    assert_params_equal(hf.load_params(tmp_path), hf_params(model))


def test_load_params_casts_to_the_requested_dtype(saved_models):
    _, folder = saved_models["llama"]
    params = hf.load_params(folder, dtype=torch.bfloat16)
    assert {t.dtype for t in params.values()} == {torch.bfloat16}


def test_extra_keys_are_ignored(saved_models, tmp_path):
    from safetensors.torch import save_file
    model, folder = saved_models["llama"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = {**dict(model.state_dict()), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
             "something.else": torch.zeros(3)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    assert_params_equal(hf.load_params(tmp_path), hf_params(model))


def test_save_replaces_an_existing_model_folder_atomically(saved_models, tmp_path):
    _, folder = saved_models["llama"]
    params, config, _ = hf.load_pretrained(folder)
    target = tmp_path / "model"
    hf.save_pretrained(params, config, None, target)
    (target / "stale.txt").write_text("from the previous save")
    doubled = {k: v * 2 for k, v in params.items()}
    hf.save_pretrained(doubled, config, None, target)
    assert not (target / "stale.txt").exists()
    assert_params_equal(hf.load_params(target), doubled)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folders left behind


def test_save_refuses_to_replace_a_folder_that_is_not_a_model(saved_models, tmp_path):
    _, folder = saved_models["llama"]
    params, config, _ = hf.load_pretrained(folder)
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        hf.save_pretrained(params, config, None, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_save_rejects_params_that_do_not_match_the_config(saved_models, tmp_path):
    _, folder = saved_models["llama"]
    params, config, _ = hf.load_pretrained(folder)
    lora_like = {**params, "model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 32)}
    with pytest.raises(ValueError, match="lora_A"):
        hf.save_pretrained(lora_like, config, None, tmp_path / "x")
    missing = {k: v for k, v in params.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="model.norm.weight"):
        hf.save_pretrained(missing, config, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_makes_non_contiguous_and_shared_tensors_writable(saved_models, tmp_path):
    _, folder = saved_models["llama"]
    params, config, _ = hf.load_pretrained(folder)
    w = params["model.layers.0.self_attn.q_proj.weight"]
    params["model.layers.0.self_attn.q_proj.weight"] = w.t().contiguous().t()  # a transposed view
    params["lm_head.weight"] = params["model.embed_tokens.weight"]  # untied config, same storage
    out = hf.save_pretrained(params, config, None, tmp_path / "out")
    assert_params_equal(hf.load_params(out), params)


def test_save_with_a_tokenizer_writes_it_with_its_chat_template(saved_models, tmp_path):
    tokenizer = hf.load_tokenizer(hf.embedded_model_dir())
    _, folder = saved_models["llama"]
    params, config, _ = hf.load_pretrained(folder)
    out = hf.save_pretrained(params, config, tokenizer, tmp_path / "out")
    _, _, reloaded = hf.load_pretrained(out)
    assert reloaded is not None and reloaded.chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert reloaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)


# --- errors ------------------------------------------------------------------------------------


def test_unsupported_architecture_names_the_file_and_the_supported_ones(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as err:
        hf.load_pretrained(tmp_path)
    message = str(err.value)
    assert "config.json" in message and "gpt2" in message and "GPT2LMHeadModel" in message
    assert "llama" in message and "qwen3" in message


def test_missing_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        hf.load_config(tmp_path)


def test_deleted_shard_names_the_shard(saved_models, tmp_path):
    model, _ = saved_models["llama"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        hf.load_params(tmp_path)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999, 0.0001])
def test_truncated_safetensors_names_the_file(saved_models, tmp_path, keep_fraction):
    _, folder = saved_models["llama"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is truncated or corrupt"):
        hf.load_params(tmp_path)


def test_missing_weights_are_listed(saved_models, tmp_path):
    from safetensors.torch import save_file
    model, folder = saved_models["llama"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v for k, v in model.state_dict().items() if ".layers.1." not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        hf.load_params(tmp_path)
    message = str(err.value)
    assert "model.safetensors" in message and "model.layers.1.self_attn.q_proj.weight" in message
    assert "9 of 21 weights missing" in message


def test_wrong_shape_names_the_param_the_shapes_and_the_config_fields(saved_models, tmp_path):
    model, folder = saved_models["llama"]
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError) as err:
        hf.load_params(tmp_path)
    message = str(err.value)
    assert "model.safetensors" in message and "mlp.gate_proj.weight" in message
    assert "[64, 32]" in message and "[48, 32]" in message and "intermediate_size=48" in message


def test_folder_without_weights(saved_models, tmp_path):
    _, folder = saved_models["llama"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights found"):
        hf.load_params(tmp_path)


def test_an_uncached_hub_id_explains_how_to_point_base_model_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        hf.load_pretrained("puretune-tests/definitely-not-cached")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message
    assert "base_model" in message and "smollm2-135m-instruct" in message


def test_a_missing_folder_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="nor an existing folder"):
        hf.load_pretrained(str(tmp_path / "no" / "such" / "folder"))


# --- the real embedded model (slow: loads the converted SmolLM2-135M-Instruct from ~/.cache/puretune,
# converting it from the embedded GGUF on first use, ~25 s) ----------------------------------------


def test_embedded_model_loads_with_tied_embeddings_and_a_chat_template():
    params, config, tokenizer = hf.load_pretrained("smollm2-135m-instruct")
    count = sum(t.numel() for t in params.values())
    assert abs(count - 134.5e6) < 0.1e6 and count == config.num_params()
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert "lm_head.weight" not in params
    assert params["model.embed_tokens.weight"].dtype == torch.float32
    assert tokenizer is not None and tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False)
    assert "Hello" in text


def test_embedded_tokenizer_has_the_gguf_files_special_tokens_and_flags():
    settings = hf.gguf_tokenizer_settings(hf.embedded_gguf_path("smollm2-135m-instruct"))
    assert settings == {"bos_token": 1, "eos_token": 2, "unk_token": 0, "pad_token": 2, "add_bos_token": False}
    tokenizer = hf.load_tokenizer("smollm2-135m-instruct")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tokenizer.eos_token_id == 2 and tokenizer.decode(tokenizer("a .")["input_ids"]) == "a ."


def test_tokenizer_settings_override_what_the_reader_got_wrong():
    tokenizer = hf.load_tokenizer("smollm2-135m-instruct")
    tokenizer.eos_token = "<|im_start|>"  # what transformers 5.17's GGUF reader gives
    hf.apply_tokenizer_settings(tokenizer, {"eos_token": 2, "pad_token": 2})
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    if hasattr(tokenizer, "add_bos_token"):  # transformers 4.57 adds <|im_start|> to every text
        tokenizer.add_bos_token = True
        hf.apply_tokenizer_settings(tokenizer, {"add_bos_token": False})
        assert tokenizer("a .")["input_ids"][0] != tokenizer.bos_token_id
    with pytest.raises(ModelLoadError, match="eos_token id 999999 is outside the vocabulary"):
        hf.apply_tokenizer_settings(tokenizer, {"eos_token": 999999})


def test_a_hub_id_in_the_local_cache_loads_without_network(saved_models, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants
    model, folder = saved_models["qwen3"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--puretune-tests--tiny-qwen3"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params, config, _ = hf.load_pretrained("puretune-tests/tiny-qwen3")
    assert config.model_type == "qwen3"
    assert_params_equal(params, hf_params(model))


def test_bfloat16_params_are_saved_as_bfloat16_and_transformers_keeps_the_dtype(saved_models, tmp_path):
    _, folder = saved_models["llama"]
    params, config, _ = hf.load_pretrained(folder, dtype=torch.bfloat16)
    out = hf.save_pretrained(params, config, None, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert_params_equal(hf.load_params(out, dtype=None), params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    assert_params_equal(dict(reloaded.state_dict()), params)
