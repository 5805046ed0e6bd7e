"""`trl.rollout_func`: completions from a user function instead of the engine (axolotl's interface).

    rollout_func(model, processing_class, prompts, generation_config=None) -> list[str]

`prompts` are the generation's prompts as the dataset gives them (chat messages or text), each
repeated `num_generations` times, so the function returns one completion per entry. `model` is a
`PolicyGenerator`: the policy of the moment behind `model.generate(prompts) -> list[str]`, sampled
by the run's engine and settings from the run's key (a function that calls it stays reproducible).
`processing_class` is the tokenizer; `generation_config` the sampling settings as a dict.

The returned texts become completion tokens (no special tokens added, then the first stop token,
EOS, appended: a returned text is a finished completion; one longer than `max_tokens` is cut there
and counts as truncated). Their log-probs are not the function's business: GRPO recomputes them
under the policy.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from backends.rollout import Rollouts, Sampling
from pure import rng


class RolloutFunctionError(ValueError):
    """A rollout function that raised or returned something other than one string per prompt."""


@dataclasses.dataclass
class PolicyGenerator:
    """What a rollout function gets as `model`: text in, sampled text out, under the current policy."""

    engine: object
    policy: dict
    tokenizer: object
    sampling: Sampling
    key: torch.Tensor
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    calls: int = 0

    def generate(self, prompts: Sequence, n: int = 1) -> list[str]:
        """`n` sampled completions of each prompt (prompt-major), as text without special tokens."""
        key = rng.fold_in(self.key, self.calls)  # each call its own key, the same on every run
        self.calls += 1
        from backends.prompt_data import prompt_token_ids  # the dataset prompts' own tokenisation

        ids = [prompt_token_ids(p, self.tokenizer, self.chat_template_kwargs) for p in prompts]
        out = self.engine.generate(self.policy, ids, n, self.sampling, key)
        return self.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)


def function_rollouts(fn: Callable, name: str, generator: PolicyGenerator, prompts: Sequence,
                      prompt_ids: Sequence[Sequence[int]]) -> Rollouts:
    """Rollouts of `prompts` (one entry per completion wanted) from the rollout function `fn`."""
    sampling = generator.sampling
    try:
        texts = fn(generator, generator.tokenizer, list(prompts), dataclasses.asdict(sampling))
    except Exception as err:
        raise RolloutFunctionError(f"rollout function {name} raised {type(err).__name__}: {err}") from None
    if not isinstance(texts, (list, tuple)) or len(texts) != len(prompts):
        got = f"{len(texts)} values" if isinstance(texts, (list, tuple)) else type(texts).__name__
        raise RolloutFunctionError(f"rollout function {name} returned {got} for {len(prompts)} prompts; expected "
                                   "a list of one completion string per prompt")
    stop = sampling.stop_token_ids[:1]
    completions, reasons = [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RolloutFunctionError(f"rollout function {name} returned {type(text).__name__} at row {i}; "
                                       "expected a completion string")
        ids = list(generator.tokenizer(text, add_special_tokens=False)["input_ids"]) + list(stop)
        reasons.append("stop" if len(ids) <= sampling.max_tokens and stop else "length")
        completions.append(ids[:sampling.max_tokens])
    return Rollouts(prompt_ids=[list(p) for p in prompt_ids], completion_ids=completions,
                    logprobs=[[0.0] * len(c) for c in completions], finish_reasons=reasons)
