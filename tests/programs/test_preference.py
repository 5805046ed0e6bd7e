"""The preference and reward-model programs end to end on a tiny random model with the real SmolLM2
tokenizer: each method trains, resumes bitwise, and exports something the HF stack loads."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from programs import preference, rm
from programs.config import ConfigError, load_config
from pure.tree import tree_leaves

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"

METHODS = {
    "dpo": ("preference", "chatml.prompt_pairs", {}),
    "ipo": ("preference", "chatml.prompt_pairs", {}),
    "simpo": ("preference", "chatml.prompt_pairs", {"simpo_gamma": 0.5, "cpo_alpha": 0.5}),
    "orpo": ("preference", "chat_template.argilla", {"orpo_alpha": 0.1}),
    "kto": ("kto", "chatml.prompt_pairs", {}),
}


def write_config(tmp_path, tiny_model, name, rl="dpo", data="preference", type_="chatml.prompt_pairs", **overrides):
    rows = (DATA / f"{data}_train.jsonl").read_text().splitlines()
    (tmp_path / f"{data}_train.jsonl").write_text("\n".join(rows[:24]) + "\n")
    (tmp_path / f"{data}_eval.jsonl").write_text("\n".join(rows[24:32]) + "\n")
    raw = {
        "base_model": str(tiny_model), "rl": rl,
        "datasets": [{"path": str(tmp_path / f"{data}_train.jsonl"), "type": type_}],
        "test_datasets": [{"path": str(tmp_path / f"{data}_eval.jsonl"), "type": type_}],
        "dataset_prepared_path": str(tmp_path / "prepared"), "sequence_len": 64, "sample_packing": False,
        "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_linear": True,
        "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4, "eval_batch_size": 8,
        "learning_rate": 5e-3, "optimizer": "adamw_torch", "save_steps": 2, "eval_steps": 4, "logging_steps": 1,
        "output_dir": str(tmp_path / name), "seed": 3,
    }
    raw.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_records(result):
    return [{k: v for k, v in r.items() if "per_second" not in k and "rss" not in k}
            for r in result["records"] if "train/loss" in r]


@pytest.mark.parametrize("rl", sorted(METHODS))
def test_each_method_trains_and_exports_an_adapter(tmp_path, tiny_model, rl):
    data, type_, keys = METHODS[rl]
    result = preference.run(load_config(write_config(tmp_path, tiny_model, rl, rl=rl, data=data, type_=type_, **keys)))
    assert result["step"] == 4
    first = result["records"][0]
    assert first["step"] == 0 and "eval/rewards/chosen" in first
    if rl not in ("simpo", "orpo"):  # with a reference, the untrained policy has zero implicit rewards
        assert first["eval/rewards/chosen"] == 0.0 and first["eval/rewards/rejected"] == 0.0
    for record in train_records(result):
        assert all(torch.isfinite(torch.tensor(v)) for k, v in record.items() if isinstance(v, float)), record
    if rl == "kto":
        assert "kl" in train_records(result)[0]
    else:
        assert {"rewards/margins", "rewards/accuracies", "logps/chosen", "logits/rejected"} <= set(train_records(result)[0])
    assert (tmp_path / rl / "adapter_model.safetensors").is_file()


def test_dpo_resume_is_bitwise_identical(tmp_path, tiny_model):
    straight = preference.run(load_config(write_config(tmp_path, tiny_model, "straight", rpo_alpha=0.5)))
    first = preference.run(load_config(write_config(tmp_path, tiny_model, "split", rpo_alpha=0.5)), stop_after_step=2)
    assert first["stopped"]
    resumed = preference.run(load_config(write_config(tmp_path, tiny_model, "split", rpo_alpha=0.5,
                                                      auto_resume_from_checkpoints=True)))
    assert train_records(resumed) == train_records(straight)
    for a, b in zip(tree_leaves(resumed["state"].trainable),
                    tree_leaves(straight["state"].trainable)):
        assert torch.equal(a, b)


def test_precomputed_reference_gives_the_same_training(tmp_path, tiny_model):
    live = preference.run(load_config(write_config(tmp_path, tiny_model, "live", lora_dropout=0.0)))
    pre = preference.run(load_config(write_config(tmp_path, tiny_model, "pre", lora_dropout=0.0,
                                                  precompute_ref_log_probs=True)))
    assert list((tmp_path / "prepared").glob("*/ref_logps-train-*.safetensors"))
    for a, b in zip(train_records(live), train_records(pre)):
        # reference log-probs from differently padded batches: fp32 reduction order only
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-4)


def test_full_fine_tune_keeps_the_initial_weights_as_reference(tmp_path, tiny_model):
    result = preference.run(load_config(write_config(tmp_path, tiny_model, "full", adapter=None, max_steps=2,
                                                     eval_steps=2)))
    before, after = result["records"][0], result["records"][-1]
    assert before["eval/rewards/margins"] == 0.0
    assert after["eval/rewards/margins"] != 0.0  # the policy moved away from a fixed reference
    assert (tmp_path / "full" / "model" / "config.json").is_file()


def test_program_refuses_another_method_and_packing(tmp_path, tiny_model):
    from programs import kto

    with pytest.raises(SystemExit):
        kto.main(["--config", str(write_config(tmp_path, tiny_model, "wrong", rl="dpo"))])
    with pytest.raises(ConfigError, match="sample_packing"):
        load_config(write_config(tmp_path, tiny_model, "packed", sample_packing=True))


def test_reward_model_trains_and_loads_as_sequence_classification(tmp_path, tiny_model):
    import peft
    import transformers

    from backends.hf import load_tokenizer

    path = write_config(tmp_path, tiny_model, "rm", rl=None, reward_model=True, num_labels=1,
                        center_rewards_coefficient=0.01, type_="bradley_terry.chat_template",
                        chat_template="tokenizer_default")
    result = rm.run(load_config(path))
    assert result["step"] == 4 and "eval/accuracy" in result["eval"]
    out = tmp_path / "rm"
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert (out / "checkpoint-4").is_dir() and (out / "metrics.jsonl").is_file()  # export keeps the run's files
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    base.config.pad_token_id = load_tokenizer(tiny_model).pad_token_id
    model = peft.PeftModel.from_pretrained(base, out).eval()
    from pure.data.reward_batch import collate_reward_pairs

    # the exported model scores like our trained params
    batch = collate_reward_pairs([{"chosen_input_ids": [5, 6, 7, 2], "rejected_input_ids": [5, 6, 8, 9, 2]}], [0], 1,
                                 base.config.pad_token_id)[0]
    from pure.losses.reward import pair_rewards
    from pure.train import make_apply
    from backends.hf import load_pretrained

    params, config, _ = load_pretrained(tiny_model)
    state = result["state"]
    from pure.lora import LoraConfig

    bind = make_apply(config, params, lora_config=LoraConfig(r=4, alpha=8))
    ours = torch.cat(pair_rewards(bind(state.trainable), batch))
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"]).logits[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # fp32, op order only


def test_process_reward_model_trains(tmp_path, tiny_model):
    rows = [{"prompt": f"What is {a} + {a}?", "completions": [f"Double {a}.", f"It is {2 * a + (a % 3 == 0)}."],
             "labels": [True, a % 3 != 0]} for a in range(10, 40)]
    (tmp_path / "prm_train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:24]) + "\n")
    (tmp_path / "prm_eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[24:]) + "\n")
    path = write_config(tmp_path, tiny_model, "prm", rl=None, process_reward_model=True, num_labels=2,
                        data="preference", type_="stepwise_supervised")
    raw = yaml.safe_load(path.read_text())
    raw["datasets"] = [{"path": str(tmp_path / "prm_train.jsonl"), "type": "stepwise_supervised"}]
    raw["test_datasets"] = [{"path": str(tmp_path / "prm_eval.jsonl"), "type": "stepwise_supervised"}]
    path.write_text(yaml.safe_dump(raw))
    result = rm.run(load_config(path))
    assert result["step"] == 4 and "eval/accuracy" in result["eval"]
    assert json.loads((tmp_path / "prm" / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"
