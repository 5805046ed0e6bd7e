import pytest
import torch

from kernels.linear_ce import chunked_token_logprobs, select_token_logprob_fn
from pure import rng
from pure.linear_ce import reference_token_logprobs
from pure.lora import LoraConfig, init_lora
from pure.losses import sft
from pure.losses.common import IGNORE_INDEX, completion_logps
from pure.models.llama import init
from pure.train import make_apply
from pure.tree import tree_leaves
from tests.tiny import TINY

CONFIG = TINY

# (tokens N, hidden D, vocab V, chunk): chunk not dividing N, chunk = N, chunk > N, one token per chunk.
SHAPES = [(7, 16, 29, 3), (32, 8, 50, 32), (5, 12, 40, 64), (9, 4, 17, 1)]


def inputs(n, d, v, seed=0, dtype=torch.float32, ignored=()):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) * 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[list(ignored)] = IGNORE_INDEX
    upstream = torch.randn(n, generator=gen)
    return hidden, weight, targets, upstream


def values_and_grads(fn, hidden, weight, targets, upstream, train_head):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(train_head)
    out = fn(hidden, weight, targets)
    (out.logprobs * upstream).sum().backward()
    return out, hidden.grad, weight.grad


def chunked(chunk, vocab_chunk=None):
    return lambda h, w, t: chunked_token_logprobs(h, w, t, chunk_size=chunk, vocab_chunk=vocab_chunk)


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("n,d,v,chunk", SHAPES)
# vocabulary tiles: the whole vocabulary, a tile not dividing it, one row of W per tile
@pytest.mark.parametrize("vocab_chunk", [None, 7, 1])
def test_values_and_grads_equal_reference(n, d, v, chunk, vocab_chunk, train_head):
    args = inputs(n, d, v, seed=n + v)
    want, want_dh, want_dw = values_and_grads(reference_token_logprobs, *args, train_head)
    got, got_dh, got_dw = values_and_grads(chunked(chunk, vocab_chunk), *args, train_head)
    # fp32, same math in another order (chunked log-sum-exp, J = W[y] - softmax W): 1e-5 relative.
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logprobs, want.logprobs, **tol)
    torch.testing.assert_close(got.logit_mean, want.logit_mean, **tol)
    assert torch.equal(got.target_is_argmax, want.target_is_argmax)
    torch.testing.assert_close(got_dh, want_dh, **tol)
    if train_head:
        torch.testing.assert_close(got_dw, want_dw, **tol)
    else:
        assert got_dw is None


@pytest.mark.parametrize("train_head", [False, True])
def test_ignored_targets_get_zero_logprob_and_zero_gradient(train_head):
    args = inputs(11, 8, 23, ignored=(0, 4, 5, 10))
    want, want_dh, want_dw = values_and_grads(reference_token_logprobs, *args, train_head)
    got, got_dh, got_dw = values_and_grads(chunked(3), *args, train_head)
    ignored = args[2] == IGNORE_INDEX
    assert torch.all(got.logprobs[ignored] == 0) and not got.target_is_argmax[ignored].any()
    assert torch.all(got_dh[ignored] == 0)
    # fp32 parity with the reference: 1e-5.
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_dh, want_dh, rtol=1e-5, atol=1e-5)
    if train_head:
        torch.testing.assert_close(got_dw, want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_head", [False, True])
def test_no_tokens_gives_empty_outputs_and_zero_gradients(train_head):
    hidden, weight, targets, upstream = inputs(0, 8, 23)
    got, dh, dw = values_and_grads(chunked(4), hidden, weight, targets, upstream, train_head)
    assert got.logprobs.shape == got.logit_mean.shape == got.target_is_argmax.shape == (0,)
    assert dh.shape == (0, 8)
    if train_head:
        assert torch.all(dw == 0)


def test_all_targets_ignored_gives_zero_logprobs():
    hidden, weight, targets, upstream = inputs(4, 8, 23, ignored=range(4))
    got, dh, _ = values_and_grads(chunked(2), hidden, weight, targets, upstream, False)
    assert torch.all(got.logprobs == 0) and torch.all(dh == 0)


@pytest.mark.parametrize("train_head", [False, True])
def test_torch_func_grad_and_value_equals_reference(train_head):
    hidden, weight, targets, upstream = inputs(10, 8, 31, ignored=(2,))

    def loss(fn):
        def objective(trainable):
            w = trainable["weight"] if train_head else weight  # frozen head: a captured plain tensor
            out = fn(trainable["hidden"], w, targets)
            return (out.logprobs * upstream).sum(), out.logit_mean

        return torch.func.grad_and_value(objective, has_aux=True)

    trainable = {"hidden": hidden, **({"weight": weight} if train_head else {})}
    want_grads, (want_value, want_mean) = loss(reference_token_logprobs)(trainable)
    got_grads, (got_value, got_mean) = loss(chunked(4))(trainable)
    # fp32 parity: 1e-5.
    torch.testing.assert_close(got_value, want_value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_mean, want_mean, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_head", [False, True])
def test_bfloat16_inputs_match_float32_reference(train_head):
    args32 = inputs(13, 16, 37, seed=3)
    hidden, weight = args32[0].bfloat16(), args32[1].bfloat16()
    # the float32 reference on the same (bf16-rounded) numbers
    want, want_dh, want_dw = values_and_grads(reference_token_logprobs, hidden.float(), weight.float(),
                                              *args32[2:], train_head)
    got, got_dh, got_dw = values_and_grads(chunked(5), hidden, weight, *args32[2:], train_head)
    assert got.logprobs.dtype == torch.float32 and got_dh.dtype == torch.bfloat16
    # bf16 logits and matmuls (8 mantissa bits): 1e-2 relative, and 1e-2 absolute for values near 0.
    tol = dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.logprobs, want.logprobs, **tol)
    torch.testing.assert_close(got.logit_mean, want.logit_mean, **tol)
    torch.testing.assert_close(got_dh.float(), want_dh, **tol)
    if train_head:
        assert got_dw.dtype == torch.bfloat16
        torch.testing.assert_close(got_dw.float(), want_dw, **tol)


def saved_numels(fn, hidden, weight, targets, train_head):
    """numel of every tensor autograd saves for the backward of fn."""
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(train_head)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(hidden, weight, targets)
    return numels


@pytest.mark.parametrize("train_head", [False, True])
def test_forward_saves_no_token_by_vocab_tensor(train_head):
    n, d, v = 64, 8, 50  # N * V = 3200 is larger than N * D = 512 and V * D = 400
    hidden, weight, targets, _ = inputs(n, d, v)
    # The check can fail: the reference keeps its [N, V] logits for the backward.
    assert max(saved_numels(reference_token_logprobs, hidden, weight, targets, train_head)) >= n * v
    saved = saved_numels(chunked(16), hidden, weight, targets, train_head)
    assert saved and max(saved) <= max(n * d, v * d)


@pytest.mark.parametrize("vocab_chunk", [None, 3])
def test_tied_maximum_counts_only_its_first_index_as_argmax(vocab_chunk):
    # rows 2 and 9 of W are equal, so every token's logits tie there; with a large enough component
    # along them that tie is the maximum, and torch's argmax (the first index, 2) is the rule
    weight = torch.randn(12, 4) * 0.1
    weight[9] = weight[2] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    hidden = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 3)
    targets = torch.tensor([2, 9, 4])
    got = chunked_token_logprobs(hidden, weight, targets, chunk_size=2, vocab_chunk=vocab_chunk)
    assert got.target_is_argmax.tolist() == [True, False, False]
    want = reference_token_logprobs(hidden, weight, targets)
    assert torch.equal(got.target_is_argmax, want.target_is_argmax)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)  # fp32 parity


