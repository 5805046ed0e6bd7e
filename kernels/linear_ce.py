"""Fused lm_head + log-softmax over chunks of tokens: token log-probs without the [N, V] logits.

Same values as `pure.linear_ce.reference_token_logprobs` (z = h W^T, log p(y) = z[y] - lse(z)),
computed `chunk_size` tokens at a time, and optionally `vocab_chunk` rows of W at a time with an
online log-sum-exp, so memory is O(chunk_size x vocab_chunk) instead of O(N x V). The
gradient of log p(y_i) with respect to the logits is (onehot(y_i) - softmax(z_i)), so for an
upstream gradient g [N]:

    dL/dh_i = g_i (W[y_i] - softmax(z_i) W)            (linear in g_i)
    dL/dW   = sum_i g_i (onehot(y_i) - softmax(z_i))^T h_i

Two ways to get them, picked per call:

- frozen head (LoRA; W needs no gradient): dL/dh_i is g_i times J_i = W[y_i] - softmax(z_i) W,
  which does not depend on g, so the forward computes J [N, D] while it has each chunk's softmax and
  the backward is `g[:, None] * J`. Two matmuls in all, the same as the unfused version. This is
  the per-token form of computing the gradient inside the forward, as Liger's fused linear
  cross-entropy does for a scalar loss (Hsu et al. 2024, arXiv:2410.10989).
- trainable head: dL/dW is not linear in a precomputable quantity, so the forward keeps only the
  log-sum-exp [N] and the backward recomputes each chunk's logits (the recomputation of Cut
  Cross-Entropy, Wijmans et al. 2024, arXiv:2411.09009, at token rather than vocabulary tiles).

Chunks see only tokens with a target: rows whose target is IGNORE_INDEX are dropped before the
lm_head and get log-prob 0. Softmax and log-sum-exp are taken in float32 whatever the input dtype.
`select_token_logprob_fn` picks the implementation and chunk size for a device (measurements in
its docstring).
"""
from __future__ import annotations

import functools

import torch

from pure.linear_ce import TokenLogprobFn, TokenLogprobs, check_token_logprob_inputs
from pure.losses.common import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 512  # tokens; measured on CPU, see select_token_logprob_fn
CPU_CHUNK_SIZE, CPU_VOCAB_CHUNK = 1024, 4096  # tokens x rows of W per tile on CPU, same measurements


def _vocab_tiles(vocab: int, vocab_chunk: int | None):
    step = vocab if vocab_chunk is None else vocab_chunk
    return [(v0, min(v0 + step, vocab)) for v0 in range(0, vocab, step)]


