"""Config keys reach behaviour: each test sets a key through a YAML file and observes its effect in
the run (learning rates, batches, records, files), so a key that is accepted and then dropped
fails here. tests/programs/config/test_accounting.py checks every key is read at all."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from programs import common, loop
from programs.config import ConfigError, load_config
from programs.sft import run

REPO = Path(__file__).resolve().parents[2]
ROWS = (REPO / "configs" / "data" / "arithmetic_train.jsonl").read_text().splitlines()[:24]
LR = 1e-2


def config_file(tmp_path: Path, tiny_model, name: str = "run", **keys) -> Path:
    (tmp_path / "train.jsonl").write_text("\n".join(ROWS) + "\n")
    raw = {
        "base_model": str(tiny_model),
        "datasets": [{"path": str(tmp_path / "train.jsonl"), "type": "chat_template"}],
        "dataset_prepared_path": str(tmp_path / "prepared"), "sequence_len": 128,
        "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
        "micro_batch_size": 2, "max_steps": 5, "learning_rate": LR, "optimizer": "adamw_torch",
        "lr_scheduler": "cosine", "logging_steps": 1, "save_strategy": "no",
        "output_dir": str(tmp_path / name), "seed": 3,
    }
    raw.update(keys)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train(tmp_path, tiny_model, name="run", **keys) -> dict:
    return run(load_config(config_file(tmp_path, tiny_model, name, **keys)))


def logged(result, metric: str) -> dict[int, float]:
    return {r["step"]: r[metric] for r in result["records"] if metric in r}


# --- schedule --------------------------------------------------------------------------------------


def test_lr_quadratic_warmup_squares_the_warmup(tmp_path, tiny_model):
    lrs = logged(train(tmp_path, tiny_model, warmup_steps=4, lr_quadratic_warmup=True), "train/learning_rate")
    # the lr of update t (logged at step t + 1) is LR * (t / 4)^2 during warmup, not LR * t / 4
    assert [lrs[s] for s in (2, 3, 4)] == pytest.approx([LR / 16, LR / 4, LR * 9 / 16], rel=1e-12)


def test_lr_scheduler_kwargs_reach_the_schedule(tmp_path, tiny_model):
    result = train(tmp_path, tiny_model, lr_scheduler="polynomial", warmup_steps=1,
                   lr_scheduler_kwargs={"power": 2.0, "lr_end": 1e-4})
    lrs = logged(result, "train/learning_rate")
    # polynomial decay over 5 - 1 steps: (LR - e) * (1 - (t - 1) / 4)^2 + e
    assert [lrs[s] for s in (2, 3, 4, 5)] == pytest.approx(
        [(LR - 1e-4) * (1 - p / 4) ** 2 + 1e-4 for p in range(4)], rel=1e-12)


def test_lr_div_factor_sets_one_cycles_starting_lr(tmp_path, tiny_model):
    lrs = logged(train(tmp_path, tiny_model, lr_scheduler="one_cycle", warmup_steps=2, lr_div_factor=5.0),
                 "train/learning_rate")
    assert lrs[1] == pytest.approx(LR / 5.0, rel=1e-12)


def test_a_scheduler_option_the_schedule_does_not_take_fails_before_loading(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="lr_scheduler_kwargs.power: lr_scheduler linear takes no options"):
        load_config(config_file(tmp_path, tiny_model, lr_scheduler="linear", lr_scheduler_kwargs={"power": 2.0}))
    with pytest.raises(ConfigError, match="lr_quadratic_warmup has no effect with lr_scheduler: linear"):
        load_config(config_file(tmp_path, tiny_model, lr_scheduler="linear", lr_quadratic_warmup=True))


def test_an_unbuilt_scheduler_is_refused_at_validation(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="lr_scheduler is not supported yet by puretune .*reduce_lr_on_plateau"):
        load_config(config_file(tmp_path, tiny_model, lr_scheduler="reduce_lr_on_plateau"))


# --- data order --------------------------------------------------------------------------------------


def first_losses(result) -> list[float]:
    return [v for _, v in sorted(logged(result, "train/loss").items())]


def test_data_seed_orders_the_data_and_defaults_to_seed(tmp_path, tiny_model):
    plain = first_losses(train(tmp_path, tiny_model, "plain", max_steps=2))
    same = first_losses(train(tmp_path, tiny_model, "same", max_steps=2, data_seed=3))
    other = first_losses(train(tmp_path, tiny_model, "other", max_steps=2, data_seed=4))
    assert plain == same
    assert plain != other


def batches_of(tmp_path, tiny_model, monkeypatch, **keys):
    """(the prepared train rows, epoch 0's micro-batches) as the SFT program builds them."""
    seen = {}
    build = common.epoch_micro_batches

    def spy(examples, config, pad_id, epoch, packing=None):
        batches = build(examples, config, pad_id, epoch, packing)
        seen.setdefault(epoch, (list(examples), batches))
        return batches

    monkeypatch.setattr(common, "epoch_micro_batches", spy)
    train(tmp_path, tiny_model, f"batches{len(seen)}{sorted(keys)}".replace(" ", ""), max_steps=1, **keys)
    return seen[0]


def test_curriculum_sampling_keeps_the_dataset_order(tmp_path, tiny_model, monkeypatch):
    rows, batches = batches_of(tmp_path, tiny_model, monkeypatch, curriculum_sampling=True, micro_batch_size=1)
    assert [b["input_ids"][0, :len(r["input_ids"])].tolist() for b, r in zip(batches, rows)] == \
        [list(r["input_ids"]) for r in rows]
    _, shuffled = batches_of(tmp_path, tiny_model, monkeypatch, micro_batch_size=1)
    assert [b["input_ids"].tolist() for b in shuffled] != [b["input_ids"].tolist() for b in batches]


def test_dataloader_drop_last_drops_the_short_last_batch(tmp_path, tiny_model, monkeypatch):
    rows, kept = batches_of(tmp_path, tiny_model, monkeypatch, micro_batch_size=5)
    _, dropped = batches_of(tmp_path, tiny_model, monkeypatch, micro_batch_size=5, dataloader_drop_last=True)
    assert len(rows) % 5 and kept[-1]["input_ids"].shape[0] == len(rows) % 5
    assert len(dropped) == len(kept) - 1 and all(b["input_ids"].shape[0] == 5 for b in dropped)


# --- eval, saving, logging -------------------------------------------------------------------------


def test_eval_strategy_no_turns_eval_off(tmp_path, tiny_model):
    on = train(tmp_path, tiny_model, "on", val_set_size=4, eval_steps=2)
    off = train(tmp_path, tiny_model, "off", val_set_size=4, eval_steps=2, eval_strategy="no")
    assert logged(on, "eval/loss") and not logged(off, "eval/loss")


def test_eval_strategy_epoch_evaluates_once_an_epoch(tmp_path, tiny_model):
    result = train(tmp_path, tiny_model, val_set_size=4, eval_strategy="epoch", max_steps=None, num_epochs=2,
                   micro_batch_size=4)
    per_epoch = (len(ROWS) - 4) // 4
    assert sorted(logged(result, "eval/loss")) == [0, per_epoch, 2 * per_epoch]


def test_save_first_step_saves_after_step_one(tmp_path, tiny_model):
    train(tmp_path, tiny_model, save_first_step=True, save_strategy="steps", save_steps=4)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == \
        ["checkpoint-1", "checkpoint-4", "checkpoint-5"]


def test_loss_watchdog_stops_the_run_after_patience_steps(tmp_path, tiny_model):
    result = train(tmp_path, tiny_model, loss_watchdog_threshold=1e-3, loss_watchdog_patience=2)
    assert result["step"] == 2 and result["watchdog"]
    assert (tmp_path / "run" / "adapter_config.json").is_file()  # stopped like a finished run: exported


def test_gc_steps_collects_every_n_steps(tmp_path, tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "collect_garbage", lambda: calls.append(1))
    train(tmp_path, tiny_model, gc_steps=2)
    assert len(calls) == 2  # after steps 2 and 4 of 5


def test_include_tkps_and_include_tokens_per_second(tmp_path, tiny_model):
    default = train(tmp_path, tiny_model, "default", max_steps=2)
    quiet = train(tmp_path, tiny_model, "quiet", max_steps=2, include_tkps=False, include_tokens_per_second=True)
    assert logged(default, "train/tokens_per_second") and not logged(quiet, "train/tokens_per_second")
    assert not logged(default, "train/run_tokens_per_second") and logged(quiet, "train/run_tokens_per_second")


def test_wandb_keys_reach_wandb_init(tmp_path, tiny_model, monkeypatch):
    seen = {}

    class Run:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: seen.update(kw) or Run()))
    train(tmp_path, tiny_model, max_steps=1, wandb_project="p", wandb_entity="team", wandb_run_id="abc123",
          wandb_mode="offline")
    assert (seen["project"], seen["entity"], seen["id"], seen["resume"]) == ("p", "team", "abc123", "allow")
    seen.clear()
    train(tmp_path, tiny_model, "off", max_steps=1, wandb_project="p", use_wandb=False)
    assert seen == {}


