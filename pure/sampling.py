"""Autoregressive sampling with the KV cache, driven by an explicit key.

Prompts of different lengths are left-padded: padding is segment 0 (attended by nothing real) and
positions count real tokens only, so each row decodes exactly as it would alone.

The rollout half (`process_logits`, `sample_with_logprobs`, used by `backends.rollout.native`)
processes logits as vLLM does, repetition penalty -> temperature -> min-p -> top-k -> top-p, and
returns each drawn token's log-prob under that processed distribution (vLLM's
logprobs_mode="processed_logprobs").
"""
from __future__ import annotations

import math
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
    logits = top_p_mask(top_k_mask(logits.float() / temperature, top_k), top_p)
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


# ---------------------------------------------------------------------------------------------
# Logit processing for rollouts (GRPO): each step a pure function of logits [B, V], applied in
# vLLM's order (repetition penalty, temperature, min-p, top-k, top-p); masked entries are -inf.


def token_presence(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool [B, V]: which tokens occur in each row of `tokens` [B, L] (entries < 0 are padding)."""
    index = torch.where(tokens < 0, vocab_size, tokens)
    present = torch.zeros(tokens.shape[0], vocab_size + 1, dtype=torch.bool, device=tokens.device)
    return present.scatter_(1, index, True)[:, :vocab_size]


def penalize_present(logits: torch.Tensor, present: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty (Keskar et al. 2019, CTRL) on the tokens marked in `present` [B, V]:
    a positive logit is divided by `penalty`, a negative one multiplied by it."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, penalized, logits)


def apply_repetition_penalty(logits: torch.Tensor, previous_tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """`penalize_present` over the tokens of `previous_tokens` [B, L] (-1 = padding): the prompt and
    the tokens generated so far, as vLLM and transformers both count them."""
    return penalize_present(logits, token_presence(previous_tokens, logits.shape[-1]), penalty)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with all but the `k` largest of each row at -inf (ties with the k-th kept); k <= 0 is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability mass reaches `p` (always at least the most likely one); p >= 1 is off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # a token stays while the mass before it is short of p
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_mask(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens whose probability is below `min_p` times the
    row's largest probability, i.e. logit < max logit + log(min_p); min_p <= 0 is off."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, present: torch.Tensor | None = None,
                   repetition_penalty: float = 1.0) -> torch.Tensor:
    """The distribution a rollout samples from, as logits [B, V] in at least float32: repetition
    penalty over `present` [B, V], then / temperature, then the min-p, top-k and top-p masks (vLLM's
    order). temperature == 0 (greedy) stops after the penalty, as vLLM's greedy path does."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if present is not None:
        logits = penalize_present(logits, present, repetition_penalty)
    if temperature == 0.0:
        return logits
    if temperature != 1.0:
        logits = logits / temperature
    return top_p_mask(top_k_mask(min_p_mask(logits, min_p), top_k), top_p)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Tokens [B]: for each row of unnormalised probabilities `weights` [B, V] (>= 0, some > 0) the
    first index whose cumulative weight exceeds u * total, u [B, 1] in [0, 1).

    In two levels, float64: the block of `block` entries holding the point (cumulative block sums),
    then the entry within it, so the cumulative sum runs over V / block + block entries instead of V.
    A zero-weight entry never covers the point (it would need cdf[i] > x >= cdf[i - 1] = cdf[i])."""
    B, V = weights.shape
    blocks = -(-V // block)
    padded = weights if V % block == 0 else torch.nn.functional.pad(weights, (0, blocks * block - V))
    padded = padded.view(B, blocks, block)
    block_mass = padded.sum(-1, dtype=torch.float64)  # [B, blocks]
    cdf = block_mass.cumsum(-1)
    before = torch.cat((block_mass.new_zeros(B, 1), cdf[:, :-1]), dim=-1)  # mass of the blocks before each
    total = cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    chosen = torch.searchsorted(cdf, target, right=True)  # [B, 1], a block of positive mass
    within = target - before.gather(-1, chosen)  # >= 0: the blocks before end at or below the target
    inner = padded.gather(1, chosen[:, :, None].expand(B, 1, block))[:, 0].double().cumsum(-1)  # [B, block]
    # Rounding may leave `within` at or past the block's own total: keep it strictly inside.
    within = torch.minimum(within, torch.nextafter(inner[:, -1:], torch.zeros_like(within)))
    index = torch.searchsorted(inner, within, right=True).clamp_(max=block - 1)
    return (chosen * block + index)[:, 0]


def sample_with_logprobs(logits: torch.Tensor, key: torch.Tensor | None, *, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                         present: torch.Tensor | None = None, repetition_penalty: float = 1.0):
    """(tokens [B] int64, logprobs [B]): one draw per row from `process_logits(logits, ...)` and the
    log-probability of the drawn token under that processed distribution (vLLM's
    logprobs_mode="processed_logprobs": after penalty, temperature and truncation).

    The draw inverts the row's CDF at one `rng.uniform(key)` number per row (`inverse_cdf`), so the
    key alone decides the tokens and a [B] draw replaces [B, V] of Gumbel noise. Greedy (temperature == 0 or
    no key): the argmax, and its logprob is the log-softmax of the penalised logits there.
    """
    processed = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               present=present, repetition_penalty=repetition_penalty)
    top = processed.max(dim=-1, keepdim=True).values
    weights = (processed - top).exp()  # unnormalised probabilities, 1 at the mode
    total = weights.sum(-1, keepdim=True)
    if temperature == 0.0 or key is None:
        tokens = processed.argmax(-1)
    else:
        u = rng.uniform(key, (processed.shape[0], 1), dtype=torch.float64, device=processed.device)
        tokens = inverse_cdf(weights, u)
    chosen = processed.gather(-1, tokens[:, None])
    logprobs = (chosen - top - total.log())[:, 0]
    return tokens, logprobs