def _targets_in_tile(targets: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(here [C] bool: the target is one of rows v0..v1-1 of W, column [C, 1]: its index in the tile,
    clamped into the tile where it is not, so a gather or scatter there stays in bounds)."""
    local = targets - v0
    here = (local >= 0) & (local < v1 - v0)
    return here, local.clamp(0, v1 - v0 - 1)[:, None]


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], targets [N], all in [0, V)) -> (logprobs [N] float32,
    saved, target_is_argmax [N] bool). `saved` is J [N, D] float32 when `grad_hidden_in_forward`
    (the frozen-head form, see the module docstring), else the log-sum-exp [N] float32; it is an
    output only so that `setup_context` can keep it (the torch.func-compatible way).

    Each chunk of `chunk_size` tokens walks the vocabulary in tiles of `vocab_chunk` rows of W (None:
    one tile) with an online log-sum-exp, as flash attention walks keys: running max m, running
    sum s of exp(z - m) and, in the frozen-head form, running sum of exp(z - m) W, rescaled by
    exp(m_old - m_new) when the max grows. A tile's logits are produced, exponentiated and consumed
    while they are still in cache."""

    @staticmethod
    def forward(hidden, weight, targets, chunk_size: int, grad_hidden_in_forward: bool,
                vocab_chunk: int | None = None):
        n, vocab = hidden.shape[0], weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logprobs = torch.empty(n, **f32)
        is_argmax = torch.empty(n, dtype=torch.bool, device=hidden.device)
        saved = torch.empty(hidden.shape if grad_hidden_in_forward else (n,), **f32)
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            h, t = hidden[rows], targets[rows]
            c = h.shape[0]
            top = torch.full((c,), float("-inf"), **f32)
            total = torch.zeros(c, **f32)
            target_logit = torch.zeros(c, **f32)
            argmax = torch.zeros(c, dtype=targets.dtype, device=hidden.device)
            expected_row = torch.zeros(h.shape, **f32) if grad_hidden_in_forward else None
            for v0, v1 in _vocab_tiles(vocab, vocab_chunk):
                w = weight[v0:v1]
                logits = (h @ w.T).float()  # [C, tile]
                tile_top, tile_argmax = logits.max(-1)
                # the first maximum wins, as torch's max over the whole row: later tiles need a strictly larger one
                argmax = torch.where(tile_top > top, tile_argmax + v0, argmax)
                here, column = _targets_in_tile(t, v0, v1)
                target_logit = torch.where(here, logits.gather(1, column).squeeze(1), target_logit)
                new_top = torch.maximum(top, tile_top)
                rescale = (top - new_top).exp_()
                exp = logits.sub_(new_top[:, None]).exp_()  # in place: the tile's only [C, tile] buffer
                total.mul_(rescale).add_(exp.sum(-1))
                if grad_hidden_in_forward:
                    expected_row.mul_(rescale[:, None])
                    if weight.dtype == torch.float32:
                        expected_row.addmm_(exp, w)
                    else:
                        expected_row.add_((exp.to(weight.dtype) @ w).float())
                top = new_top
                del logits, exp  # free this tile's [C, tile] before the next one is allocated
            lse = top + total.log()
            logprobs[rows] = target_logit - lse
            is_argmax[rows] = argmax == t
            if grad_hidden_in_forward:
                # J = W[y] - softmax(z) W = W[y] - (sum exp(z - top) W) / total
                saved[rows] = weight[t].float() - expected_row.div_(total[:, None])
            else:
                saved[rows] = lse
        return logprobs, saved, is_argmax

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, targets, chunk_size, grad_hidden_in_forward, vocab_chunk = inputs
        _, saved, is_argmax = output
        ctx.mark_non_differentiable(saved, is_argmax)
        ctx.chunk_size, ctx.vocab_chunk = chunk_size, vocab_chunk
        ctx.grad_hidden_in_forward, ctx.hidden_dtype = grad_hidden_in_forward, hidden.dtype
        if grad_hidden_in_forward:
            ctx.save_for_backward(saved)
        else:
            ctx.save_for_backward(hidden, weight, targets, saved)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, _grad_saved, _grad_is_argmax):
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        if ctx.grad_hidden_in_forward:
            if needs_weight:
                raise RuntimeError("linear token log-probs: the weight needs a gradient but the forward ran in the "
                                   "frozen-head form (weight.requires_grad was False when it was called)")
            (jac,) = ctx.saved_tensors
            grad_hidden = (grad_logprobs[:, None] * jac).to(ctx.hidden_dtype) if needs_hidden else None
            return grad_hidden, None, None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        n, vocab = hidden.shape[0], weight.shape[0]
        for start in range(0, n, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, n))
            h, t, g = hidden[rows], targets[rows], grad_logprobs[rows].float()
            for v0, v1 in _vocab_tiles(vocab, ctx.vocab_chunk):
                w = weight[v0:v1]
                logits = (h @ w.T).float()
                # dL/dz = g (onehot(y) - softmax(z)), built in place in the logits buffer.
                grad_logits = logits.sub_(lse[rows, None]).exp_().mul_(-g[:, None])
                here, column = _targets_in_tile(t, v0, v1)
                grad_logits.scatter_add_(1, column, torch.where(here, g, 0.0)[:, None])
                grad_logits = grad_logits.to(weight.dtype)
                if needs_hidden:
                    grad_hidden[rows] += (grad_logits @ w).float()
                if needs_weight and weight.dtype == torch.float32:
                    grad_weight[v0:v1].addmm_(grad_logits.T, h)  # no [tile, D] temporary
                elif needs_weight:
                    grad_weight[v0:v1].add_(grad_logits.T @ h)  # low-precision matmul, float32 sum
                del logits, grad_logits  # free this tile's [C, tile] before the next one is allocated
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk: int | None = None,
) -> TokenLogprobs:
    """`reference_token_logprobs` without the [N, V] logits (see the module docstring).

    hidden [N, D], weight [V, D] (the lm_head), targets [N] long with IGNORE_INDEX for "no target".
    Differentiable in hidden and weight under autograd and under `torch.func.grad`/`grad_and_value`
    (not twice). The frozen-head form is used when `weight.requires_grad` is False, so a head
    that must be trained has to require grad when this is called (a trainable param always does).
    `vocab_chunk` rows of W make one tile of the online log-sum-exp (None: the whole vocabulary).
    """
    check_token_logprob_inputs(hidden, weight, targets)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if vocab_chunk is not None and vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be a positive number of vocabulary rows or None, got {vocab_chunk}")
    n, vocab = hidden.shape[0], weight.shape[0]
    valid = targets != IGNORE_INDEX
    all_valid = bool(valid.all())
    selected_hidden, selected_targets = (hidden, targets) if all_valid else (hidden[valid], targets[valid])
    if selected_targets.numel() and (int(selected_targets.min()) < 0 or int(selected_targets.max()) >= vocab):
        raise ValueError(f"token log-probs: targets must be in [0, {vocab}) or {IGNORE_INDEX}, got values in "
                         f"[{int(selected_targets.min())}, {int(selected_targets.max())}]")
    grad_hidden_in_forward = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
    # Under autocast the head still runs in the inputs' dtype (the kernel keeps softmax in fp32 anyway):
    # autocast would otherwise recast inside the Function's forward and not in its backward.
    with torch.autocast(hidden.device.type, enabled=False):
        logprobs, _, is_argmax = _ChunkedTokenLogprobs.apply(
            selected_hidden, weight, selected_targets, chunk_size, grad_hidden_in_forward, vocab_chunk
        )
    if not all_valid:
        zeros = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        logprobs = zeros.index_put((valid,), logprobs)
        is_argmax = torch.zeros(n, dtype=torch.bool, device=hidden.device).index_put((valid,), is_argmax)
    # mean_v (h W^T)[v] = h . mean_v W[v]: one [D] vector instead of the logits.
    with torch.no_grad():
        logit_mean = hidden.float() @ weight.mean(0, dtype=torch.float32)
    return TokenLogprobs(logprobs, logit_mean, is_argmax)