def test_out_of_range_targets_and_bad_shapes_are_refused():
    hidden, weight, targets, _ = inputs(4, 8, 23)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 23\)"):
        chunked_token_logprobs(hidden, weight, torch.tensor([0, 1, 23, 2]))
    with pytest.raises(ValueError, match="hidden \\[N, D\\] and weight \\[V, D\\]"):
        chunked_token_logprobs(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="targets \\[N\\]"):
        chunked_token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_chunk"):
        chunked_token_logprobs(hidden, weight, targets, vocab_chunk=0)


def test_cpu_dispatcher_matches_reference():
    args = inputs(20, 8, 31)
    fn = select_token_logprob_fn("cpu", torch.float32)
    got, got_dh, _ = values_and_grads(fn, *args, False)
    want, want_dh, _ = values_and_grads(reference_token_logprobs, *args, False)
    # fp32 parity: 1e-5.
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_dh, want_dh, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        select_token_logprob_fn("cpu", torch.float64)


def sft_batch():
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("use_lora", [True, False])
def test_sft_loss_and_grads_are_the_same_with_the_kernel_injected(use_lora):
    params = init(CONFIG, rng.key(0))
    if use_lora:
        lora_config = LoraConfig(r=4, alpha=8)
        delta = init_lora(params, lora_config, rng.key(1), target_modules=("q_proj", "v_proj"))
        # B = 0 at init would make every LoRA gradient through A vanish; give B values.
        gen = torch.Generator().manual_seed(2)
        delta = {k: {**ab, "B": torch.randn(ab["B"].shape, generator=gen) * 0.1} for k, ab in delta.items()}
        trainable, frozen = {"lora": delta}, params
    else:
        lora_config, trainable, frozen = None, {"params": params}, {}
    batch = sft_batch()

    def grads(token_logprob_fn):
        bind = make_apply(CONFIG, frozen, lora_config=lora_config, token_logprob_fn=token_logprob_fn)
        return torch.func.grad_and_value(lambda t: sft.on_batch(bind(t), batch), has_aux=True)(trainable)

    want_grads, (want_loss, want_metrics) = grads(reference_token_logprobs)
    got_grads, (got_loss, got_metrics) = grads(chunked(3))
    # fp32 parity of the whole model's loss and gradients: 1e-5.
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert got_metrics["token_accuracy"] == want_metrics["token_accuracy"]
    flat_want, flat_got = tree_leaves(want_grads), tree_leaves(got_grads)
    assert len(flat_want) == len(flat_got) > 0
    for w, g in zip(flat_want, flat_got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_completion_logps_are_the_same_with_the_kernel_injected():
    params = init(CONFIG, rng.key(0))
    batch = sft_batch()
    for reference in (False, True):
        want = completion_logps(make_apply(CONFIG, params)({}), batch, reference=reference)
        got = completion_logps(make_apply(CONFIG, params, token_logprob_fn=chunked(2))({}), batch,
                               reference=reference)
        # fp32 parity: 1e-5.
        for name in ("logps", "logits_mean"):
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
        assert torch.equal(got["tokens"], want["tokens"])
