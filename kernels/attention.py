"""Attention dispatch: flash-attn varlen for packed rows on CUDA when installed, else SDPA.

The reference is `pure.models.llama.sdpa_attention` (SDPA with the boolean segment mask). The
varlen kernel reads document boundaries from the segment ids instead of a [T, S] mask, so packed
rows cost what their documents cost, not what the whole row would.
"""
from __future__ import annotations

import importlib.util

import torch

from pure.models.llama import sdpa_attention


def flash_attn_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths [n_docs + 1] (int32) of the flattened [B, T] rows, and the longest."""
    B, T = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::T] = True  # every row starts a document
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, torch.tensor([B * T], device=idx.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flash_varlen_attention(q, k, v, mask, causal, segment_ids=None):
    """flash_attn_varlen_func over the documents of packed rows (no cache, no sliding window)."""
    from flash_attn import flash_attn_varlen_func

    B, H, T, D = q.shape
    if segment_ids is None or k.shape[2] != T:
        return sdpa_attention(q, k, v, mask, causal, segment_ids)
    cu, longest = cu_seqlens_from_segments(segment_ids)
    to_tokens = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], D)
    out = flash_attn_varlen_func(to_tokens(q), to_tokens(k), to_tokens(v), cu, cu, longest, longest, causal=True)
    return out.reshape(B, T, H, D).transpose(1, 2)


def select_attention(device, dtype, sliding_window: int | None = None):
    """The fastest attention function available for this device, dtype and model."""
    if flash_attn_available(device) and dtype in (torch.float16, torch.bfloat16) and sliding_window is None:
        return flash_varlen_attention
    return sdpa_attention
