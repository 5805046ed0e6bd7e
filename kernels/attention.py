"""Attention dispatch: on CUDA flash-attn varlen when installed, else torch's own varlen flash
kernel (`torch.nn.attention.varlen`); on CPU SDPA per document; else SDPA with the mask.

The reference is `pure.models.llama.sdpa_attention` (SDPA with the boolean segment mask, which
costs T x T per row whatever the documents, and cannot skip the causal upper triangle). The
varlen kernels (CUDA) and `document_attention` (CPU: one causal SDPA call per document) read the
document boundaries from the segment ids instead, so packed rows cost what their documents cost,
sum(L_i^2) / 2, not T^2. Measured with torch.profiler on this project's CPU (SmolLM2-135M LoRA
step, 4 rows of 512 packed with 120-480-token documents): SDPA forward+backward 2.05 s per step
with the mask, 1.19 s per document (of an 11.6 s step). The CUDA choice is not measured yet:
`programs.bench --suite gpu` checks and times every candidate (`attention_candidates`).
"""
from __future__ import annotations

import importlib.util
import weakref

import torch
import torch.nn.functional as F

from pure.models.llama import attention_mask, sdpa_attention


def flash_attn_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def flash_varlen_attention(q, k, v, mask, causal, segment_ids=None):
    """flash_attn_varlen_func over the documents of packed rows (no cache, no sliding window)."""
    from flash_attn import flash_attn_varlen_func

    bounds = document_boundaries(segment_ids) if _over_documents(q, k, segment_ids) else None
    if bounds is None:
        return _masked_attention(q, k, v, mask, causal, segment_ids)
    B, H, T, D = q.shape
    cu, longest = bounds
    out = flash_attn_varlen_func(_to_tokens(q), _to_tokens(k), _to_tokens(v), cu, cu, longest, longest, causal=True)
    return out.reshape(B, T, H, D).transpose(1, 2)


def torch_varlen_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """torch's varlen flash attention runs here: a CUDA GPU of compute capability 8.0 or newer (the
    flash kernel's floor), half precision, a torch that ships it."""
    device = torch.device(device)
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("torch.nn.attention.varlen") is not None
            and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0))


def torch_varlen_attention(q, k, v, mask, causal, segment_ids=None):
    """`torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 inside torch, CUDA only) over the
    documents of packed rows, causal. The key/value heads are repeated to the query heads first
    (query head h reads key head h // (H / K), as SDPA's enable_gqa and HF's repeat_kv do): torch
    2.11's varlen_attn has no GQA argument."""
    from torch.nn.attention.varlen import varlen_attn

    bounds = document_boundaries(segment_ids) if _over_documents(q, k, segment_ids) else None
    if bounds is None:
        return _masked_attention(q, k, v, mask, causal, segment_ids)
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    kt, vt = _to_tokens(k), _to_tokens(v)
    if groups > 1:
        kt, vt = kt.repeat_interleave(groups, dim=1), vt.repeat_interleave(groups, dim=1)
    cu, longest = bounds
    out = varlen_attn(_to_tokens(q), kt, vt, cu, cu, longest, longest, window_size=(-1, 0))
    return out.reshape(B, T, H, D).transpose(1, 2)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B * T, H, D], the varlen kernels' token-major layout."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B * T, H, D)


def _over_documents(q, k, segment_ids) -> bool:
    """Self-attention of packed rows: segment ids given and no KV cache (keys as long as queries)."""
    return segment_ids is not None and k.shape[2] == q.shape[2]


def _masked_attention(q, k, v, mask, causal, segment_ids):
    """The reference, building the segment mask when the caller (the model in varlen mode) built none."""
    if mask is None and _over_documents(q, k, segment_ids):
        mask = attention_mask(segment_ids, segment_ids, 0, None)
    return sdpa_attention(q, k, v, mask, causal, segment_ids)


# The model hands every layer the same segment-id tensor: its boundaries are read from the device
# once (for the first layer) and reused while that tensor is alive, not synchronised on per layer.
_BOUNDARIES: dict = {"ids": None, "version": None, "value": None}


