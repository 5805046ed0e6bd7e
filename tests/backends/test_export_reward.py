"""Reward-model export: our folders and adapters load in transformers / peft as classification models
with the scores our pure forward gives."""
import json

import pytest
import torch

from backends.export import save_peft_reward_adapter, save_reward_model
from backends.hf import save_pretrained
from pure import rng
from pure.data.reward_batch import collate_reward_pairs
from pure.lora import LoraConfig, init_lora
from pure.models.heads import init_score_head, sequence_scores, token_scores
from pure.models.llama import forward, init
from tests.tiny import TINY

transformers = pytest.importorskip("transformers")
CONFIG = TINY
PAD = 0
FP32 = 1e-5  # the same fp32 weights through our forward and transformers'

PAIRS = [{"chosen_input_ids": [3, 4, 5, 6, 7], "rejected_input_ids": [3, 4]},
         {"chosen_input_ids": [8, 9, 10], "rejected_input_ids": [8, 9, 11, 12, 13, 14]}]


def pair_batch():
    return collate_reward_pairs(PAIRS, [0, 1], 2, PAD)[0]


def our_sequence_scores(params, head, batch, lora=None, lora_config=None):
    hidden = forward(params, batch["input_ids"], CONFIG, lora=lora, lora_config=lora_config,
                     compute_logits=False).hidden
    return sequence_scores(hidden, batch["last_index"], head["score.weight"])


@pytest.mark.parametrize("max_shard_size", [None, 20_000])
def test_sequence_reward_model_loads_with_equal_scores(tmp_path, max_shard_size):
    params = init(CONFIG, rng.key(0))
    head = init_score_head(CONFIG, 1, rng.key(1))
    folder = save_reward_model(tmp_path / "rm", params, head, CONFIG, None, num_labels=1, pad_token_id=PAD,
                               max_shard_size=max_shard_size)
    hf = json.loads((folder / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForSequenceClassification"] and hf["pad_token_id"] == PAD
    assert hf["id2label"] == {"0": "LABEL_0"}
    assert (folder / "model.safetensors.index.json").is_file() == (max_shard_size is not None)

    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"]  # score loaded, no lm_head left over
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    batch = pair_batch()
    with torch.no_grad():
        theirs = model(batch["input_ids"]).logits
    torch.testing.assert_close(our_sequence_scores(params, head, batch), theirs, atol=FP32, rtol=0)


def test_token_reward_model_loads_with_equal_scores(tmp_path):
    params = init(CONFIG, rng.key(0))
    head = init_score_head(CONFIG, 2, rng.key(1), kind="token")
    head["score.bias"] = torch.tensor([0.1, -0.4])
    folder = save_reward_model(tmp_path / "prm", {**params, **head}, None, CONFIG, None, num_labels=2, kind="token",
                               id2label={0: "bad", 1: "good"})
    model = transformers.AutoModelForTokenClassification.from_pretrained(folder).eval()
    assert type(model).__name__ == "LlamaForTokenClassification"
    assert model.config.id2label == {0: "bad", 1: "good"}
    ids = rng.randint(rng.key(2), 1, CONFIG.vocab_size, (2, 6))
    hidden = forward(params, ids, CONFIG, compute_logits=False).hidden
    with torch.no_grad():
        theirs = model(ids).logits
    torch.testing.assert_close(token_scores(hidden, head["score.weight"], head["score.bias"]), theirs,
                               atol=FP32, rtol=0)


def test_reward_export_refuses_mismatched_heads(tmp_path):
    params = init(CONFIG, rng.key(0))
    with pytest.raises(ValueError, match=r"expected \[num_labels=1, hidden_size=32\]"):
        save_reward_model(tmp_path / "a", params, init_score_head(CONFIG, 2, rng.key(1)), CONFIG, None, 1,
                          pad_token_id=0)
    with pytest.raises(ValueError, match="has no bias"):
        save_reward_model(tmp_path / "b", params, init_score_head(CONFIG, 1, rng.key(1), kind="token"), CONFIG, None, 1,
                          pad_token_id=0)
    with pytest.raises(ValueError, match="no pad_token_id"):
        save_reward_model(tmp_path / "c", params, init_score_head(CONFIG, 1, rng.key(1)), CONFIG, None, 1)
    assert not any(tmp_path.iterdir())


def lora_delta(params, lcfg):
    delta = init_lora(params, lcfg, rng.key(5), target_modules=["q_proj", "v_proj", "down_proj"])
    return {p: dict(e, B=rng.normal(rng.fold_in(rng.key(6), i), e["B"].shape, std=0.05))
            for i, (p, e) in enumerate(delta.items())}


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_peft_reward_adapter_loads_with_equal_scores(tmp_path, kind):
    peft = pytest.importorskip("peft")
    params = init(CONFIG, rng.key(0))
    num_labels = 1 if kind == "sequence" else 2
    head = init_score_head(CONFIG, num_labels, rng.key(1), kind=kind)
    lcfg = LoraConfig(r=4, alpha=8)
    delta = lora_delta(params, lcfg)
    save_pretrained(params, CONFIG.replace(pad_token_id=PAD), None, tmp_path / "base")
    adapter = save_peft_reward_adapter(tmp_path / "adapter", delta, lcfg, head, num_labels, kind)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == ("SEQ_CLS" if kind == "sequence" else "TOKEN_CLS")
    assert config["modules_to_save"] == ["score"]

    auto = (transformers.AutoModelForSequenceClassification if kind == "sequence"
            else transformers.AutoModelForTokenClassification)
    torch.manual_seed(0)  # the base model's fresh score head, which the adapter replaces
    base = auto.from_pretrained(tmp_path / "base", num_labels=num_labels)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    batch = pair_batch()
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"]).logits
    if kind == "sequence":
        ours = our_sequence_scores(params, head, batch, lora=delta, lora_config=lcfg)
    else:
        hidden = forward(params, batch["input_ids"], CONFIG, lora=delta, lora_config=lcfg, compute_logits=False).hidden
        ours = token_scores(hidden, head["score.weight"], head["score.bias"])
    torch.testing.assert_close(ours, theirs, atol=FP32, rtol=0)