# --- the config edge itself ------------------------------------------------------------------------


def test_strict_true_refuses_overrides_of_keys_the_file_does_not_set(tmp_path, tiny_model):
    path = config_file(tmp_path, tiny_model, strict=True)
    assert load_config(path, ["--learning_rate", "2e-3"]).learning_rate == 2e-3
    with pytest.raises(ConfigError, match="strict: true.*'warmup_steps' is not one of them"):
        load_config(path, ["--warmup_steps", "2"])


def test_type_of_model_must_agree_with_the_head(tmp_path, tiny_model):
    assert load_config(config_file(tmp_path, tiny_model, model_type="LlamaForCausalLM")).model_type
    with pytest.raises(ConfigError, match="model_type: AutoModelForSequenceClassification needs reward_model: true"):
        load_config(config_file(tmp_path, tiny_model, model_type="AutoModelForSequenceClassification"))


def test_a_key_only_an_unbuilt_feature_reads_is_refused_by_name(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="trl.vllm_enable_sleep_mode is not supported yet by puretune .*sleep mode"):
        load_config(config_file(tmp_path, tiny_model, trl={"vllm_enable_sleep_mode": True}))
    with pytest.raises(ConfigError, match="trl.num_generations is a GRPO key .* without rl: "):
        load_config(config_file(tmp_path, tiny_model, trl={"num_generations": 4}))
    with pytest.raises(ConfigError, match=r"datasets\[0\].prompt_format is not supported yet"):
        load_config(config_file(tmp_path, tiny_model, datasets=[{"path": "x.jsonl", "type": "alpaca",
                                                                  "prompt_format": "{prompt}"}]))
    # at its default the same key is fine
    assert load_config(config_file(tmp_path, tiny_model, trl={"vllm_enable_sleep_mode": False})).trl.vllm_enable_sleep_mode is False


