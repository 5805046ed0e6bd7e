"""Export trained weights in the formats the Hugging Face stack loads.

LoRA runs write a PEFT adapter folder (`adapter_model.safetensors` + `adapter_config.json`) that
`peft.PeftModel.from_pretrained` loads onto the base model; the same folder loads back into a
LoRA delta (`lora_model_dir`). Full runs write an HF model folder via `backends.hf.save_pretrained`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from backends.atomic import atomic_files, atomic_folder
from pure.lora import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded onto this model."""


def save_peft_adapter(path, lora: dict, lora_config: LoraConfig, *, modules_to_save: dict | None = None,
                      base_model_name_or_path: str | None = None, tokenizer=None,
                      task_type: str = "CAUSAL_LM") -> Path:
    """Write a PEFT LoRA adapter (`adapter_model.safetensors`, `adapter_config.json`, and the
    tokenizer's files) into the folder `path`, which may hold other files (a run's output_dir).
    `modules_to_save` are fully trained base params (e.g. `lm_head.weight`), saved under their PEFT
    names. Each file is replaced atomically, the config last."""
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
        "task_type": task_type,
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
    # The config last: PEFT finds an adapter by its config, so once it is there the weights are too.
    with atomic_files(path, last=ADAPTER_CONFIG) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
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


# ---------------------------------------------------------------------------------------------
# Reward models: the base model plus a `score` head, as transformers' classification models.

# kind -> (architecture suffix, PEFT task_type)
REWARD_KINDS = {"sequence": ("ForSequenceClassification", "SEQ_CLS"), "token": ("ForTokenClassification", "TOKEN_CLS")}


