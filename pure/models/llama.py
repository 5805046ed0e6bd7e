"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM) as pure functions over a flat param dict.

Params are `{hf_state_dict_name: tensor}`; the forward reads them by name, so a safetensors file
loads with no renaming. Shapes: B batch, T new tokens, S keys (cache + new), H heads, K kv heads,
D head size, E hidden size, V vocabulary.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from pure import rng
from pure.lora import LoraConfig, lora_linear
from pure.remat import remat
from pure.models.config import ModelConfig, expected_param_shapes


class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far, per layer, and their segment ids.

    Functional: `forward` returns a new cache with the new tokens appended.
    keys[i], values[i]: [B, K, S, D]; segment_ids: [B, S].
    A preallocated cache (`filled` set, from `preallocated_cache`) holds buffers of S = capacity
    of which the first `filled` positions are written: `forward` writes the new tokens into the
    buffers in place (no copy of the past per step) and returns the same buffers with `filled`
    advanced, so the cache passed in must not be used again.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    segment_ids: torch.Tensor
    filled: int | None = None

    @property
    def length(self) -> int:
        return self.segment_ids.shape[1] if self.filled is None else self.filled


def empty_cache(config: ModelConfig, batch: int, dtype=torch.float32, device="cpu") -> KVCache:
    shape = (batch, config.num_key_value_heads, 0, config.head_size)
    empty = torch.zeros(shape, dtype=dtype, device=device)
    n = config.num_hidden_layers
    return KVCache((empty,) * n, (empty,) * n, torch.zeros(batch, 0, dtype=torch.long, device=device))


def preallocated_cache(cache: KVCache, capacity: int, rows: torch.Tensor | None = None) -> KVCache:
    """A preallocated cache of `capacity` positions holding `cache`'s tokens first, its rows picked
    by `rows` [B'] (e.g. each prompt's cache repeated for its n samples) or all of them."""
    length = cache.length
    if capacity < length:
        raise ValueError(f"preallocated_cache: capacity {capacity} is below the {length} tokens cached")

    def grow(t: torch.Tensor, seq_dim: int, fill) -> torch.Tensor:  # [B, ..., S(, D)] -> [B', ..., capacity(, D)]
        t = t.narrow(seq_dim, 0, length)
        t = t if rows is None else t.index_select(0, rows)
        shape = list(t.shape)
        shape[seq_dim] = capacity
        buffer = fill(shape)
        buffer.narrow(seq_dim, 0, length).copy_(t)
        return buffer

    # Keys and values past `filled` are never read (attention sees [:filled]), so they start unset;
    # segment ids past it stay 0 (padding) until written.
    keys = tuple(grow(k, 2, k.new_empty) for k in cache.keys)
    values = tuple(grow(v, 2, v.new_empty) for v in cache.values)
    return KVCache(keys, values, grow(cache.segment_ids, 1, cache.segment_ids.new_zeros), length)


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # [B, T, V], or [N, V] at the selected positions
    hidden: torch.Tensor  # final-normed hidden states [B, T, E] (what lm_head reads)
    hidden_states: dict[int, torch.Tensor]  # requested layers, HF numbering (0 = embeddings)
    cache: KVCache | None


# attention_fn(q [B,H,T,D], k [B,K,S,D], v [B,K,S,D], mask [B,1,T,S] bool or None, causal: bool) -> [B,H,T,D]
AttentionFn = Callable[..., torch.Tensor]


