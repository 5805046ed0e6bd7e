"""The SFT program end to end on a tiny random model with the real SmolLM2 tokenizer:
bitwise resume (also after SIGKILL), determinism, export, merge, guards."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from programs.config import ConfigError, load_config
from programs.sft import run
from pure import rng
from pure.tree import tree_leaves

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"


def write_config(tmp_path, tiny_model, name="run", **overrides):
    rows = (DATA / "arithmetic_train.jsonl").read_text().splitlines()[:48]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    raw = {
        "base_model": str(tiny_model),
        "datasets": [{"path": str(tmp_path / "train.jsonl"), "type": "chat_template"}],
        "val_set_size": 8, "dataset_prepared_path": str(tmp_path / "prepared"),
        "sequence_len": 128, "sample_packing": True,
        "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_linear": True,
        "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 8,
        "learning_rate": 1e-2, "lr_scheduler": "cosine", "warmup_steps": 2, "optimizer": "adamw_torch",
        "neftune_noise_alpha": 5.0, "save_steps": 4, "eval_steps": 4, "logging_steps": 1,
        "output_dir": str(tmp_path / name), "seed": 3,
    }
    raw.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trained_losses(result):
    return [(r["step"], r["train/loss"], r["train/grad_norm"], r["train/learning_rate"])
            for r in result["records"] if "train/loss" in r]


def final_state(output_dir):
    from safetensors.torch import load_file

    last = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    return load_file(str(last / "state.safetensors"))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bitwise_identical(tmp_path, tiny_model):
    straight = run(load_config(write_config(tmp_path, tiny_model, "straight")))
    assert straight["step"] == 8

    config = load_config(write_config(tmp_path, tiny_model, "split"))
    first = run(config, stop_after_step=5)
    assert first["stopped"] and first["step"] == 5
    resumed = run(load_config(write_config(tmp_path, tiny_model, "split", auto_resume_from_checkpoints=True)))
    assert resumed["step"] == 8
    assert trained_losses(resumed) == trained_losses(straight)
    assert_bitwise_equal(final_state(tmp_path / "split"), final_state(tmp_path / "straight"))


def test_same_config_twice_gives_bitwise_identical_runs(tmp_path, tiny_model):
    a = run(load_config(write_config(tmp_path, tiny_model, "a", max_steps=4)))
    b = run(load_config(write_config(tmp_path, tiny_model, "b", max_steps=4)))
    assert trained_losses(a) == trained_losses(b)
    assert_bitwise_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, tiny_model):
    straight = run(load_config(write_config(tmp_path, tiny_model, "straight", save_steps=2)))
    path = write_config(tmp_path, tiny_model, "killed", save_steps=2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "programs.sft", "--config", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint-4").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "killed" / "checkpoint-2").is_dir()
    resumed = run(load_config(write_config(tmp_path, tiny_model, "killed", save_steps=2,
                                           auto_resume_from_checkpoints=True)))
    assert resumed["step"] == 8
    assert trained_losses(resumed) == trained_losses(straight)
    assert_bitwise_equal(final_state(tmp_path / "killed"), final_state(tmp_path / "straight"))


def test_run_exports_an_adapter_that_merges_to_the_same_logits(tmp_path, tiny_model):
    from backends.export import load_peft_adapter
    from backends.hf import load_pretrained
    from programs import merge_lora
    from pure.models import forward

    path = write_config(tmp_path, tiny_model, "export", max_steps=4)
    result = run(load_config(path))
    out = tmp_path / "export"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "loss.png").is_file() and (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file()
    assert (out / "checkpoint-4").is_dir() and (out / "tokenizer.json").is_file()
    assert "eval/loss" in result["eval"]

    assert merge_lora.main(["--config", str(path)]) == 0
    params, config, _ = load_pretrained(tiny_model)
    delta, lora_config, _ = load_peft_adapter(out, params)
    merged, _, _ = load_pretrained(out / "merged")
    ids = rng.randint(rng.key(9), 0, config.vocab_size, (2, 12))
    with torch.no_grad():
        unmerged = forward(params, ids, config, lora=delta, lora_config=lora_config).logits
        from_merged = forward(merged, ids, config).logits
    assert (unmerged - from_merged).abs().max().item() <= 1e-4  # fp32 merge vs unmerged: op order only


def test_output_dir_of_another_config_is_refused(tmp_path, tiny_model):
    run(load_config(write_config(tmp_path, tiny_model, "guarded", max_steps=2)))
    changed = load_config(write_config(tmp_path, tiny_model, "guarded", max_steps=2, learning_rate=5e-3))
    with pytest.raises(ConfigError, match="different config"):
        run(changed)
    assert run(changed, overwrite=True)["step"] == 2


def test_dataset_smaller_than_one_batch_is_a_clear_error(tmp_path, tiny_model):
    config = load_config(write_config(tmp_path, tiny_model, "small", micro_batch_size=64,
                                      gradient_accumulation_steps=4))
    with pytest.raises(ValueError, match="fewer than one batch"):
        run(config)


def test_streamed_run_resumes_bitwise(tmp_path, tiny_model):
    streamed = dict(streaming=True, val_set_size=0, max_steps=6, save_steps=3,
                    streaming_multipack_buffer_size=16)
    straight = run(load_config(write_config(tmp_path, tiny_model, "stream_straight", **streamed)))
    assert straight["step"] == 6
    first = run(load_config(write_config(tmp_path, tiny_model, "stream_split", **streamed)), stop_after_step=3)
    assert first["stopped"] and first["step"] == 3
    resumed = run(load_config(write_config(tmp_path, tiny_model, "stream_split", auto_resume_from_checkpoints=True,
                                           **streamed)))
    assert trained_losses(resumed) == trained_losses(straight)
    assert_bitwise_equal(final_state(tmp_path / "stream_split"), final_state(tmp_path / "stream_straight"))


def test_streaming_without_max_steps_is_a_clear_error(tmp_path, tiny_model):
    config = load_config(write_config(tmp_path, tiny_model, "stream_nosteps", streaming=True, val_set_size=0,
                                      max_steps=None))
    with pytest.raises(ConfigError, match="max_steps"):
        run(config)


def test_bf16_autocast_run_trains_with_fp32_master_weights(tmp_path, tiny_model):
    result = run(load_config(write_config(tmp_path, tiny_model, "bf16", bf16=True, max_steps=2)))
    assert result["step"] == 2 and all(math.isfinite(r["train/loss"]) for r in trained_losses_records(result))
    assert all(t.dtype == torch.float32 for t in tree_leaves(result["state"].trainable))


def trained_losses_records(result):
    return [r for r in result["records"] if "train/loss" in r]


def test_fp16_run_scales_the_loss_and_resumes_bitwise_with_the_scaler_state(tmp_path, tiny_model):
    straight = run(load_config(write_config(tmp_path, tiny_model, "fp16", fp16=True, max_steps=4, save_steps=2)))
    records = trained_losses_records(straight)
    assert straight["step"] == 4 and all(math.isfinite(r["train/loss"]) for r in records)
    assert records[0]["train/loss_scale"] == 2.0 ** 16  # torch.amp.GradScaler's initial scale
    assert all(t.dtype == torch.float32 for t in tree_leaves(straight["state"].trainable))
    assert "loss_scale.scale" in final_state(tmp_path / "fp16")  # the scaler is checkpointed

    first = run(load_config(write_config(tmp_path, tiny_model, "fp16_split", fp16=True, max_steps=4, save_steps=2)),
                stop_after_step=2)
    assert first["stopped"]
    resumed = run(load_config(write_config(tmp_path, tiny_model, "fp16_split", fp16=True, max_steps=4,
                                           save_steps=2, auto_resume_from_checkpoints=True)))
    assert trained_losses(resumed) == trained_losses(straight)
    assert_bitwise_equal(final_state(tmp_path / "fp16_split"), final_state(tmp_path / "fp16"))
