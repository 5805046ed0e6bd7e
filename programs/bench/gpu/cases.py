"""What the GPU suite runs on: the Llama-3.2-1B shape, the packed row of its benchmark, and the
kernel-correctness cases (every kernel at several shapes, each with its reference and inputs)."""
from __future__ import annotations

from typing import Callable

import torch

from kernels.linear_ce import chunked_token_logprobs, select_token_logprob_fn
from kernels.lora_linear import lora_linear_triton, select_lora_linear
from kernels.rmsnorm import rms_norm_triton, select_rms_norm
from kernels.swiglu import select_swiglu, swiglu_reference, swiglu_triton
from kernels.triton_jit import triton_usable
from pure import rng
from pure.linear_ce import reference_token_logprobs
from pure.losses.common import IGNORE_INDEX
from pure.lora import LoraConfig, lora_linear
from pure.models.config import ModelConfig
from pure.models.llama import rms_norm

LLAMA_3_2_1B = ModelConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
)
# Documents of one packed 2048-token row (a spread of lengths, as packing produces).
DOCUMENT_LENGTHS = (700, 420, 333, 257, 190, 148)


def packed_batch(config: ModelConfig, document_lengths, key: torch.Tensor, device) -> dict:
    """One packed row [1, sum(lengths)]: random tokens, every token trained, positions restarting
    per document, segment ids 1, 2, ... (what `pure.data.packing.collate_packed` produces)."""
    total = sum(document_lengths)
    ids = rng.randint(key, 0, config.vocab_size, (1, total))
    segments = torch.cat([torch.full((n,), i + 1, dtype=torch.long) for i, n in enumerate(document_lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in document_lengths])[None]
    batch = {"input_ids": ids, "labels": ids.clone(), "positions": positions, "segment_ids": segments}
    return {k: v.to(device) for k, v in batch.items()}


def hf_labels(batch: dict) -> torch.Tensor:
    """Labels for a transformers model (which shifts them itself): the first token of every
    document is not a target, so no document learns to predict the next one's start."""
    labels = batch["labels"].clone()
    seg = batch["segment_ids"]
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return labels.masked_fill(starts, -100)


def supervised_tokens(batch: dict) -> int:
    return int((hf_labels(batch)[:, 1:] != -100).sum())


def _rms_case(shape, dtype, device):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
        w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device, dtype).requires_grad_()
        return (x, w), lambda fn: fn(x, w, 1e-5)
    return make


def _swiglu_case(shape, dtype, device):
    def make():
        g = torch.Generator().manual_seed(0)
        gate = (2 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
        up = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
        return (gate, up), lambda fn: fn(gate, up)
    return make


def _lora_case(tokens, in_features, out_features, r, dtype, device, bias=False, dropout=0.0):
    config = LoraConfig(r=r, alpha=1.5 * r, dropout=dropout)

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, in_features, generator=g).to(device, dtype).requires_grad_()
        w = (in_features ** -0.5 * torch.randn(out_features, in_features, generator=g)).to(device, dtype)
        b = (0.1 * torch.randn(out_features, generator=g)).to(device, dtype).requires_grad_() if bias else None
        a = (in_features ** -0.5 * torch.randn(r, in_features, generator=g)).to(device).requires_grad_()
        bb = (0.1 * torch.randn(out_features, r, generator=g)).to(device).requires_grad_()
        key = rng.key(3) if dropout else None
        inputs = (x, a, bb) + ((b,) if bias else ())
        return inputs, lambda fn: fn(x, w, b, {"A": a, "B": bb}, config, key)
    return make


def _linear_ce_case(tokens, hidden_size, vocab, dtype, device, train_head):
    def make():
        g = torch.Generator().manual_seed(0)
        h = torch.randn(tokens, hidden_size, generator=g).to(device, dtype).requires_grad_()
        w = (hidden_size ** -0.5 * torch.randn(vocab, hidden_size, generator=g)).to(device, dtype)
        w.requires_grad_(train_head)
        t = torch.randint(0, vocab, (tokens,), generator=g)
        t[::7] = IGNORE_INDEX  # masked prompt tokens
        t = t.to(device)
        return ((h, w) if train_head else (h,)), lambda fn: fn(h, w, t).logprobs
    return make


def _token_logprob_implementations(device, dtype) -> list[Callable]:
    """The dispatched head, and the vocabulary-tiled form (at least three tiles of at most 4096 rows),
    so the online log-sum-exp is checked on every device whatever the dispatcher picks."""
    dispatched = select_token_logprob_fn(device, dtype)

    def token_logprobs_dispatched(h, w, t):
        return dispatched(h, w, t)

    def token_logprobs_vocab_tiled(h, w, t):
        return chunked_token_logprobs(h, w, t, chunk_size=1024, vocab_chunk=min(4096, -(-w.shape[0] // 3)))

    return [token_logprobs_dispatched, token_logprobs_vocab_tiled]


def _implementations(dispatched: Callable, triton_version: Callable, device) -> list[Callable]:
    """The dispatched kernel, and the Triton one too where it runs compiled (if not the same)."""
    return [dispatched] + ([triton_version] if triton_usable(device) and triton_version is not dispatched else [])


def kernel_cases(device, dtype) -> list[tuple[str, Callable, Callable, Callable]]:
    """(name, implementation, reference, inputs) for every kernel at several shapes, including
    widths that are not multiples of any tile and the 1B model's own: the dispatched kernel, and
    the Triton kernel as well on CUDA (float32 LoRA dispatches to torch but Triton is checked)."""
    cases = []
    for shape in ((7, 576), (2, 1000, 2048), (3, 5, 40)):
        for fn in _implementations(select_rms_norm(device, dtype), rms_norm_triton, device):
            cases.append((f"rms_norm{list(shape)}", fn, rms_norm, _rms_case(shape, dtype, device)))
    for shape in ((7, 1536), (2048, 8192), (3, 5, 40)):
        for fn in _implementations(select_swiglu(device, dtype), swiglu_triton, device):
            cases.append((f"swiglu{list(shape)}", fn, swiglu_reference, _swiglu_case(shape, dtype, device)))
    lora_shapes = ((2048, 2048, 512, 16, False, 0.0), (1000, 576, 1536, 16, True, 0.0),
                   (333, 2048, 8192, 16, False, 0.1), (37, 40, 24, 3, True, 0.0))
    for tokens, fan_in, fan_out, r, bias, dropout in lora_shapes:
        variant = (" bias" if bias else "") + (" dropout" if dropout else "")
        name = f"lora_linear[{tokens}x{fan_in}->{fan_out} r={r}{variant}]"
        for fn in _implementations(select_lora_linear(device, dtype), lora_linear_triton, device):
            cases.append((name, fn, lora_linear, _lora_case(tokens, fan_in, fan_out, r, dtype, device, bias, dropout)))
    # the 1B model's head (frozen, as in LoRA), SmolLM2's head trained (full fine-tuning), a tiny one
    for tokens, hidden_size, vocab, train_head in ((1000, 2048, 128256, False), (300, 576, 49152, True),
                                                   (37, 40, 61, True)):
        name = f"linear_ce[{tokens}x{hidden_size} V={vocab}{' head trained' if train_head else ''}]"
        for fn in _token_logprob_implementations(device, dtype):
            cases.append((name, fn, reference_token_logprobs,
                          _linear_ce_case(tokens, hidden_size, vocab, dtype, device, train_head)))
    return cases
