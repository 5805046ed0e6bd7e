"""Attention dispatch. The flash-attn path itself runs only on CUDA (checked by `programs.bench --suite gpu`)."""
import importlib.util

import pytest
import torch

from kernels import attention
from kernels.attention import (
    attention_candidates,
    document_attention,
    document_boundaries,
    document_runs,
    select_attention,
    torch_varlen_attention,
)
from pure import rng
from pure.models.llama import attention_mask, sdpa_attention


def test_document_boundaries_split_rows_and_runs_and_are_read_once_per_tensor(monkeypatch):
    segments = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    cu, longest = document_boundaries(segments)
    assert cu.tolist() == [0, 2, 5, 6, 10, 12] and cu.dtype == torch.int32 and longest == 4
    reads = []
    monkeypatch.setattr(attention, "document_runs", lambda ids: reads.append(ids) or [[6], [6]])
    assert document_boundaries(segments)[0].tolist() == [0, 2, 5, 6, 10, 12] and not reads  # the same tensor
    segments[0, 0] = 7  # changed in place: read again
    assert document_boundaries(segments)[0].tolist() == [0, 6, 12] and len(reads) == 1
    other = segments.clone()  # another tensor with the same values: read again
    document_boundaries(other)
    assert len(reads) == 2


def test_document_boundaries_refuse_ids_that_come_back():
    assert document_boundaries(torch.tensor([[1, 2, 1, 0]])) is None


def test_document_boundaries_of_inference_tensors_are_read_each_time():
    with torch.inference_mode():  # no version counter to tell an in-place change: nothing is cached
        segments = torch.tensor([[1, 1, 2]])
        assert document_boundaries(segments)[0].tolist() == [0, 2, 3]
        segments[0, 2] = 1
        assert document_boundaries(segments)[0].tolist() == [0, 3]


def test_cpu_attends_per_document_and_a_sliding_window_keeps_the_mask():
    assert select_attention("cpu", torch.float32) is document_attention
    assert select_attention("cpu", torch.bfloat16) is document_attention
    assert select_attention("cpu", torch.float32, sliding_window=64) is sdpa_attention
    assert list(attention_candidates("cpu", torch.bfloat16)) == ["sdpa_masked", "document_attention"]


def test_cuda_without_flash_attn_takes_torchs_varlen_kernel_in_half_precision_from_ampere_on(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_available", lambda device: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:  # an older torch (2.6 has none)
        assert select_attention("cuda", torch.bfloat16) is sdpa_attention
        return
    assert select_attention("cuda", torch.bfloat16) is torch_varlen_attention
    assert select_attention("cuda", torch.float32) is sdpa_attention  # the flash kernel has no fp32
    assert "torch_varlen_attention" in attention_candidates("cuda", torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no flash kernel
    assert select_attention("cuda", torch.float16) is sdpa_attention


def test_document_runs_are_the_contiguous_segments_of_each_row():
    assert document_runs(torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])) == [[2, 3, 1], [6]]
    assert document_runs(torch.tensor([[1, 2, 1, 0]])) is None  # id 1 comes back: only the mask is right


SEGMENTS = {
    "packed with padding": [[1] * 5 + [2] * 9 + [3] * 3 + [0] * 3, [1] * 12 + [2] * 8],
    "one document per row": [[1] * 20, [1] * 20],
    "padded rows": [[1] * 14 + [0] * 6, [1] * 7 + [0] * 13],
    "single-token documents": [[1, 2, 3, 4] + [5] * 16, [1] * 19 + [2]],
    "non-contiguous ids": [[1] * 5 + [2] * 5 + [1] * 10, [1] * 20],
}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", list(SEGMENTS))
def test_document_attention_matches_the_masked_reference_forward_and_backward(name, dtype, tol):
    # fp32: the same sums in a different blocking (1e-5 relative); bf16: 8 mantissa bits (1e-2).
    seg = torch.tensor(SEGMENTS[name])
    B, H, K, T, D = 2, 6, 2, seg.shape[1], 16
    q, k, v = (rng.normal(rng.key(i), shape).to(dtype).requires_grad_()
               for i, shape in enumerate([(B, H, T, D), (B, K, T, D), (B, K, T, D)]))
    mask = attention_mask(seg, seg, 0, None)
    grad = rng.normal(rng.key(9), (B, H, T, D)).to(dtype)
    outs = []
    for fn in (sdpa_attention, document_attention):
        out = fn(q, k, v, mask, False, seg)
        outs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for ref, got in zip(*outs):
        scale = ref.float().abs().max()
        assert ((got.float() - ref.float()).abs().max() / scale).item() < tol


