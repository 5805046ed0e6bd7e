"""Rollout engines for online RL (GRPO): many sampled completions per prompt, with their log-probs.

The protocol every engine implements (the native one here, `backends.rollout.native`; a vLLM server
later):

    engine.generate(policy, prompt_token_ids, n, sampling, key) -> Rollouts

`policy` is the trainable pytree of the moment (`{"params": {...}, "lora": {...}}`); the engine binds
it over its frozen params (native) or syncs it to its server. `key` is the only source of randomness.
`Rollouts` is ordered prompt-major: prompt 0's n completions, then prompt 1's, and so on.

Log-probs are vLLM's `logprobs_mode="processed_logprobs"` (what TRL's GRPO reads from vLLM): the
log-probability of each sampled token under the distribution it was drawn from, i.e. after the
repetition penalty, the temperature and the min-p / top-k / top-p truncation (vLLM's v1 sampler
captures them after `apply_top_k_top_p`). A token drawn from a truncated distribution can thus have
a logprob above the model's raw one. Under greedy decoding (temperature 0) it is the log-softmax of
the penalised logits at the argmax.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn. top_k 0 or -1 is off; stop_token_ids end a completion (the caller
    fills them: EOS plus generation_kwargs' stop_token_ids); the stop token is kept as its last token."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (self.temperature >= 0.0, "temperature must be >= 0 (0 = greedy)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= -1, "top_k must be an integer >= 1, or 0 / -1 for off"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0 (1 = off)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Sampling: {message}; got {self}")
        if not isinstance(self.stop_token_ids, tuple) or not all(isinstance(t, int) and t >= 0
                                                                 for t in self.stop_token_ids):
            raise ValueError(f"Sampling: stop_token_ids must be a tuple of token ids >= 0; got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Rollouts:
    """Completions, one entry per (prompt, sample), prompt-major. finish_reasons: "stop" when a stop
    token was sampled (and is the last completion token), else "length" (max_tokens reached)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]

    def __len__(self) -> int:
        return len(self.completion_ids)

    @classmethod
    def concat(cls, parts: Sequence["Rollouts"]) -> "Rollouts":
        """The entries of `parts`, one after another (per-prompt parts in prompt order: prompt-major)."""
        return cls([x for p in parts for x in p.prompt_ids], [x for p in parts for x in p.completion_ids],
                   [x for p in parts for x in p.logprobs], [x for p in parts for x in p.finish_reasons])


class RolloutEngine(Protocol):
    def generate(self, policy: dict, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: Sampling,
                 key: torch.Tensor) -> Rollouts:
        """n completions of each prompt under `policy`, drawn from `key` (same arguments, same Rollouts)."""
        ...


__all__ = ["RolloutEngine", "Rollouts", "Sampling"]
