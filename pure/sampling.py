"""Autoregressive sampling with the KV cache, driven by an explicit key.

Prompts of different lengths are left-padded: padding is segment 0 (attended by nothing real) and
positions count real tokens only, so each row decodes exactly as it would alone.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from pure import rng
from pure.models.config import ModelConfig
from pure.models.llama import empty_cache, forward, sdpa_attention


def sample_logits(logits: torch.Tensor, key, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Next tokens [B] from logits [B, V]: greedy when temperature == 0 (or no key), else
    temperature / top-k / nucleus sampling with the Gumbel-max trick on the key's noise."""
    if temperature <= 0.0 or key is None:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    u = rng.uniform(key, logits.shape, device=logits.device).clamp_(1e-20, 1.0)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def generate_tokens(
    params: dict,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    key: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    lora=None,
    lora_config=None,
    attention_fn=sdpa_attention,
    ops: dict | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, one step at a time ([B] int64), until every row has
    produced an end-of-sequence token or `max_new_tokens` steps ran. Finished rows yield pad.
    ops: more of `forward`'s op arguments (`linear_fn`, `lora_linear_fn` of a quantised base)."""
    device = params["model.embed_tokens.weight"].device
    dtype = params["model.embed_tokens.weight"].dtype
    B, longest = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, longest), pad_token_id, dtype=torch.long, device=device)
    segments = torch.zeros(B, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
        segments[i, longest - len(p):] = 1
    positions = (segments.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = empty_cache(config, B, dtype=dtype, device=device)
    step_keys = rng.split(key, max_new_tokens) if key is not None else [None] * max_new_tokens
    for step in range(max_new_tokens):
        out = forward(params, tokens, config, positions=positions, segment_ids=segments, cache=cache,
                      logits_at="last", lora=lora, lora_config=lora_config, attention_fn=attention_fn,
                      **(ops or {}))
        cache = out.cache
        next_tokens = sample_logits(out.logits[:, -1], step_keys[step], temperature, top_k, top_p)
        next_tokens = torch.where(done, torch.full_like(next_tokens, pad_token_id), next_tokens)
        yield next_tokens
        done = done | torch.isin(next_tokens, eos)
        if bool(done.all()):
            return
        tokens = next_tokens[:, None]
        positions = positions[:, -1:] + 1
        segments = torch.ones(B, 1, dtype=torch.long, device=device)
