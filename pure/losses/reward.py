"""Reward-model objectives: Bradley-Terry pairs (outcome RM) and token classification on step ends (PRM).

Both read the model's final-normed hidden states (`apply(..., compute_logits=False).hidden`, no
lm_head) and a score head in the bound params (`apply.params["score.weight"]`, see
`pure/models/heads.py`).

Normalisation follows the train step's contract: a micro-batch loss is a *sum* over its rows divided
by the count of the whole accumulated batch (the losses' `count_fn`: `count_reward_pairs` ->
`total_pairs`, `count_token_labels` -> `total_labelled_tokens`), so the summed micro-batch losses are the
full-batch mean whatever the micro-batching. Metrics are emitted the same way (sums / totals), so the
step's sum over micro-batches is the full-batch mean.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from pure import rng
from pure.losses.common import IGNORE_INDEX, batch_total
from pure.losses.core import Loss
from pure.losses.pairs import num_pairs
from pure.models.heads import sequence_scores, token_scores


def _head(apply, name: str, required: bool = True) -> torch.Tensor | None:
    params = apply.params
    if name not in params:
        if not required:
            return None
        raise KeyError(f"the reward head {name!r} is not among the bound params; add "
                       "pure.models.heads.init_score_head(...) to the trainable (or frozen) params")
    return params[name]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 scores are upcast for the loss; float64 (the tests' exact checks) stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pair_rewards(apply, batch: dict, key=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) in float32 (or wider): the scalar head at each row's `last_index`.

    `batch["input_ids"]` [2B, T] holds the B chosen rows then the B rejected rows
    (`pure.data.reward_batch.collate_reward_pairs`).
    """
    weight = _head(apply, "score.weight")
    if weight.shape[0] != 1:
        raise ValueError(f"Bradley-Terry needs a scalar head (num_labels 1); "
                         f"score.weight has shape {list(weight.shape)}")
    out = apply(batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                compute_logits=False, key=key)
    scores = _at_least_fp32(sequence_scores(out.hidden, batch["last_index"], weight)[:, 0])
    B = num_pairs(batch)
    return scores[:B], scores[B:]


def bradley_terry_loss(apply, batch: dict, key=None, center_rewards_coefficient: float | None = None):
    """L = -(1/N) sum_i log sigmoid(r_c,i - r_r,i - m_i) + c (1/N) sum_i (r_c,i + r_r,i)^2.

    Bradley & Terry (1952); the pairwise reward-model loss of Ouyang et al. 2022 (InstructGPT) as TRL's
    `RewardTrainer` computes it: m_i is the optional per-pair `margin` (Llama 2, Touvron et al. 2023),
    c = `center_rewards_coefficient` (Eisenstein et al. 2023) pulls rewards towards mean zero, and N is
    `batch["total_pairs"]`, the pairs of the whole accumulated batch.

    Metrics (means over the accumulated batch once summed over micro-batches): TRL's `accuracy`
    (fraction of pairs with r_c > r_r), `margin` (mean r_c - r_r), `mean_reward` (mean over all 2N
    scores), the DPO-style `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
    `rewards/accuracies`, and `num_tokens` (real tokens of the step). TRL's `min_reward` /
    `max_reward` are not emitted: a min is not a sum over micro-batches.
    """
    chosen, rejected = pair_rewards(apply, batch, key)
    diff = chosen - rejected
    logits = diff - batch["margin"].to(diff) if "margin" in batch else diff
    total = batch_total(batch, "total_pairs", "bradley_terry")
    loss = -F.logsigmoid(logits).sum() / total
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen + rejected).pow(2).sum() / total
    diff, chosen, rejected = diff.detach(), chosen.detach(), rejected.detach()
    accuracy = (diff > 0).to(diff.dtype).sum() / total
    metrics = {
        "accuracy": accuracy,
        "margin": diff.sum() / total,
        "mean_reward": (chosen.sum() + rejected.sum()) / (2 * total),
        "rewards/chosen": chosen.sum() / total,
        "rewards/rejected": rejected.sum() / total,
        "rewards/margins": diff.sum() / total,
        "rewards/accuracies": accuracy,
    }
    if "num_tokens" in batch:
        metrics["num_tokens"] = torch.as_tensor(batch["num_tokens"])
    return loss, metrics