# --- model and tokenizer ----------------------------------------------------------------------------


def test_added_tokens_grow_the_embeddings_as_the_resize_keys_say(tmp_path, tiny_model):
    import math

    import torch

    base = common.load_model(load_config(config_file(tmp_path, tiny_model)))[0]["model.embed_tokens.weight"]
    drawn, config, tokenizer = common.load_model(load_config(config_file(tmp_path, tiny_model, tokens=["<a>", "<b>"])))
    rows = drawn["model.embed_tokens.weight"]
    assert rows.shape[0] == config.vocab_size == len(tokenizer) == base.shape[0] + 2
    assert abs(rows[-2:].std().item() - 0.02) < 0.01  # axolotl's default: drawn like a fresh init
    mean = common.load_model(load_config(config_file(tmp_path, tiny_model, tokens=["<a>", "<b>"],
                                                     mean_resizing_embeddings=True)))[0]["model.embed_tokens.weight"]
    torch.testing.assert_close(mean[-2:], base.mean(0).expand(2, -1))
    padded, config, _ = common.load_model(load_config(config_file(tmp_path, tiny_model, tokens=["<a>", "<b>"],
                                                                  resize_token_embeddings_to_32x=True)))
    assert config.vocab_size == padded["model.embed_tokens.weight"].shape[0] == math.ceil((base.shape[0] + 2) / 32) * 32


# --- LoRA and packing ------------------------------------------------------------------------------


def test_lora_target_modules_choose_the_adapted_linears(tmp_path, tiny_model):
    result = train(tmp_path, tiny_model, max_steps=1, lora_target_linear=False, lora_target_modules=["q_proj", "v_proj"])
    adapted = {path.rsplit(".", 1)[-1] for path in result["state"].trainable["lora"]}
    assert adapted == {"q_proj", "v_proj"}
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]


def test_lora_modules_to_save_lm_head_on_a_tied_model_trains_an_untied_head_that_peft_reloads(tmp_path, tiny_model):
    """axolotl's configs list [embed_tokens, lm_head] for tied models (Llama-3.2-1B, SmolLM2): PEFT
    gives each its own trainable copy of the shared matrix, so must we, and the adapter must reload."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from pure.models import forward

    path = config_file(tmp_path, tiny_model, max_steps=2, lora_modules_to_save=["embed_tokens", "lm_head"])
    result = run(load_config(path))
    trained = result["state"].trainable["params"]
    assert sorted(trained) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert not torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"])  # untied by training
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(saved)

    params, model_config, _, delta, lora_config = common.load_model_with_adapter(load_config(path))
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = forward(params, tokens, model_config, lora=delta, lora_config=lora_config).logits
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert base.config.tie_word_embeddings
    with torch.no_grad():
        reference = peft.PeftModel.from_pretrained(base, tmp_path / "run").eval()(tokens).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)  # fp32, same products in another order


def test_sample_packing_bin_size_caps_the_documents_per_row(tmp_path, tiny_model, monkeypatch):
    _, packed = batches_of(tmp_path, tiny_model, monkeypatch, sample_packing=True)
    _, single = batches_of(tmp_path, tiny_model, monkeypatch, sample_packing=True, sample_packing_bin_size=1)
    assert max(int(b["segment_ids"].max()) for b in packed) > 1
    assert max(int(b["segment_ids"].max()) for b in single) == 1
