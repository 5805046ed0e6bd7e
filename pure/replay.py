"""GRPO's replay buffer and deferred re-rolling, as pure functions over plain lists.

A *group* is one prompt's G completions, a JSON-serialisable dict (it lives in a checkpoint's JSON):

    {"prompt": int, "completion_ids": [[int]], "rewards": [float], "advantages": [float],
     "sampling_logps": [[float]], "finish_reasons": [str]}

A group without learning signal (every completion scored alike) moves no GRPO objective. Two
remedies, both off by default:

* Replay buffer (TRL's experimental `GRPOWithReplayBufferTrainer`, axolotl's `replay_buffer_size`):
  the groups with signal are kept in a buffer ranked by a score (`replay_score`), the `size` best
  ones; each group without signal in a new batch takes a group drawn from the buffer with
  probability proportional to its score. A replayed group keeps the advantages, rewards and
  sampling logprobs it was scored with.
* Deferred re-rolling (axolotl's `reroll_start_fraction`, `reroll_max_groups`): the prompts of the
  groups without signal are queued, and once `reroll_active`, up to `reroll_max_groups` prompts of
  each new generation are swapped for the oldest queued ones, when the model may solve them.

A buffer is a list of groups, each with an extra "score", kept oldest first; a re-roll queue is a
list of prompt row indices, oldest first. Every function returns new lists and never mutates its
inputs; the groups inside are shared, not copied (treat them as immutable values). Randomness comes
only from the key passed in (pure.rng).
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from pure import rng

Group = dict
_MASK32 = 0xFFFFFFFF


def _scorable(group: Group) -> list[int]:
    """Rows whose reward is a number: an unscorable completion (every reward function returned
    None) has a NaN reward (None once through strict JSON) and advantage 0 (pure.advantages)."""
    return [i for i, r in enumerate(group["rewards"]) if r is not None and not math.isnan(r)]


def has_signal(group: Group) -> bool:
    """True when the group teaches something: the advantages of its scorable completions are not
    all equal.

    Decided on the advantages, not on the rewards (TRL tests `std(rewards) > 0`), so that every
    `scale_rewards` and aggregation agree: under GDPO's normalize_then_sum a group whose weighted
    reward sums tie can still carry signal. A GRPO group's advantages are centred on its own mean,
    so "all equal" is "all zero" in exact arithmetic; the comparison is on equality because the
    rounding of the group mean leaves a constant group with equal but nonzero advantages (eight
    float32 rewards of 0.3 give advantages of 3e-4 under `scale_rewards="group"`). Unscorable
    completions (NaN reward, advantage 0) are left out; with fewer than two scorable completions
    there is no signal.
    """
    rows = _scorable(group)
    advantages = [group["advantages"][i] for i in rows]
    return len(advantages) > 1 and any(a != advantages[0] for a in advantages)


def replay_score(group: Group) -> float:
    """TRL's replay priority of a group: its reward std times the sum of its |advantages|,

        score = std(R) · Σ_i |A_i|

    trl/experimental/grpo_with_replay_buffer/grpo_with_replay_buffer_trainer.py,
    `update_replay_buffer`: `(group_advantages.abs() * group_std_rewards).sum(dim=-1)` with the
    group's std repeated over its G completions. The std is Bessel-corrected (torch's `std`, TRL's
    `grouped_std_rewards`), over the scorable rewards (NaN skipped, as `pure.advantages.nanstd`);
    0 with fewer than two of them.
    """
    rows = _scorable(group)
    rewards = [float(group["rewards"][i]) for i in rows]
    if len(rewards) < 2:
        return 0.0
    mean = math.fsum(rewards) / len(rewards)
    std = math.sqrt(math.fsum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return std * math.fsum(abs(float(group["advantages"][i])) for i in rows)


def _score(group: Group) -> float:
    score = group.get("score")
    return replay_score(group) if score is None else float(score)


def update_replay(buffer: list[Group], groups: list[Group], size: int | None) -> list[Group]:
    """The buffer after a new batch: `groups` with signal join it with their `replay_score` as
    "score", and the `size` best by score stay (size 0 or None: []).

    As TRL's `ReplayBuffer.add` (a min-heap of `max_size` that replaces its worst only with a
    strictly better score) except on ties, where TRL's heap would compare the data dicts (a
    TypeError): here the newer group wins (a later group of the batch over an earlier one, a batch
    over the buffer). The result is oldest first, so the next call still knows which is newer.
    """
    if not size:
        return []
    if size < 0:
        raise ValueError(f"update_replay: size must be >= 0 or None, got {size}")
    candidates = list(buffer) + [{**g, "score": replay_score(g)} for g in groups if has_signal(g)]
    ranked = sorted(range(len(candidates)), key=lambda i: (_score(candidates[i]), i), reverse=True)
    kept = sorted(ranked[:size])
    return [candidates[i] for i in kept]


def _uniform(key: torch.Tensor) -> float:
    """A float uniform on [0, 1) from a key's 64 Threefry bits (53 of them, as a float64 draw)."""
    k0, k1 = (int(w) & _MASK32 for w in key.tolist())
    return (((k0 << 32) | k1) >> 11) / 2.0**53