def select_token_logprob_fn(device, dtype: torch.dtype) -> TokenLogprobFn:
    """The token log-prob function to use on `device` for hidden states of `dtype`, as
    `fn(hidden [N, D], weight [V, D], targets [N]) -> TokenLogprobs`; pass it to
    `pure.train.make_apply(..., token_logprob_fn=...)`.

    Every device gets `chunked_token_logprobs` with `chunk_size` tokens a chunk. On CPU this was
    measured (tests/kernels/bench_linear_ce.py, SmolLM2-135M's head D = 576, V = 49152, float32,
    one torch thread, forward + backward, frozen head as in LoRA; process CPU time, best of 2-3, as
    the 2 shared cores ran at load 6-15 and wall clock was noise; peak is the call's own RSS rise):

        N      reference            chunked, chunk 256 / 512 / 1024
        512     0.89 s  295 MiB     0.78 / 0.73 / 0.73 s   58 / 110 / 109 MiB
        2048    3.86 s 1161 MiB     3.25 / 2.96 / 3.00 s   64 / 115 / 214 MiB
        8192   20.7 s  4586 MiB     12.1 / 11.8 / 11.9 s   76 / 127 / 222 MiB

    so the chunked form is both faster (18-43%) and smaller (2.7x, 10x, 36x) at every N measured,
    with no reason to fall back to the reference for few tokens. 512 is among the fastest chunks
    (256 is ~10% slower at N = 2048, 1024 the same within noise at twice the memory); its peak is
    about one [512, V] float32 buffer.
    With a trained head (full fine-tuning; the backward recomputes the logits, 4 matmuls against
    the reference's 3) the chunked form costs ~25% more time for ~5x less memory: N = 2048,
    reference 4.71 s 1157 MiB, chunk 512 5.90 s 221 MiB (both including the 108 MiB [V, D]
    gradient); N = 512, 1.23 s against 1.51 s. Memory being the point, it is used there too.
    Vocabulary tiles (online log-sum-exp) were measured later, on 2 threads of a quiet machine,
    wall clock, best of 2-3, same head: the frozen-head forward at N = 1180 (a bench step's
    supervised tokens) takes 0.875 s with [512, V] chunks, 0.842 s with 1024 tokens x 4096 rows of W;
    forward + backward at N = 2048 takes 1.54 s against 1.35 s frozen and 2.98 s against 2.84 s
    trained. The largest buffer drops from [512, V] (96 MiB) to [1024, 4096] (16 MiB), so CPU uses
    1024 x 4096 tiles.
    CUDA keeps whole-vocabulary [512, V] chunks, chosen for memory (96 MiB at V = 49152) and not
    measured on a GPU here.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"token log-probs run on float32, bfloat16 or float16 hidden states, got {dtype}")
    if torch.device(device).type == "cpu":  # a bad device name fails here, not at the first step
        return functools.partial(chunked_token_logprobs, chunk_size=CPU_CHUNK_SIZE, vocab_chunk=CPU_VOCAB_CHUNK)
    return functools.partial(chunked_token_logprobs, chunk_size=DEFAULT_CHUNK_SIZE)
