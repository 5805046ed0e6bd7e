"""programs.merge_sharded_fsdp_weights: a sharded checkpoint (backends.distributed.save_sharded, the
same format at any world size, so one process writes it here) consolidated into the run's export,
for a LoRA run (with a module saved whole) and a full fine-tune, and its one-line errors."""
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from backends.distributed import save_sharded
from programs import merge_sharded_fsdp_weights as merge
from programs.config import load_config
from programs.sft import run

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"

LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True,
        "lora_modules_to_save": ["lm_head"]}


def write_config(folder: Path, tiny_model, name: str, **overrides) -> Path:
    rows = (DATA / "arithmetic_train.jsonl").read_text().splitlines()[:16]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    raw = {"base_model": str(tiny_model), "datasets": [{"path": str(folder / "train.jsonl"), "type": "chat_template"}],
           "val_set_size": 0, "dataset_prepared_path": str(folder / "prepared"), "sequence_len": 128,
           "sample_packing": True, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2,
           "learning_rate": 1e-2, "optimizer": "adamw_torch", "save_steps": 2, "logging_steps": 1,
           "output_dir": str(folder / name), "seed": 3, **overrides}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trained(folder: Path, tiny_model, name: str, **overrides):
    """(config path, the state after 2 steps), its checkpoint-2 replaced by the same state sharded."""
    path = write_config(folder, tiny_model, name, **overrides)
    result = run(load_config(path))
    save_sharded(result["state"], Path(load_config(path).output_dir) / "checkpoint-2")
    return path, result["state"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    return trained(tmp_path_factory.mktemp("merge"), tiny_model, "lora", **LORA)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model):
    return trained(tmp_path_factory.mktemp("merge"), tiny_model, "full")


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_lora_checkpoint_merges_into_the_adapter_the_run_exported(lora_run, capsys):
    path, state = lora_run
    out = Path(load_config(path).output_dir)
    assert (out / "checkpoint-2" / ".metadata").is_file() and not (out / "checkpoint-2" / "state.safetensors").exists()
    assert merge.main(["--config", str(path)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out / "checkpoint-2") in line and str(out / "merged") in line and "step 2" in line

    merged = load_file(str(out / "merged" / "adapter_model.safetensors"))
    assert_same_tensors(merged, load_file(str(out / "adapter_model.safetensors")))  # export_policy's, same state
    peft = "base_model.model."
    for module, entry in state.trainable["lora"].items():
        assert torch.equal(merged[f"{peft}{module}.lora_A.weight"], entry["A"].float())
        assert torch.equal(merged[f"{peft}{module}.lora_B.weight"], entry["B"].float())
    assert torch.equal(merged[f"{peft}lm_head.weight"], state.trainable["params"]["lm_head.weight"])
    assert (out / "merged" / "adapter_config.json").is_file() and (out / "merged" / "tokenizer.json").is_file()


def test_full_checkpoint_merges_into_an_hf_model_of_the_trained_params(full_run, tmp_path):
    from backends.hf import load_pretrained

    path, state = full_run
    out = Path(load_config(path).output_dir)
    target = tmp_path / "consolidated"
    assert merge.main(["--config", str(path), "--checkpoint", str(out / "checkpoint-2"), f"--output={target}"]) == 0
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    assert_same_tensors(load_file(str(target / "model.safetensors")), load_file(str(out / "model" / "model.safetensors")))
    params, model_config, _ = load_pretrained(target)
    assert model_config.tie_word_embeddings and "lm_head.weight" not in state.trainable["params"]
    assert_same_tensors(params, state.trainable["params"])


def test_only_the_trainable_tensors_are_read(full_run, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    path, _ = full_run
    read = []
    original = dcp.FileSystemReader.read_data

    def recording(self, plan, planner):
        read.extend(item.dest_index.fqn for item in plan.items)
        return original(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemReader, "read_data", recording)
    assert merge.main(["--config", str(path), "--output", str(tmp_path / "merged")]) == 0
    assert read and all(name.startswith("trainable.params.") for name in read)


def test_schedule_free_run_merges_into_its_exported_x_weights(tmp_path, tiny_model):
    path, state = trained(tmp_path, tiny_model, "sf", optimizer="schedule_free_adamw")
    out = tmp_path / "sf"
    assert merge.main(["--config", str(path)]) == 0
    exported = load_file(str(out / "model" / "model.safetensors"))  # x = lerp(y, z, ...), not the trained y
    assert_same_tensors(load_file(str(out / "merged" / "model.safetensors")), exported)
    assert not torch.equal(exported["model.norm.weight"], state.trainable["params"]["model.norm.weight"])


def test_no_sharded_checkpoint_is_one_line_naming_output_dir(tmp_path, tiny_model, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    config = write_config(tmp_path, tiny_model, "empty")
    with pytest.raises(SystemExit) as exit_:
        merge.main(["--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no sharded checkpoint") and f"output_dir {out}" in err and "\n" not in err

    one_process = tmp_path / "checkpoint-7"
    one_process.mkdir()
    (one_process / "state.safetensors").write_bytes(b"")
    (one_process / "state.json").write_text("{}")
    with pytest.raises(SystemExit):
        merge.main(["--config", str(config), "--checkpoint", str(one_process)])
    assert "one-process checkpoint" in capsys.readouterr().err


def test_checkpoint_of_other_shapes_names_the_key(lora_run, tmp_path, capsys):
    path, _ = lora_run
    with pytest.raises(SystemExit):
        merge.main(["--config", str(path), "--lora_r", "8", "--output", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert "trainable.lora." in err and "[4, " in err and "expected torch.float32 [8, " in err
    assert not (tmp_path / "never").exists()