def sdpa_attention(q, k, v, mask, causal, segment_ids=None):
    """Reference attention: torch's scaled_dot_product_attention with GQA."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=True)


def attention_mask(q_segments, k_segments, past: int, sliding_window: int | None):
    """Boolean [B, 1, T, S] mask: same segment, causal by index, within the sliding window.

    A token attends to key s when both carry the same segment id and s <= past + t, so packed
    documents never see each other and padding (its own segment) never sees real tokens.
    """
    T, S = q_segments.shape[1], k_segments.shape[1]
    q_index = torch.arange(past, past + T, device=q_segments.device)[:, None]
    k_index = torch.arange(S, device=q_segments.device)[None, :]
    allowed = k_index <= q_index
    if sliding_window is not None:
        allowed = allowed & (q_index - k_index < sliding_window)
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return (same & allowed)[:, None]


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """Rotary inverse frequencies [D/2] in float32, computed as transformers does (llama3/linear scaling)."""
    dim = config.head_size
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (llama3, linear)")


def rope_tables(config: ModelConfig, positions: torch.Tensor, dtype):
    """cos, sin of shape [B, 1, T, D] for the given integer positions [B, T]."""
    inv = rope_inv_freq(config, positions.device)
    angles = positions[..., None].float() * inv  # [B, T, D/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rms_norm(x, weight, eps):
    """y = w * x / sqrt(mean(x^2) + eps), the statistics in float32 (as transformers does)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def swiglu(gate, up):
    """The gated MLP activation silu(gate) * up (SwiGLU, Shazeer 2020)."""
    return F.silu(gate) * up


class Ops(NamedTuple):
    """The hot ops of a layer; `kernels/` dispatchers swap in fused versions with these signatures."""

    attention: AttentionFn = None
    rms_norm: Callable = rms_norm
    swiglu: Callable = swiglu
    lora_linear: Callable = lora_linear
    linear: Callable = F.linear  # linear(x, weight, bias); a quantised base brings its own


def _linear(params, name, x, lora, lora_config, key, ops: Ops):
    weight, bias = params[name + ".weight"], params.get(name + ".bias")
    if lora is not None and name in lora:
        return ops.lora_linear(x, weight, bias, lora[name], lora_config, key)
    return ops.linear(x, weight, bias)