def test_document_attention_with_padding_mask_none_falls_back_to_the_segment_mask():
    seg = torch.tensor([[1] * 5 + [2] * 5 + [1] * 6])  # id 1 comes back: runs are not the blocks
    q, k, v = (rng.normal(rng.key(i), (1, 2, 16, 8)) for i in range(3))
    expected = sdpa_attention(q, k, v, attention_mask(seg, seg, 0, None), False, seg)
    assert torch.allclose(document_attention(q, k, v, None, True, seg), expected, atol=1e-6)


def test_the_model_drops_padding_for_varlen_attention_with_the_same_result():
    # fp32: the same per-token math on a [1, N] row instead of [B, T] rows (1e-5 relative).
    from pure.lora import LoraConfig, init_lora
    from pure.models import ModelConfig, forward, init

    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    params = init(config, rng.key(0))
    lora_config = LoraConfig(r=4, alpha=8, dropout=0.0)
    lora = init_lora(params, lora_config, rng.key(1), target_linear=True)
    lora = {p: dict(e, B=rng.normal(rng.fold_in(rng.key(2), i), e["B"].shape, std=0.1)) for i, (p, e) in enumerate(lora.items())}
    seg = torch.tensor([[1] * 6 + [2] * 7 + [0] * 3, [1] * 11 + [0] * 5, [1] * 16])
    positions = torch.stack([torch.cat([torch.arange(n) for n in torch.unique_consecutive(r, return_counts=True)[1].tolist()])
                             for r in seg])
    tokens = rng.randint(rng.key(3), 0, config.vocab_size, seg.shape)
    real = seg > 0
    results = []
    for fn in (sdpa_attention, document_attention):
        trainable = {p: {k: t.clone().requires_grad_() for k, t in e.items()} for p, e in lora.items()}
        out = forward(params, tokens, config, positions=positions, segment_ids=seg, lora=trainable,
                      lora_config=lora_config, attention_fn=fn, hidden_layers=(1,), logits_at=real)
        loss = out.logits.logsumexp(-1).sum()
        grads = torch.autograd.grad(loss, [t for e in trainable.values() for t in e.values()])
        results.append((out, grads))
    (ref, ref_grads), (got, got_grads) = results
    assert got.hidden.shape == ref.hidden.shape and torch.all(got.hidden[~real] == 0)
    assert torch.allclose(got.hidden[real], ref.hidden[real], rtol=1e-5, atol=1e-5)
    assert torch.allclose(got.hidden_states[1][real], ref.hidden_states[1][real], rtol=1e-5, atol=1e-5)
    assert torch.allclose(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), **kwargs):
    """torch's varlen_attn as documented, in plain SDPA per document: [tokens, H, D] in and out,
    query and key heads equal (torch 2.11 has no GQA argument), window (-1, 0) = causal."""
    assert not kwargs and query.shape[1] == key.shape[1] == value.shape[1]
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
    assert max(lengths) == max_q and sum(lengths) == query.shape[0]
    pieces = [torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=window_size == (-1, 0)).transpose(0, 1)
        for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths))]
    return torch.cat(pieces)


@pytest.mark.parametrize("name", list(SEGMENTS))
def test_torch_varlen_attention_lays_out_documents_and_heads_like_the_masked_reference(name, monkeypatch):
    # The kernel itself is CUDA-only; this checks our side (token-major layout, GQA head order,
    # boundaries across rows, causal window, fallback) with the documented semantics standing in.
    # fp32, the same sums in another blocking: 1e-5 relative.
    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="this torch has no varlen attention")
    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen_attn)
    seg = torch.tensor(SEGMENTS[name])
    B, H, K, T, D = 2, 6, 2, seg.shape[1], 16
    q, k, v = (rng.normal(rng.key(i), shape).requires_grad_()
               for i, shape in enumerate([(B, H, T, D), (B, K, T, D), (B, K, T, D)]))
    grad = rng.normal(rng.key(9), (B, H, T, D))
    outs = []
    for fn, mask in ((sdpa_attention, attention_mask(seg, seg, 0, None)), (torch_varlen_attention, None)):
        out = fn(q, k, v, mask, False, seg)
        outs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for ref, got in zip(*outs):
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
