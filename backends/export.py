"""Export trained weights in the formats the Hugging Face stack loads.

LoRA runs write a PEFT adapter folder (`adapter_model.safetensors` + `adapter_config.json`) that
`peft.PeftModel.from_pretrained` loads onto the base model; the same folder loads back into a
LoRA delta (`lora_model_dir`). Full runs write an HF model folder via `backends.hf.save_pretrained`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pure.lora import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded onto this model."""


def _atomic_folder(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))


def _commit_folder(tmp: Path, path: Path) -> None:
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if path.exists():
        old = path.with_name(f".{path.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def save_peft_adapter(path, lora: dict, lora_config: LoraConfig, *, modules_to_save: dict | None = None,
                      base_model_name_or_path: str | None = None, tokenizer=None) -> Path:
    """Write a PEFT LoRA adapter folder. `modules_to_save` are fully trained base params
    (e.g. `lm_head.weight`), saved under their PEFT names."""
    path = Path(path)
    tensors = {}
    for module, entry in lora.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = entry["A"].detach().float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = entry["B"].detach().float().contiguous().cpu()
        if "m" in entry:
            tensors[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"] = entry["m"].detach().float().contiguous().cpu()
    saved_modules = sorted({name.rsplit(".", 1)[0].rsplit(".", 1)[-1] for name in (modules_to_save or {})})
    for name, tensor in (modules_to_save or {}).items():
        tensors[PEFT_PREFIX + name] = tensor.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.r,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "use_rslora": lora_config.use_rslora,
        "use_dora": lora_config.use_dora,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in lora}),
        "modules_to_save": saved_modules or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tmp = _atomic_folder(path)
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _commit_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_peft_adapter(path, params: dict[str, torch.Tensor]) -> tuple[dict, LoraConfig, dict]:
    """Read a PEFT LoRA folder into (delta, LoraConfig, modules_to_save params), checked against `params`."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{path} is not a LoRA adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r} is not LORA")
    lora_config = LoraConfig(r=int(config["r"]), alpha=config.get("lora_alpha", 8),
                             dropout=config.get("lora_dropout", 0.0) or 0.0,
                             use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")))
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as e:
        raise AdapterError(f"{path / ADAPTER_WEIGHTS} cannot be read ({e})") from e
    delta, saved = {}, {}
    parts = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}
    for name, tensor in tensors.items():
        name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        name = name.replace(".default", "")
        for suffix, part in parts.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                if module + ".weight" not in params:
                    raise AdapterError(f"{path / ADAPTER_WEIGHTS}: {module} is not a layer of this model")
                delta.setdefault(module, {})[part] = tensor.float()
                break
        else:
            if name not in params:
                raise AdapterError(f"{path / ADAPTER_WEIGHTS}: {name} is not a parameter of this model")
            saved[name] = tensor.to(params[name].dtype)
    for module, entry in delta.items():
        out_features, in_features = params[module + ".weight"].shape
        if entry["A"].shape != (lora_config.r, in_features) or entry["B"].shape != (out_features, lora_config.r):
            raise AdapterError(
                f"{path}: {module} has A {list(entry['A'].shape)}, B {list(entry['B'].shape)}; "
                f"expected A [{lora_config.r}, {in_features}], B [{out_features}, {lora_config.r}] for r={lora_config.r}"
            )
    return delta, lora_config, saved
