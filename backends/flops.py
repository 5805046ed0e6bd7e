"""Training FLOPs of a Llama-family step, and the machine's measured matmul peak.

Model FLOPs, in the sense of PaLM's MFU (Chowdhery et al. 2022, appendix B): the arithmetic the
training step *needs*, whatever an implementation spends on top (padding, lm_head on unsupervised
positions, gradient-checkpoint recomputation), so two trainers on the same documents are credited
the same work and the faster one shows the higher FLOP/s. A matmul with a weight of n parameters costs
2n FLOPs per token forward. Backward costs 2n again for the activation gradient, and 2n more for the
weight gradient only when that weight is trained: a frozen weight's gradient is never formed (LoRA).
Per optimizer step, with T real (non-pad) tokens, S supervised tokens (loss terms) and P causal
query-key pairs (sum over documents of L(L+1)/2, attention never crossing a document):

    F = 4 N_frozen T + 6 N_trained T + 12 n_layers d_attn P + c_head V E S

N_frozen / N_trained: decoder linear weights (q, k, v, o, gate, up, down) that are frozen / trained,
LoRA's A [r, in] and B [out, r] counting as trained weights of r (in + out) params; d_attn = heads x
head size; the attention term is QK^T and PV (2 d_attn per pair each) forward and twice that
backward (gradients for both operands of each product); c_head = 4 for a frozen lm_head (forward and
activation gradient) and 6 for a trained one. Biases, norms, rotary and softmax are ignored (under 1%
here), as are DoRA's norm and the backward through layer 0's frozen input (autograd skips it, so F
slightly over-counts a frozen first layer).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from kernels.measure import synchronize
from pure.models.config import ModelConfig, expected_param_shapes

_DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FlopCounter:
    """The constants of the formula in the module docstring for one model and trainable set."""

    frozen_matmul_params: int
    trained_matmul_params: int
    num_layers: int
    attention_width: int  # heads x head size
    head_params: int  # vocabulary x hidden size
    head_trained: bool

    def step_flops(self, tokens: int, attention_pairs: int, supervised: int) -> float:
        """F for a step of `tokens` real tokens, `attention_pairs` causal pairs and `supervised` loss terms."""
        head = (6 if self.head_trained else 4) * self.head_params * supervised
        return float(4 * self.frozen_matmul_params * tokens + 6 * self.trained_matmul_params * tokens
                     + 12 * self.num_layers * self.attention_width * attention_pairs + head)

    def six_n_flops(self, tokens: int, attention_pairs: int, adapter_params: int = 0) -> float:
        """The convention many trainers print, 6 (N_matmul + V E) T + 12 n_layers d_attn P: every base
        weight counted as trained, so a LoRA step is credited with weight gradients it never computes.
        N_matmul is the base model's: the `adapter_params` (LoRA's A and B, in N_trained) are left out."""
        base = self.frozen_matmul_params + self.trained_matmul_params - adapter_params + self.head_params
        return float(6 * base * tokens + 12 * self.num_layers * self.attention_width * attention_pairs)

    def formula(self) -> str:
        """The formula with this model's constants filled in, for the report."""
        c = 6 if self.head_trained else 4
        return (f"F = 4*N_frozen*T + 6*N_trained*T + 12*n_layers*d_attn*P + {c}*V*E*S with "
                f"N_frozen={self.frozen_matmul_params:,}, N_trained={self.trained_matmul_params:,}, "
                f"n_layers={self.num_layers}, d_attn={self.attention_width}, V*E={self.head_params:,}; "
                f"T = real tokens, P = sum over documents of L(L+1)/2, S = supervised tokens")


def flop_counter(config: ModelConfig, trainable: dict) -> FlopCounter:
    """The counter of `config` trained as `trainable` (`{"params": {...}, "lora": {path: {"A", "B"}}}`)."""
    trained_params = set((trainable.get("params") or {}).keys())
    frozen = trained = 0
    for name, shape in expected_param_shapes(config).items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is None or not name.startswith("model.layers.") or module.rsplit(".", 1)[-1] not in _DECODER_LINEARS:
            continue
        count = shape[0] * shape[1]
        if name in trained_params:
            trained += count
        else:
            frozen += count
    for path, entry in (trainable.get("lora") or {}).items():
        trained += entry["A"].numel() + entry["B"].numel()
    head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    return FlopCounter(
        frozen_matmul_params=frozen, trained_matmul_params=trained, num_layers=config.num_hidden_layers,
        attention_width=config.num_attention_heads * config.head_size,
        head_params=config.vocab_size * config.hidden_size, head_trained=head_name in trained_params,
    )


def attention_pairs(document_lengths: Sequence[int]) -> int:
    """P = sum of L(L+1)/2: the (query, key) pairs causal attention inside each document computes."""
    return sum(int(n) * (int(n) + 1) // 2 for n in document_lengths)


def measure_matmul_peak(device: str | torch.device = "cpu", size: int = 2048, repeats: int = 5,
                        dtype: torch.dtype = torch.float32) -> dict:
    """The best achieved FLOP/s of a `size`^3 matmul (2 size^3 FLOPs) over `repeats` timed runs after one
    warm-up, on `device` with torch's current thread count. A measured ceiling rather than a datasheet
    number, so fraction-of-peak compares across machines; on a contended machine it is what the
    machine gives now."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)  # a local generator: the global RNG is never touched
    a = torch.randn(size, size, generator=generator, dtype=dtype).to(device)
    b = torch.randn(size, size, generator=generator, dtype=dtype).to(device)
    torch.matmul(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return {"flops_per_s": 2 * size ** 3 / best, "size": size, "best_s": best, "repeats": repeats,
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
