"""The native rollout engine: our pure forward with a KV cache, sampling from an explicit key.

Per chunk of prompts: the distinct prompts are left-padded (padding is segment 0, positions count
real tokens, as `pure.sampling.generate_tokens` does) and prefilled ONCE, with lm_head only at the
last position; the prompt cache is then copied n times (`repeat_interleave` order, so rows are
prompt-major) into a preallocated cache of prompt + max_tokens positions, which each decode step
writes in place (`pure.models.llama.preallocated_cache`) instead of concatenating the whole past.
Decoding stops as soon as every row has sampled a stop token. Finished rows keep decoding with the
others (their tokens are dropped): taking them out of the batch would change the matmul shapes and
so, in float arithmetic, the other rows' bits.

Reproducibility: the Rollouts are a function of (policy, prompts, n, sampling, key) and of the batch
composition. Chunk c (of at most `max_batch_rows` rows, whole prompts) draws from
`rng.fold_in(key, c)`; its step t from `rng.split(chunk_key, max_tokens)[t]`, one uniform per row.
Another `max_batch_rows` regroups the prompts, so it changes the draws (and the float rounding).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from backends.rollout import Rollouts, Sampling
from pure import rng
from pure.models.config import ModelConfig
from pure.models.llama import empty_cache, forward, preallocated_cache
from pure.sampling import sample_with_logprobs, token_presence


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, ...]:
    """(tokens, segment_ids, positions), each [P, L]: prompts right-aligned, padding in segment 0 at
    position 0, real tokens in segment 1 at positions 0..len-1."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    segments = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
        segments[i, longest - len(p):] = 1
    positions = (segments.cumsum(-1) - 1).clamp(min=0)
    return tokens.to(device), segments.to(device), positions.to(device)