def _layer(params, i, x, cos, sin, config, seg, cache_kv, past, mask, causal, lora, lora_config, key, ops: Ops):
    p = f"model.layers.{i}."
    rms_norm = ops.rms_norm
    B, T, _ = x.shape
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_size
    keys = rng.split(key, 7) if key is not None else [None] * 7

    h = rms_norm(x, params[p + "input_layernorm.weight"], config.rms_norm_eps)
    q = _linear(params, p + "self_attn.q_proj", h, lora, lora_config, keys[0], ops).view(B, T, H, D)
    k = _linear(params, p + "self_attn.k_proj", h, lora, lora_config, keys[1], ops).view(B, T, K, D)
    v = _linear(params, p + "self_attn.v_proj", h, lora, lora_config, keys[2], ops).view(B, T, K, D)
    if config.qk_norm:
        q = rms_norm(q, params[p + "self_attn.q_norm.weight"], config.rms_norm_eps)
        k = rms_norm(k, params[p + "self_attn.k_norm.weight"], config.rms_norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|K, T, D]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache_kv is not None and len(cache_kv) == 3:  # preallocated: write in place, attend to the filled part
        cache_k, cache_v, end = cache_kv
        cache_k[:, :, past:end] = k
        cache_v[:, :, past:end] = v
        k, v = cache_k[:, :, :end], cache_v[:, :, :end]
    elif cache_kv is not None:
        k = torch.cat((cache_kv[0], k), dim=2)
        v = torch.cat((cache_kv[1], v), dim=2)
    attn = ops.attention(q, k, v, mask, causal, seg)  # [B, H, T, D]
    attn = attn.transpose(1, 2).reshape(B, T, H * D)
    x = x + _linear(params, p + "self_attn.o_proj", attn, lora, lora_config, keys[3], ops)

    h = rms_norm(x, params[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
    gate = _linear(params, p + "mlp.gate_proj", h, lora, lora_config, keys[4], ops)
    up = _linear(params, p + "mlp.up_proj", h, lora, lora_config, keys[5], ops)
    x = x + _linear(params, p + "mlp.down_proj", ops.swiglu(gate, up), lora, lora_config, keys[6], ops)
    return x, k, v


def forward(
    params: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    config: ModelConfig,
    *,
    positions: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    lora: dict | None = None,
    lora_config: LoraConfig | None = None,
    dropout_key: torch.Tensor | None = None,
    cache: KVCache | None = None,
    hidden_layers: Sequence[int] = (),
    logits_at: torch.Tensor | str | None = None,
    compute_logits: bool = True,
    checkpoint_layers: bool = False,
    attention_fn: AttentionFn = sdpa_attention,
    embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rms_norm_fn: Callable = rms_norm,
    swiglu_fn: Callable = swiglu,
    lora_linear_fn: Callable = lora_linear,
    linear_fn: Callable = F.linear,
) -> ModelOutput:
    """Run the model on `tokens` [B, T].

    positions: [B, T] rotary positions (default 0..T-1 after the cache). segment_ids: [B, T]
    document ids of packed rows (attention never crosses a boundary; padding is its own segment).
    With an `attention_fn` that reads documents from the segment ids (`attention_fn.varlen`), the
    padding (segment 0) is dropped before the first layer and the real tokens of all rows run as
    one row; `hidden` comes back as [B, T, E] with zeros at the padding.
    lora / lora_config: the LoRA delta pytree and its hyper-parameters; `dropout_key` drives
    LoRA dropout (no dropout without a key). cache: a `KVCache` to extend (decoding).
    hidden_layers: HF-numbered hidden states to return. logits_at: None for every position,
    "last" for the last one, or a bool mask [B, T] selecting positions (logits [N, V]), so training
    never computes lm_head for masked tokens. embed_fn: transforms the input embeddings (NEFTune).
    attention_fn, rms_norm_fn, swiglu_fn, lora_linear_fn: the hot ops (fused kernels from
    `kernels/` dispatchers; the references here by default). linear_fn(x, weight, bias): the
    decoder's other linear layers (a quantised base's weights are not tensors: its linear reads
    them, `kernels.quantized.quantized_linear`)."""
    ops = Ops(attention_fn, rms_norm_fn, swiglu_fn, lora_linear_fn, linear_fn)
    B, T = tokens.shape
    past = cache.length if cache is not None else 0
    if positions is None:
        positions = torch.arange(past, past + T, device=tokens.device).expand(B, T)
    x = F.embedding(tokens, params["model.embed_tokens.weight"])
    if embed_fn is not None:
        x = embed_fn(x)
    real = None
    varlen = segment_ids is not None and cache is None and getattr(attention_fn, "varlen", False)
    if varlen and not bool((keep := segment_ids > 0).all()):
        # Document-aware attention: drop the padding (segment 0) and run the real tokens of all rows
        # as one row of documents (ids made unique across rows); scattered back after the last norm.
        real = keep
        offsets = torch.arange(B, device=tokens.device)[:, None] * (int(segment_ids.max()) + 1)
        x, positions, segment_ids = x[real][None], positions[real][None], (segment_ids + offsets)[real][None]
    cos, sin = rope_tables(config, positions, x.dtype)

    need_mask = segment_ids is not None or cache is not None
    if config.sliding_window is not None and past + T > config.sliding_window:
        need_mask = True
    if varlen:  # the attention reads the documents from the segment ids; no [T, T] mask is built
        seg, k_seg, mask = segment_ids, segment_ids, None
    elif need_mask:
        seg = segment_ids if segment_ids is not None else torch.ones(B, T, dtype=torch.long, device=tokens.device)
        if cache is not None and cache.filled is not None:
            cache.segment_ids[:, past:past + T] = seg
            k_seg = cache.segment_ids[:, :past + T]
        else:
            k_seg = torch.cat((cache.segment_ids, seg), dim=1) if cache is not None else seg
        mask = attention_mask(seg, k_seg, past, config.sliding_window)
    else:
        seg, k_seg, mask = None, None, None
    causal = mask is None and not varlen

    layer_keys = rng.split(dropout_key, config.num_hidden_layers) if dropout_key is not None else None
    hidden_states, new_keys, new_values = {}, [], []
    for i in range(config.num_hidden_layers):
        if i in hidden_layers:
            hidden_states[i] = x
        cache_kv = None if cache is None else (cache.keys[i], cache.values[i]) if cache.filled is None \
            else (cache.keys[i], cache.values[i], past + T)
        key = layer_keys[i] if layer_keys is not None else None
        if checkpoint_layers and torch.is_grad_enabled():
            # Hand the layer only its own params so the recomputation keeps no other tensor alive.
            prefix = f"model.layers.{i}."
            layer_params = {k: v for k, v in params.items() if k.startswith(prefix)}
            layer_lora = {k: v for k, v in lora.items() if k.startswith(prefix)} if lora is not None else None
            x, k, v = remat(_layer)(
                layer_params, i, x, cos, sin, config, seg, cache_kv, past, mask, causal, layer_lora, lora_config, key, ops,
            )
        else:
            x, k, v = _layer(
                params, i, x, cos, sin, config, seg, cache_kv, past, mask, causal, lora, lora_config, key, ops
            )
        new_keys.append(k)
        new_values.append(v)

    hidden = rms_norm_fn(x, params["model.norm.weight"], config.rms_norm_eps)
    if config.num_hidden_layers in hidden_layers:
        hidden_states[config.num_hidden_layers] = hidden
    if real is not None:  # back to [B, T, E], zeros at the padding
        hidden = _unflatten(hidden, real)
        hidden_states = {i: _unflatten(h, real) for i, h in hidden_states.items()}
    if cache is not None and cache.filled is not None:
        new_cache = cache._replace(filled=past + T)
    else:
        new_cache = KVCache(tuple(new_keys), tuple(new_values), k_seg) if cache is not None else None

    logits = None
    if compute_logits:
        selected = hidden
        if isinstance(logits_at, str):
            if logits_at != "last":
                raise ValueError(f"logits_at must be None, 'last' or a bool mask, got {logits_at!r}")
            selected = hidden[:, -1:]
        elif logits_at is not None:
            selected = hidden[logits_at]
        logits = F.linear(selected, lm_head_weight(params, config))
    return ModelOutput(logits, hidden, hidden_states, new_cache)


def _unflatten(h: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[1, N, E] states of the real tokens back into [B, T, E] rows (zeros where `real` is False)."""
    return h.new_zeros(*real.shape, h.shape[-1]).index_put((real,), h[0])


def lm_head_weight(params, config: ModelConfig) -> torch.Tensor:
    return params["model.embed_tokens.weight"] if config.tie_word_embeddings else params["lm_head.weight"]


def init(config: ModelConfig, key: torch.Tensor, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """Random params of any size, as transformers initialises them: N(0, initializer_range) for
    matrices and embeddings, ones for norms, zeros for biases."""
    shapes = expected_param_shapes(config)
    keys = rng.split(key, len(shapes))
    params = {}
    for (name, shape), k in zip(sorted(shapes.items()), keys):
        if name.endswith("norm.weight"):
            params[name] = torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            params[name] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            params[name] = rng.normal(k, shape, dtype=dtype, device=device, std=config.initializer_range)
    return params


def resize_embeddings(params: dict[str, torch.Tensor], config: ModelConfig, vocab_size: int, *,
                      key: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(params, config) with the embedding (and an untied lm_head) grown to `vocab_size` rows.

    Without `key` each new row is the mean of the existing rows, E_new = (1/V) sum_v E_v (Hewitt
    2021, "Initializing new word embeddings for pretrained language models"): a new token's logit is
    then the mean of the old tokens' logits, h . E_new = (1/V) sum_v h . E_v, so until it trains it
    takes little probability and the model's distributions over the old vocabulary barely move.
    (transformers' `mean_resizing` samples around this mean with 1e-9 times the rows' covariance.)
    With `key` the new rows are drawn N(0, initializer_range^2), transformers' `_init_weights`.
    """
    params = dict(params)
    names = ["model.embed_tokens.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    keys = rng.split(key, len(names)) if key is not None else [None] * len(names)
    for name, k in zip(names, keys):
        w = params[name]
        shape = (vocab_size - w.shape[0], w.shape[1])
        extra = w.mean(0, keepdim=True).expand(*shape) if k is None else \
            (rng.normal(k, shape, dtype=torch.float32) * config.initializer_range).to(w.device, w.dtype)
        params[name] = torch.cat([w, extra], dim=0)
    return params, config.replace(vocab_size=vocab_size)