def center_rewards_loss(apply, batch: dict, key=None):
    """L = (1/N) sum_i (r_c,i + r_r,i)^2: the centring term alone (Eisenstein et al. 2023), to compose
    (`make_bradley_terry() + 0.01 * center_rewards` equals `make_bradley_terry(0.01)`, at the cost of a
    second forward)."""
    chosen, rejected = pair_rewards(apply, batch, key)
    return (chosen + rejected).pow(2).sum() / batch_total(batch, "total_pairs", "center_rewards"), {}


def make_bradley_terry(center_rewards_coefficient: float | None = None) -> Loss:
    """The Bradley-Terry reward-model loss (see `bradley_terry_loss`), with TRL's optional centring."""
    if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
        raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")

    def fn(apply, batch, key=None):
        return bradley_terry_loss(apply, batch, key, center_rewards_coefficient)

    return Loss(fn, "bradley_terry", count_fn=count_reward_pairs)


def prm_loss(apply, batch: dict, key=None, num_labels: int = 2, classifier_dropout: float = 0.0):
    """L = -(1/N) sum_{(b,t): y_bt != -100} log softmax(W dropout(h_bt) + b)[y_bt].

    The process reward model of Lightman et al. 2023 ("Let's verify step by step") / Wang et al. 2024
    (Math-Shepherd) as TRL's `PRMTrainer` trains it: token classification over `num_labels` classes at
    the labelled tokens (each step's last token; only the last step's with `train_on_last_step_only`,
    which the data strategy applies), N = `batch["total_labelled_tokens"]` of the accumulated batch.
    Only labelled positions go through the head. `classifier_dropout` is the token-classification
    head's dropout; TRL disables dropout by default (`disable_dropout: true`), hence 0.

    Metrics: `accuracy` (argmax = label over the labelled tokens, TRL's `compute_accuracy`) and
    `num_labelled_tokens`.
    """
    weight, bias = _head(apply, "score.weight"), _head(apply, "score.bias", required=False)
    if weight.shape[0] != num_labels:
        raise ValueError(f"the PRM head has {weight.shape[0]} outputs (score.weight {list(weight.shape)}); "
                         f"expected num_labels={num_labels}")
    labels = batch["labels"]
    mask = labels != IGNORE_INDEX
    apply_key = head_key = None
    if key is not None:
        apply_key, head_key = rng.split(key, 2)
    out = apply(batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                compute_logits=False, key=apply_key)
    logits = _at_least_fp32(token_scores(out.hidden[mask], weight, bias, dropout=classifier_dropout, key=head_key))
    wanted = labels[mask]
    total = batch_total(batch, "total_labelled_tokens", "prm")
    loss = F.cross_entropy(logits, wanted, reduction="sum") / total
    correct = (logits.detach().argmax(-1) == wanted).to(logits.dtype).sum()
    return loss, {"accuracy": correct / total, "num_labelled_tokens": mask.sum()}


def make_prm(num_labels: int = 2, classifier_dropout: float = 0.0) -> Loss:
    """The process-reward-model loss (see `prm_loss`) over a `num_labels`-way token classifier."""
    if num_labels < 2:
        raise ValueError(f"a PRM classifies each step into num_labels >= 2 classes, got {num_labels}")
    if not 0.0 <= classifier_dropout < 1.0:
        raise ValueError(f"classifier_dropout must be in [0, 1), got {classifier_dropout}")

    def fn(apply, batch, key=None):
        return prm_loss(apply, batch, key, num_labels, classifier_dropout)

    return Loss(fn, "prm", count_fn=count_token_labels)


def count_reward_pairs(micro_batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """`total_pairs`: the pairs of the whole accumulated batch (the Bradley-Terry loss's `count_fn`)."""
    pairs = sum(int(mb["num_pairs"]) if "num_pairs" in mb else num_pairs(mb) for mb in micro_batches)
    return {"total_pairs": torch.tensor(max(pairs, 1))}


def count_token_labels(micro_batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """`total_labelled_tokens`: labels that are not -100 in the whole accumulated batch (the PRM loss's `count_fn`)."""
    tokens = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
    return {"total_labelled_tokens": torch.tensor(max(tokens, 1))}


bradley_terry = make_bradley_terry()
center_rewards = Loss(center_rewards_loss, "center_rewards", count_fn=count_reward_pairs)
prm = make_prm()
