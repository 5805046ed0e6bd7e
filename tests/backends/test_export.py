"""PEFT interop: our adapter folder loads in peft onto the HF base model with the same logits."""
import pytest
import torch
import transformers

from backends.export import AdapterError, load_peft_adapter, save_peft_adapter
from pure import rng
from pure.lora import LoraConfig, init_lora
from pure.models import config_from_hf, forward

peft = pytest.importorskip("peft")
FP32_TOL = 1e-4


def tiny_hf():
    torch.manual_seed(0)  # the reference model's init only
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("use_dora", [False, True])
def test_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path, use_dora):
    model = tiny_hf()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = config_from_hf(model.config.to_dict())
    lcfg = LoraConfig(r=4, alpha=16, use_dora=use_dora, use_rslora=True)
    delta = init_lora(params, lcfg, rng.key(1), target_modules=["q_proj", "v_proj", "down_proj"])
    delta = {p: dict(e, B=rng.normal(rng.fold_in(rng.key(2), i), e["B"].shape, std=0.05))
             for i, (p, e) in enumerate(delta.items())}
    head = params["lm_head.weight"] + 0.01
    save_peft_adapter(tmp_path / "adapter", delta, lcfg, modules_to_save={"lm_head.weight": head})

    ids = rng.randint(rng.key(3), 0, 97, (2, 7))
    ours = forward({**params, "lm_head.weight": head}, ids, config, lora=delta, lora_config=lcfg).logits
    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = loaded(ids).logits
    assert (ours - theirs).abs().max().item() <= FP32_TOL

    again, again_cfg, saved = load_peft_adapter(tmp_path / "adapter", params)
    assert again_cfg == lcfg and set(again) == set(delta) and torch.equal(saved["lm_head.weight"], head)
    assert all(torch.equal(again[p]["B"], delta[p]["B"]) for p in delta)


def test_adapter_of_another_model_is_refused(tmp_path):
    model = tiny_hf()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lcfg = LoraConfig(r=2)
    save_peft_adapter(tmp_path / "a", init_lora(params, lcfg, rng.key(0), target_modules=["q_proj"]), lcfg)
    smaller = {k: v[..., :16] if k.endswith("q_proj.weight") else v for k, v in params.items()}
    with pytest.raises(AdapterError, match="expected A"):
        load_peft_adapter(tmp_path / "a", smaller)
    with pytest.raises(AdapterError, match="not a LoRA adapter folder"):
        load_peft_adapter(tmp_path, params)