def _draw_without_replacement(scores: list[float], n: int, key: torch.Tensor) -> list[int]:
    """`n` distinct indices drawn one at a time, each with probability proportional to its score
    among those not yet drawn (torch.multinomial without replacement); draw j uses
    `rng.fold_in(key, j)`. Scores <= 0 or NaN weigh 0; when all left weigh 0, uniformly."""
    left = list(range(len(scores)))
    weight = [s if s > 0 else 0.0 for s in scores]  # NaN > 0 is False
    drawn = []
    for j in range(min(n, len(left))):
        weights = [weight[i] for i in left]
        total = math.fsum(weights)
        if total <= 0:
            weights, total = [1.0] * len(left), float(len(left))
        target = _uniform(rng.fold_in(key, j)) * total
        # float rounding can leave target at the total: then the last item that weighs anything
        pick, cumulative = max(p for p, w in enumerate(weights) if w > 0), 0.0
        for position, w in enumerate(weights):
            cumulative += w
            if target < cumulative:
                pick = position
                break
        drawn.append(left.pop(pick))
    return drawn


def fill_from_replay(groups: list[Group], buffer: list[Group],
                     key: torch.Tensor) -> tuple[list[Group], int]:
    """(groups, replaced): each group without signal takes, in its slot, a group drawn from the
    buffer with probability proportional to its score, without replacement within the call (TRL's
    `ReplayBuffer.sample`: `torch.multinomial(scores / scores.sum(), n)`); replaced is how many.

    With fewer buffer groups than groups without signal, the first slots without signal are filled
    and the rest stay (TRL draws with replacement then; one group twice in a batch is dropped
    here). A replayed group keeps its own rewards, advantages and sampling logprobs, less its
    "score". The draws depend on `key` alone.
    """
    empty = [i for i, g in enumerate(groups) if not has_signal(g)]
    drawn = _draw_without_replacement([_score(g) for g in buffer], len(empty), key) if buffer else []
    out = list(groups)
    for slot, index in zip(empty, drawn):
        out[slot] = {k: v for k, v in buffer[index].items() if k != "score"}
    return out, len(drawn)


def defer_prompts(queue: list[int], groups: list[Group]) -> list[int]:
    """The re-roll queue with the prompts of the groups without signal appended, oldest first, each
    prompt once (one already queued keeps its place). axolotl's reroll_start_fraction: zero-signal
    prompts, where all rewards of the group are identical, are re-injected later."""
    out = list(queue)
    queued = set(out)
    for g in groups:
        if not has_signal(g) and g["prompt"] not in queued:
            out.append(g["prompt"])
            queued.add(g["prompt"])
    return out


def reroll_prompts(prompts: list[int], queue: list[int], max_groups: int,
                   active: bool) -> tuple[list[int], list[int]]:
    """(prompts, queue) of the next generation: when `active`, its last k prompts are replaced, in
    order, by the k oldest queued prompts not already in it, which leave the queue;
    k = min(max_groups, those queued prompts, len(prompts)). Inactive: both unchanged."""
    if max_groups < 0:
        raise ValueError(f"reroll_prompts: max_groups must be >= 0, got {max_groups}")
    if not active:
        return list(prompts), list(queue)
    present = set(prompts)
    k = min(max_groups, len(prompts))
    chosen = list(dict.fromkeys(p for p in queue if p not in present))[:k]
    if not chosen:
        return list(prompts), list(queue)
    taken = set(chosen)
    return list(prompts[:len(prompts) - len(chosen)]) + chosen, [p for p in queue if p not in taken]


def reroll_active(step: int, total_steps: int, fraction: float) -> bool:
    """Whether re-rolling is on at `step` (optimizer steps done, 0-based): step >= fraction ·
    total_steps, compared exactly with the fraction's decimal value (0.07 · 100 is 7, not
    7.000000000000001). fraction >= 1.0 is never (axolotl's default, "1.0 = disabled"), even at
    step == total_steps; fraction 0 is from the first step."""
    if fraction < 0:
        raise ValueError(f"reroll_active: fraction must be in [0, 1], got {fraction}")
    if fraction >= 1.0:
        return False
    return step >= Fraction(repr(float(fraction))) * total_steps