def completion_lengths(tokens: torch.Tensor, stop_token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths [R], stopped [R]) of sampled rows `tokens` [R, T]: up to and including the first stop
    token where one was sampled, else all T."""
    is_stop = torch.isin(tokens, stop_token_ids)
    stopped = is_stop.any(-1)
    first = is_stop.int().argmax(-1)
    return torch.where(stopped, first + 1, tokens.shape[1]), stopped


class NativeEngine:
    """`RolloutEngine` on our forward: `generate(policy, prompts, n, sampling, key)` binds
    `policy["params"]` over `frozen` (and `policy["lora"]`, with `lora_config`) and samples.

    ops: more of `forward`'s op arguments (`attention_fn`, `linear_fn`, `lora_linear_fn`, ...).
    max_batch_rows: the most rows (prompts x n) decoded together; None = all prompts at once.
    """

    def __init__(self, model_config: ModelConfig, frozen: dict, *, lora_config=None, ops: dict | None = None,
                 pad_token_id: int = 0, max_batch_rows: int | None = None):
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"NativeEngine: max_batch_rows must be >= 1 or None, got {max_batch_rows}")
        self.model_config = model_config
        self.frozen = frozen
        self.lora_config = lora_config
        self.ops = dict(ops or {})
        self.pad_token_id = pad_token_id
        self.max_batch_rows = max_batch_rows

    def generate(self, policy: dict, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: Sampling,
                 key: torch.Tensor) -> Rollouts:
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        self._check(prompts, n, sampling)
        params = {**self.frozen, **policy.get("params", {})}
        lora = policy.get("lora") or None
        per_chunk = len(prompts) if self.max_batch_rows is None else self.max_batch_rows // n
        parts = []
        with torch.inference_mode():
            for c, start in enumerate(range(0, len(prompts), per_chunk)):
                parts.append(self._generate_chunk(params, lora, prompts[start:start + per_chunk], n, sampling,
                                                  rng.fold_in(key, c)))
        return Rollouts(*(sum((getattr(p, field) for p in parts), []) for field in
                          ("prompt_ids", "completion_ids", "logprobs", "finish_reasons")))

    def _check(self, prompts: list[list[int]], n: int, sampling: Sampling) -> None:
        vocab = self.model_config.vocab_size
        if not isinstance(sampling, Sampling):
            raise TypeError(f"NativeEngine.generate: sampling must be a Sampling, got {type(sampling).__name__}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"NativeEngine.generate: n must be an integer >= 1, got {n!r}")
        if not prompts:
            raise ValueError("NativeEngine.generate: no prompts given")
        if self.max_batch_rows is not None and n > self.max_batch_rows:
            raise ValueError(f"NativeEngine: n = {n} completions of one prompt do not fit max_batch_rows = "
                             f"{self.max_batch_rows}")
        for i, p in enumerate(prompts):
            if not p or min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"NativeEngine.generate: prompt {i} must be a non-empty list of token ids in "
                                 f"[0, {vocab}), got {p[:8]}{'...' if len(p) > 8 else ''}")

    def _forward(self, params, lora, tokens, **kw):
        return forward(params, tokens, self.model_config, lora=lora, lora_config=self.lora_config,
                       logits_at="last", **kw, **self.ops)

    def _generate_chunk(self, params: dict, lora, prompts: list[list[int]], n: int, sampling: Sampling,
                        key: torch.Tensor) -> Rollouts:
        config, max_tokens = self.model_config, sampling.max_tokens
        embed = params["model.embed_tokens.weight"]
        device = embed.device
        tokens, segments, positions = left_padded(prompts, self.pad_token_id, device)
        P, L = tokens.shape
        rows = torch.arange(P, device=device).repeat_interleave(n)  # prompt-major: p0 x n, p1 x n, ...

        out = self._forward(params, lora, tokens, positions=positions, segment_ids=segments,
                            cache=empty_cache(config, P, dtype=embed.dtype, device=device))
        # The last sampled token is never fed back, so the cache needs L + max_tokens - 1 positions.
        cache = preallocated_cache(out.cache, L + max_tokens - 1, rows)
        logits = out.logits[:, -1].index_select(0, rows)  # [R, V]
        positions = positions[:, -1:].index_select(0, rows)  # [R, 1] the last prompt position
        R = rows.shape[0]
        present = None
        if sampling.repetition_penalty != 1.0:
            present = token_presence(tokens.masked_fill(segments == 0, -1), config.vocab_size).index_select(0, rows)
        stop = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=device)
        new_segments = torch.ones(R, 1, dtype=torch.long, device=device)
        sampled = torch.empty(R, max_tokens, dtype=torch.long, device=device)
        logprobs = torch.empty(R, max_tokens, dtype=logits.dtype if logits.dtype == torch.float64 else torch.float32,
                               device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)
        step_keys = rng.split(key, max_tokens)
        steps = 0
        for step in range(max_tokens):
            next_tokens, next_logprobs = sample_with_logprobs(
                logits, step_keys[step], temperature=sampling.temperature, top_k=max(sampling.top_k, 0),
                top_p=sampling.top_p, min_p=sampling.min_p, present=present,
                repetition_penalty=sampling.repetition_penalty)
            sampled[:, step], logprobs[:, step] = next_tokens, next_logprobs
            steps = step + 1
            if len(sampling.stop_token_ids):
                done |= torch.isin(next_tokens, stop)
                if bool(done.all()):
                    break
            if steps == max_tokens:
                break
            if present is not None:
                present.scatter_(1, next_tokens[:, None], True)
            positions = positions + 1
            out = self._forward(params, lora, next_tokens[:, None], positions=positions, segment_ids=new_segments,
                                cache=cache)
            cache, logits = out.cache, out.logits[:, -1]

        lengths, stopped = completion_lengths(sampled[:, :steps], stop)
        sampled, logprobs, lengths = sampled[:, :steps].tolist(), logprobs[:, :steps].tolist(), lengths.tolist()
        return Rollouts(
            prompt_ids=[list(prompts[i]) for i in rows.tolist()],
            completion_ids=[row[:k] for row, k in zip(sampled, lengths)],
            logprobs=[row[:k] for row, k in zip(logprobs, lengths)],
            finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
        )
