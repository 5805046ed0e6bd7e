"""The model configuration of the Llama family, converted from and to a Hugging Face `config.json` dict.

Pure: dict in, dataclass out. Reading the file is `backends.hf`'s job.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# model_type -> the architecture name transformers writes in `architectures`.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class UnsupportedArchitectureError(ValueError):
    """A checkpoint whose architecture the pure model does not implement."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the pure forward needs to know about a Llama-family model.

    `model_type` picks the small differences: qwen2 has biases on q/k/v, qwen3 has RMSNorm on
    q and k per head, mistral may use a sliding attention window.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # The `rope_parameters` / `rope_scaling` dict of HF ("llama3", "linear" or None/"default").
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (and o for llama's attention_bias)
    mlp_bias: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # Keys of the original config.json that we do not model, written back on save.
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"model_type {self.model_type!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        # qwen2 always has q/k/v biases; mistral never has attention biases whatever its config says.
        return self.model_type == "qwen2" or (self.attention_bias and self.model_type in ("llama", "qwen3"))

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type in ("llama", "qwen3")

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count of the base model (embeddings counted once when tied)."""
        h, i, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_size
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * layer + h + head


_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from the dict of an HF `config.json` (transformers 4.x or 5.x keys)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        archs = hf.get("architectures") or []
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r} architectures={archs}; "
            f"puretune implements {sorted(SUPPORTED_ARCHITECTURES)} "
            f"({', '.join(SUPPORTED_ARCHITECTURES.values())})"
        )
    values = {k: hf[k] for k in _FIELDS if k in hf}
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")
    if rope:
        rope = dict(rope)
        if "rope_theta" in rope:
            values["rope_theta"] = rope.pop("rope_theta")
        kind = rope.get("rope_type", rope.get("type", "default"))
        values["rope_scaling"] = None if kind == "default" else rope
    else:
        values["rope_scaling"] = None
    if model_type == "mistral" or model_type.startswith("qwen"):
        if not hf.get("use_sliding_window", model_type == "mistral"):
            values["sliding_window"] = None
    values["model_type"] = model_type
    if values.get("head_dim") is None:
        values.pop("head_dim", None)
    values["extra"] = {k: v for k, v in hf.items() if k not in _FIELDS}
    return ModelConfig(**values)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` dict transformers reads for this model."""
    hf = {k: v for k, v in config.extra.items() if k not in ("rope_parameters", "rope_scaling", "quantization_config")}
    for f in _FIELDS:
        hf[f] = getattr(config, f)
    hf["head_dim"] = config.head_size
    hf["architectures"] = [SUPPORTED_ARCHITECTURES[config.model_type]]
    rope = {"rope_type": "default"} if config.rope_scaling is None else dict(config.rope_scaling)
    rope["rope_theta"] = config.rope_theta
    hf["rope_parameters"] = rope  # transformers 5
    hf["rope_scaling"] = None if config.rope_scaling is None else dict(config.rope_scaling)  # transformers 4
    if config.model_type != "llama":
        hf.pop("mlp_bias", None)
    if config.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = config.sliding_window is not None
    hf.setdefault("torch_dtype", "float32")
    return hf


def expected_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`{hf_state_dict_name: shape}` of every parameter of the model, in HF order.

    `lm_head.weight` is absent when the embeddings are tied (it *is* `model.embed_tokens.weight`).
    """
    h, i, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        for name, out_features in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{attn}.{name}.weight"] = (out_features, h)
            if config.qkv_bias:
                shapes[f"{attn}.{name}.bias"] = (out_features,)
        shapes[f"{attn}.o_proj.weight"] = (h, q)
        if config.o_bias:
            shapes[f"{attn}.o_proj.bias"] = (h,)
        if config.qk_norm:
            shapes[f"{attn}.q_norm.weight"] = (hd,)
            shapes[f"{attn}.k_norm.weight"] = (hd,)
        for name, (out_features, in_features) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            shapes[f"{mlp}.{name}.weight"] = (out_features, in_features)
            if config.mlp_bias:
                shapes[f"{mlp}.{name}.bias"] = (out_features,)
        shapes[f"model.layers.{layer}.input_layernorm.weight"] = (h,)
        shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes
