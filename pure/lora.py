"""LoRA as a pytree delta next to frozen params.

The delta is `{module_path: {"A": [r, in], "B": [out, r]}}` (plus `"m": [out]` for DoRA), keyed by
the HF module name (`model.layers.0.self_attn.q_proj`). The forward computes
`x W^T + s (dropout(x) A^T) B^T` and never materialises `W + s B A` (in bf16 that merge rounds the
small update away); `merge_lora` does the merge in fp32 for export. `lora=None` is the base model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from pure import rng

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of an adapter (axolotl keys: lora_r, lora_alpha, lora_dropout, peft_use_rslora, peft_use_dora)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"lora_r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def target_paths(
    params: dict[str, torch.Tensor],
    target_modules: Sequence[str] | str | None = None,
    target_linear: bool = False,
) -> list[str]:
    """Module paths of the linear layers to adapt, as PEFT selects them.

    A list of names matches modules whose path ends with `.name` (or equals it); a string is a
    regex that must match the whole path; `target_linear` selects every linear layer of the
    decoder (not lm_head).
    """
    modules = sorted({name[: -len(".weight")] for name, w in params.items() if name.endswith(".weight") and w.ndim == 2})
    modules = [m for m in modules if not m.endswith("embed_tokens") and m != "lm_head"] + (
        ["lm_head"] if "lm_head.weight" in params else []
    )
    chosen = set()
    if target_linear:
        chosen |= {m for m in modules if m.rsplit(".", 1)[-1] in LINEAR_MODULES}
    if isinstance(target_modules, str):
        chosen |= {m for m in modules if re.fullmatch(target_modules, m)}
    elif target_modules:
        for name in target_modules:
            hits = {m for m in modules if m == name or m.endswith("." + name)}
            if not hits:
                known = sorted({m.rsplit(".", 1)[-1] for m in modules})
                raise ValueError(f"lora_target_modules entry {name!r} matches no linear layer; the model has {known}")
            chosen |= hits
    if not chosen:
        raise ValueError("LoRA selects no module: set lora_target_modules or lora_target_linear: true")
    return sorted(chosen, key=_natural_key)


def _natural_key(path: str):
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def init_lora(
    params: dict[str, torch.Tensor],
    config: LoraConfig,
    key: torch.Tensor,
    target_modules: Sequence[str] | str | None = None,
    target_linear: bool = False,
    dtype=torch.float32,
    dense=None,
) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh delta: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0,
    so the adapted model starts equal to the base. DoRA adds m = ||W||_row, with W = dense(weight)
    when the weights are not tensors (a quantised base)."""
    paths = target_paths(params, target_modules, target_linear)
    keys = rng.split(key, len(paths))
    delta = {}
    for path, k in zip(paths, keys):
        weight = params[path + ".weight"]
        out_features, in_features = weight.shape
        bound = 1.0 / math.sqrt(in_features)
        a = rng.uniform(k, (config.r, in_features), dtype=dtype, device=weight.device) * (2 * bound) - bound
        entry = {"A": a, "B": torch.zeros(out_features, config.r, dtype=dtype, device=weight.device)}
        if config.use_dora:
            w = weight if dense is None else dense(weight, torch.float32)
            entry["m"] = torch.linalg.norm(w.float(), dim=1).to(dtype)
        delta[path] = entry
    return delta


def loftq_factors(residual: torch.Tensor, config: LoraConfig) -> dict[str, torch.Tensor]:
    """LoftQ's factors (Li et al. 2023) for one weight: the best rank-r approximation of the
    quantisation residual R = W - Q, split evenly, R ~ (U_r S_r^1/2)(S_r^1/2 V_r^T) = s B A, so the
    adapted model W' = Q + s B A starts as close to the full-precision W as rank r allows.

    PEFT's `loftq_init` sets B A = (U_r S_r^1/2)(S_r^1/2 V_r^T) without the 1/s, which is this only
    when lora_alpha = r; dividing by s keeps LoftQ's objective for any alpha. One alternation (PEFT's
    default `loftq_iter` 1): Q is the base's own quantisation, so merge and inference rebuild it."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = (s[: config.r] / config.scale).sqrt()
    return {"A": root[:, None] * vh[: config.r], "B": u[:, : config.r] * root[None, :]}


def lora_keep_mask(x: torch.Tensor, config: LoraConfig, key: torch.Tensor | None) -> torch.Tensor | None:
    """The bool mask of the entries of x that LoRA dropout keeps (probability
    `rng.keep_probability(dropout)`, about 1 - dropout; one mask
    per module from its `key`, as each PEFT module has its own `nn.Dropout`), or None when there
    is no dropout (rate 0, or no key: evaluation)."""
    if config.dropout > 0.0 and key is not None:
        return rng.dropout_mask(key, config.dropout, x.shape, device=x.device)
    return None


def lora_dropout(x: torch.Tensor, config: LoraConfig, key: torch.Tensor | None) -> torch.Tensor | None:
    """drop(x) = x * keep / q (inverted dropout, PEFT's `lora_dropout`; q = `rng.keep_probability`),
    or None without dropout."""
    if config.dropout > 0.0 and key is not None:
        return rng.dropout(key, x, config.dropout)  # the mask of `lora_keep_mask`
    return None


def lora_linear(x, weight, bias, entry, config: LoraConfig, key=None, *, linear=F.linear, dense=None):
    """y = x W^T + b + s (drop(x) A^T) B^T; with DoRA (Liu et al. 2024) the base part is rescaled
    row-wise by m / ||W + s B A|| (norm detached, as in the paper and PEFT).

    linear(x, weight, bias) computes the base product and dense(weight) gives W as a tensor (DoRA's
    norm): the defaults take `weight` as a tensor; a quantised base passes its own
    (`kernels.quantized.quantized_lora_linear`)."""
    base = linear(x, weight, bias)
    dropped = lora_dropout(x, config, key)
    dropped = x if dropped is None else dropped
    a, b = entry["A"].to(x.dtype), entry["B"].to(x.dtype)
    low_rank = F.linear(F.linear(dropped, a), b) * config.scale
    if not config.use_dora:
        return base + low_rank
    with torch.no_grad():
        w = weight if dense is None else dense(weight, x.dtype)
        norm = torch.linalg.norm(w + config.scale * (b @ a), dim=1)
    mag_scale = (entry["m"].to(x.dtype) / norm).view(*([1] * (x.ndim - 1)), -1)
    base_no_bias = linear(dropped, weight, None) if dropped is not x else (base - bias if bias is not None else base)
    return base + (mag_scale - 1) * base_no_bias + mag_scale * low_rank


def merge_lora(params: dict[str, torch.Tensor], lora: dict, config: LoraConfig) -> dict[str, torch.Tensor]:
    """Params with W' = W + s B A (DoRA: W' = m (W + s B A) / ||W + s B A||_row), merged in fp32
    and cast back to each weight's dtype."""
    merged = dict(params)
    for path, entry in lora.items():
        weight = params[path + ".weight"]
        w = weight.float() + config.scale * (entry["B"].float() @ entry["A"].float())
        if config.use_dora:
            w = w * (entry["m"].float() / torch.linalg.norm(w, dim=1))[:, None]
        merged[path + ".weight"] = w.to(weight.dtype)
    return merged