def _reward_head(params, score, num_labels: int, kind: str, hidden_size: int | None) -> dict[str, torch.Tensor]:
    """The `score.*` tensors to export: those in `params`, overridden by `score` (a dict or the weight).

    Sequence classification has no bias (transformers builds `Linear(..., bias=False)`); token
    classification has one, written as zeros when the head was trained without it (the same function).
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward model kind must be one of {sorted(REWARD_KINDS)}, got {kind!r}")
    head = {k: v for k, v in (params or {}).items() if k.startswith("score.")}
    if isinstance(score, torch.Tensor):
        head["score.weight"] = score
    elif score is not None:
        head.update(score)
    if "score.weight" not in head:
        raise ValueError("no reward head to export: pass `score` ({'score.weight': ...}) "
                         "or params holding score.weight")
    weight = head["score.weight"]
    width = (weight.shape[-1] if weight.ndim else -1) if hidden_size is None else hidden_size
    if tuple(weight.shape) != (num_labels, width):
        raise ValueError(f"score.weight has shape {list(weight.shape)}; expected [num_labels={num_labels}, "
                         f"hidden_size={hidden_size if hidden_size is not None else 'E'}]")
    unknown = sorted(set(head) - {"score.weight", "score.bias"})
    if unknown:
        raise ValueError(f"unexpected reward head tensors {unknown}; a score head has score.weight (and score.bias)")
    if kind == "sequence" and "score.bias" in head:
        raise ValueError("a sequence-classification head has no bias (transformers' score is Linear(bias=False)); "
                         "drop score.bias or export kind='token'")
    if kind == "token" and "score.bias" not in head:
        head["score.bias"] = torch.zeros(num_labels, dtype=weight.dtype, device=weight.device)
    if "score.bias" in head and tuple(head["score.bias"].shape) != (num_labels,):
        raise ValueError(f"score.bias has shape {list(head['score.bias'].shape)}; expected [{num_labels}]")
    return {k: v.detach().to("cpu").contiguous() for k, v in head.items()}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _rewrite_weights(folder: Path, drop: set[str], add: dict[str, torch.Tensor]) -> None:
    """Remove `drop` from and add `add` to the safetensors weights of an HF folder (single file or
    shards; the added tensors go to the last shard and the index follows)."""
    from backends.hf import SAFETENSORS, SAFETENSORS_INDEX

    index_path = folder / SAFETENSORS_INDEX
    if not index_path.is_file():
        tensors = {k: v for k, v in load_file(str(folder / SAFETENSORS)).items() if k not in drop}
        save_file({**tensors, **add}, str(folder / SAFETENSORS), metadata={"format": "pt"})
        return
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    files = list(dict.fromkeys(weight_map.values()))
    target = files[-1]
    change = _nbytes(add.values())
    for name in files:
        if name != target and not any(weight_map.get(d) == name for d in drop):
            continue
        tensors = load_file(str(folder / name))
        change -= _nbytes(v for k, v in tensors.items() if k in drop)
        tensors = {**{k: v for k, v in tensors.items() if k not in drop}, **(add if name == target else {})}
        if tensors:
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
        else:
            (folder / name).unlink()
    weight_map = {k: v for k, v in weight_map.items() if k not in drop}
    weight_map.update({k: target for k in add})
    metadata = index.setdefault("metadata", {})
    if "total_size" in metadata:
        metadata["total_size"] += change
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def save_reward_model(path, params: dict, score, model_config, tokenizer, num_labels: int, kind: str = "sequence",
                      *, pad_token_id: int | None = None, id2label: dict | None = None,
                      max_shard_size: int | str | None = None) -> Path:
    """Write an HF reward-model folder: `<Arch>ForSequenceClassification` (`kind="sequence"`, outcome
    RM, usually num_labels 1) or `<Arch>ForTokenClassification` (`kind="token"`, PRM, num_labels 2).

    The base weights go through `backends.hf.save_pretrained`; then `lm_head.weight` is dropped (the
    classification models have none) and the `score` tensors are added; `config.json` gets the
    architecture, `id2label`/`label2id` (default `LABEL_i`) and `pad_token_id` (this argument, else the
    model config's, else the tokenizer's; a sequence classifier needs one to find each row's last
    token). `params` is the flat HF-named dict (LoRA already merged); `score` is the head dict of
    `pure.models.heads.init_score_head`, its weight tensor, or None when `params` holds `score.*`.
    `transformers.AutoModelFor{Sequence,Token}Classification.from_pretrained(path)` loads it.
    The folder appears complete or not at all. Returns `path`.
    """
    from backends.hf import save_pretrained

    path = Path(path).expanduser().absolute()
    head = _reward_head(params, score, num_labels, kind, model_config.hidden_size)
    if pad_token_id is None:
        pad_token_id = model_config.pad_token_id
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None and kind == "sequence":
        raise ValueError("save_reward_model: no pad_token_id (argument, model config or tokenizer); a sequence "
                         "classifier needs it to find the last token of padded rows")
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / "config.json").is_file())):
        raise FileExistsError(f"refusing to replace {path}: it exists and is not a model folder")
    base = {k: v for k, v in params.items() if not k.startswith("score.")}
    labels = {int(i): str(name) for i, name in (id2label or {i: f"LABEL_{i}" for i in range(num_labels)}).items()}
    if sorted(labels) != list(range(num_labels)):
        raise ValueError(f"id2label must name the labels 0..{num_labels - 1}, got keys {sorted(labels)}")
    with atomic_folder(path) as folder:
        save_pretrained(base, model_config.replace(pad_token_id=pad_token_id), tokenizer, folder,
                        max_shard_size=max_shard_size)
        _rewrite_weights(folder, {"lm_head.weight"}, head)
        config_path = folder / "config.json"
        hf = json.loads(config_path.read_text())
        suffix = REWARD_KINDS[kind][0]
        hf["architectures"] = [hf["architectures"][0].replace("ForCausalLM", suffix)]
        hf["id2label"] = {str(i): labels[i] for i in range(num_labels)}
        hf["label2id"] = {labels[i]: i for i in range(num_labels)}
        hf["num_labels"] = num_labels
        hf["pad_token_id"] = pad_token_id
        config_path.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        (folder / "generation_config.json").unlink(missing_ok=True)  # a classifier does not generate
    return path


def save_peft_reward_adapter(path, lora: dict, lora_config: LoraConfig, score, num_labels: int,
                             kind: str = "sequence", *, base_model_name_or_path: str | None = None,
                             tokenizer=None) -> Path:
    """Write a PEFT LoRA adapter of a reward model: `save_peft_adapter` with the score head as a
    module to save (`modules_to_save: ["score"]`) and `task_type` SEQ_CLS (`kind="sequence"`) or
    TOKEN_CLS (`kind="token"`), so `peft.PeftModel.from_pretrained(AutoModelFor...Classification...)`
    rebuilds the trained reward model. `score` is the head dict (or its weight tensor).
    """
    head = _reward_head(None, score, num_labels, kind, None)
    return save_peft_adapter(path, lora, lora_config, modules_to_save=head,
                             base_model_name_or_path=base_model_name_or_path, tokenizer=tokenizer,
                             task_type=REWARD_KINDS[kind][1])
