"""Stopping a run: SIGTERM / SIGINT save a resumable checkpoint and exit 0, and resuming ends where a
straight run ends; a NaN loss stops the run naming the step and the last good checkpoint.
Tiny random model with the real SmolLM2 tokenizer, as in test_sft."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from programs.config import load_config
from programs.sft import run

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("signals")


def write_config(folder: Path, tiny_model: Path, name: str, **overrides) -> Path:
    rows = (DATA / "arithmetic_train.jsonl").read_text().splitlines()[:48]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    raw = {
        "base_model": str(tiny_model),
        "datasets": [{"path": str(folder / "train.jsonl"), "type": "chat_template"}],
        "val_set_size": 0, "dataset_prepared_path": str(folder / "prepared"),
        "sequence_len": 128, "sample_packing": True,
        "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_linear": True,
        "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 8,
        "learning_rate": 1e-2, "lr_scheduler": "cosine", "warmup_steps": 2, "optimizer": "adamw_torch",
        "save_steps": 100, "logging_steps": 1, "output_dir": str(folder / name), "seed": 5,
    }
    raw.update(overrides)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def last_checkpoint(output_dir: Path) -> Path:
    return sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]


def losses(records):
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


@pytest.fixture(scope="module")
def straight(workdir, tiny_model):
    result = run(load_config(write_config(workdir, tiny_model, "straight")))
    assert result["step"] == 8
    return result


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_resumable_checkpoint_exits_0_and_resume_matches_a_straight_run(
        workdir, tiny_model, straight, sig):
    name = f"stopped-{sig.name}"
    path = write_config(workdir, tiny_model, name)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "programs.sft", "--config", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The loop installs its handlers, then prints "training ..." before the first step: a signal
    # sent then is handled after the step that is running, as a signal in the middle of a run is.
    for line in proc.stdout:
        if line.startswith("training "):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"stopped by {sig.name} at step" in out
    stopped_at = int(out.split(f"stopped by {sig.name} at step ")[1].split(";")[0])
    assert 1 <= stopped_at < 8  # stopped mid-run, not at the end
    checkpoint = last_checkpoint(workdir / name)
    assert checkpoint.name == f"checkpoint-{stopped_at}"
    assert not (workdir / name / "adapter_model.safetensors").exists()  # no export: the run is not over

    resumed = run(load_config(write_config(workdir, tiny_model, name, auto_resume_from_checkpoints=True)))
    assert resumed["step"] == 8
    assert losses(resumed["records"]) == losses(straight["records"])
    mine, theirs = (load_file(str(last_checkpoint(workdir / n) / "state.safetensors")) for n in (name, "straight"))
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def test_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(workdir, tiny_model):
    # lr 1e30: step 1's loss is finite, its update sends the LoRA weights to ~1e30, so step 2's
    # forward overflows and its loss is not finite.
    path = write_config(workdir, tiny_model, "nan", learning_rate=1e30, lr_scheduler="constant", warmup_steps=None,
                        max_grad_norm=0.0, save_steps=1)
    with pytest.raises(FloatingPointError) as error:
        run(load_config(path))
    message = str(error.value)
    good = workdir / "nan" / "checkpoint-1"
    assert "at step 2" in message and str(good) in message, message
    state = load_file(str(good / "state.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert not (workdir / "nan" / "checkpoint-2").exists()


def test_nan_before_any_checkpoint_says_none_was_saved(workdir, tiny_model):
    path = write_config(workdir, tiny_model, "nan-early", learning_rate=1e30, lr_scheduler="constant",
                        warmup_steps=None, max_grad_norm=0.0)
    with pytest.raises(FloatingPointError, match="at step 2; no checkpoint was saved yet"):
        run(load_config(path))


def test_nan_guard_exits_2_with_one_line_from_the_command_line(workdir, tiny_model, capsys):
    from programs import sft

    path = write_config(workdir, tiny_model, "nan-cli", learning_rate=1e30, lr_scheduler="constant",
                        warmup_steps=None, max_grad_norm=0.0, save_steps=1, max_steps=3)
    with pytest.raises(SystemExit) as exit_:
        sft.main(["--config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: train/loss is ") and "at step 2" in last and "checkpoint-1" in last
