"""What the pair objectives (DPO family, ORPO, SimPO, CPO, reward models) share: splitting a pair
micro-batch, its totals, per-pair policy log-probs, and the reference-free pair loss.

They read the pair micro-batch of `pure.data.pair_batch`: `input_ids` [2B, T] whose rows 0..B-1 are
prompt + chosen and rows B..2B-1 prompt + rejected (same pair order), right padded, `labels` -100 on
prompt and padding. One forward over the 2B rows scores both completions with the policy alone (no
reference model), and the NLL of the chosen completions comes from the same per-row sums.

Accumulation: a micro-batch's loss and metrics are its *sums* divided by totals of the whole
accumulated batch, `total_pairs` and `total_chosen_tokens` (`count_pairs`, the `count_fn` these
losses carry; the train step merges them into every micro-batch and sums losses and metrics over
micro-batches), so 1x4 = 2x2 = 4x1 gives the same update and the same logged numbers. A micro-batch
without the totals is an error.

Metrics use TRL's names (CPOTrainer / ORPOTrainer.get_batch_loss_metrics), each the mean over the
pairs of the accumulated batch: `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
`rewards/accuracies` (chosen reward > rejected, strictly), `logps/chosen`, `logps/rejected` (the
log-probs the objective uses: length-averaged for ORPO/SimPO, summed for CPO), `logits/chosen`,
`logits/rejected` (mean logit over vocabulary and completion positions), and `nll_loss` (mean NLL per
chosen completion token).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from pure.losses.common import IGNORE_INDEX, batch_total, completion_logps, next_token_targets
from pure.losses.core import Loss

# formula(chosen_logps [B], rejected_logps [B]) -> (per-pair loss [B], chosen rewards [B],
# rejected rewards [B], extra per-pair metrics {name: [B]} averaged over pairs like the others)
PairFormula = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]]


def num_pairs(batch: dict, where: str = "pair micro-batch") -> int:
    """B of a pair micro-batch of 2B rows (B chosen, then B rejected); checks `num_pairs` if present."""
    rows = int(batch["input_ids"].shape[0])
    if rows % 2:
        raise ValueError(f"{where}: a pair micro-batch has 2B rows (B chosen then B rejected); "
                         f"`input_ids` has {rows} rows")
    if "num_pairs" in batch and int(batch["num_pairs"]) != rows // 2:
        raise ValueError(f"{where}: `num_pairs` is {int(batch['num_pairs'])} but `input_ids` has {rows} rows "
                         f"({rows // 2} pairs)")
    return rows // 2


def count_pairs(micro_batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Totals of the accumulated batch (the `count_fn` of the pair losses): `total_pairs` and the
    trained target tokens of the chosen and of the rejected rows."""
    pairs = chosen = rejected = 0
    for i, mb in enumerate(micro_batches):
        half = num_pairs(mb, f"count_pairs: micro-batch {i}")
        trained = next_token_targets(mb["labels"], mb.get("segment_ids")) != IGNORE_INDEX
        pairs += half
        chosen += int(trained[:half].sum())
        rejected += int(trained[half:].sum())
    return {"total_pairs": torch.tensor(max(pairs, 1)),
            "total_chosen_tokens": torch.tensor(max(chosen, 1)),
            "total_rejected_tokens": torch.tensor(max(rejected, 1))}


def pair_logps(apply, batch: dict, key=None) -> dict[str, torch.Tensor]:
    """Policy log-probs of the chosen and rejected completions of a pair micro-batch.

    Returns `chosen`/`rejected` (summed log-probs [B]), `chosen_tokens`/`rejected_tokens` [B] and
    `chosen_logits`/`rejected_logits` (mean logit [B], detached). Every row must train at least one
    token: a length-averaged log-prob of an empty completion is undefined.
    """
    half = num_pairs(batch, "pair_logps")
    out = completion_logps(apply, batch, key)
    empty = (out["tokens"] == 0).nonzero()[:, 0].tolist()
    if empty:
        raise ValueError(f"pair_logps: rows {empty} of the micro-batch have no trained completion token "
                         f"(labels all -100 after the shift); every chosen/rejected row needs one")
    return {
        "chosen": out["logps"][:half], "rejected": out["logps"][half:],
        "chosen_tokens": out["tokens"][:half], "rejected_tokens": out["tokens"][half:],
        "chosen_logits": out["logits_mean"][:half], "rejected_logits": out["logits_mean"][half:],
    }


def pair_loss(formula: PairFormula, name: str, *, average: bool, nll_weight: float) -> Loss:
    """A `Loss` over pair micro-batches:

        L = (1/P) sum_pairs formula(chosen, rejected) + nll_weight * (-(1/N) sum log p(chosen tokens))

    with P, N the accumulated batch's `total_pairs` and `total_chosen_tokens`; `average` feeds the
    formula length-averaged log-probs (ORPO, SimPO) instead of sums (CPO).
    """
    nll_weight = float(nll_weight)

    def fn(apply, batch, key=None):
        lp = pair_logps(apply, batch, key)
        chosen, rejected = lp["chosen"], lp["rejected"]
        if average:
            chosen, rejected = chosen / lp["chosen_tokens"], rejected / lp["rejected_tokens"]
        losses, chosen_rewards, rejected_rewards, extra = formula(chosen, rejected)
        pairs = batch_total(batch, "total_pairs", name)
        chosen_tokens = batch_total(batch, "total_chosen_tokens", name)
        nll = -lp["chosen"].sum() / chosen_tokens
        loss = losses.sum() / pairs + nll_weight * nll if nll_weight else losses.sum() / pairs
        per_pair = {
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
            "logps/chosen": chosen, "logps/rejected": rejected,
            "logits/chosen": lp["chosen_logits"], "logits/rejected": lp["rejected_logits"], **extra,
        }
        metrics = {k: v.detach().sum() / pairs for k, v in per_pair.items()}
        metrics["nll_loss"] = nll.detach()
        return loss, metrics

    return Loss(fn, name, count_fn=count_pairs)
