"""Attention dispatch. The flash-attn path itself runs only on CUDA (checked by `programs.bench --suite gpu`)."""
import torch

from kernels.attention import cu_seqlens_from_segments, select_attention
from pure.models.llama import sdpa_attention


def test_cu_seqlens_split_rows_and_documents():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    cu, longest = cu_seqlens_from_segments(segments)
    assert cu.tolist() == [0, 2, 5, 6, 10, 12]
    assert longest == 4


def test_cpu_uses_sdpa():
    assert select_attention("cpu", torch.float32) is sdpa_attention
    assert select_attention("cpu", torch.bfloat16) is sdpa_attention