def document_boundaries(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens [n_docs + 1] int32 on the ids' device, longest document) of the runs of
    `document_runs` with the rows laid end to end, or None when a row's ids are not contiguous runs
    (then only the mask is right)."""
    version = None if segment_ids.is_inference() else segment_ids._version  # inference tensors have none
    cached = _BOUNDARIES["ids"]
    if version is not None and cached is not None and cached() is segment_ids and _BOUNDARIES["version"] == version:
        return _BOUNDARIES["value"]
    runs = document_runs(segment_ids)
    if runs is None:
        value = None
    else:
        lengths = [length for row in runs for length in row]
        cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
        value = (cu.to(segment_ids.device), max(lengths))
    if version is not None:
        _BOUNDARIES.update(ids=weakref.ref(segment_ids), version=version, value=value)
    return value


def document_runs(segment_ids: torch.Tensor) -> list[list[int]] | None:
    """Per row, the lengths of its runs of equal segment ids (documents, then the padding), or
    None when an id comes back after another one (the runs would then not be the attention's
    blocks, and the mask has to decide)."""
    seg = segment_ids.detach().cpu()
    B, T = seg.shape
    starts = torch.ones(B, T, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    rows = []
    for b in range(B):
        first = torch.nonzero(starts[b]).flatten()
        if torch.unique(seg[b, first]).numel() != first.numel():
            return None
        edges = first.tolist() + [T]
        rows.append([end - begin for begin, end in zip(edges, edges[1:])])
    return rows


def document_attention(q, k, v, mask, causal, segment_ids=None):
    """Causal SDPA over each document of each packed row separately (same result as the segment
    mask: a token sees the earlier tokens of its own document; the padding run attends to itself).
    Rows and documents are cut with `unbind` / `split`, whose backwards are one stack / cat, not a
    zero-filled full-size gradient per piece. Without segment ids, with a KV cache (keys longer
    than the queries) or when a row's ids are not contiguous runs, this is the masked reference."""
    runs = document_runs(segment_ids) if _over_documents(q, k, segment_ids) else None
    if runs is None:
        return _masked_attention(q, k, v, mask, causal, segment_ids)
    rows = []
    for lengths, qr, kr, vr in zip(runs, q.unbind(0), k.unbind(0), v.unbind(0)):
        pieces = zip(qr.split(lengths, dim=1), kr.split(lengths, dim=1), vr.split(lengths, dim=1))
        # Each document's [H, L, D] output is concatenated token-major ([T, H, D]), so the caller's
        # transpose(1, 2).reshape(B, T, H * D) for o_proj is a view, not another copy.
        rows.append(torch.cat([F.scaled_dot_product_attention(qd[None], kd[None], vd[None], is_causal=True,
                                                              enable_gqa=True)[0].transpose(0, 1)
                               for qd, kd, vd in pieces], dim=0))
    out = rows[0][None] if len(rows) == 1 else torch.stack(rows)  # [B, T, H, D]
    return out.transpose(1, 2)


# Both read the documents from the segment ids: the model drops the padding and builds no mask for them.
document_attention.varlen = True
flash_varlen_attention.varlen = True
torch_varlen_attention.varlen = True


def select_attention(device, dtype, sliding_window: int | None = None):
    """The attention function for this device, dtype and model. A sliding window keeps the masked
    reference (the per-document paths do not apply a window)."""
    if sliding_window is not None:
        return sdpa_attention
    if flash_attn_available(device) and dtype in (torch.float16, torch.bfloat16):
        return flash_varlen_attention
    if torch_varlen_available(device, dtype):
        return torch_varlen_attention
    if torch.device(device).type == "cpu":
        return document_attention
    return sdpa_attention


def attention_candidates(device, dtype) -> dict:
    """Every formulation that runs on this device and dtype, by name (the reference first)."""
    found = {"sdpa_masked": sdpa_attention, "document_attention": document_attention}
    if torch_varlen_available(device, dtype):
        found["torch_varlen_attention"] = torch_varlen_attention
    if flash_attn_available(device) and dtype in (torch.float16, torch.bfloat16):
        found["flash_varlen_attention"] = flash_varlen_attention
    return found
