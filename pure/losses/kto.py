"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization", arXiv:2402.01306), as TRL's `KTOTrainer.kto_loss` (loss_type "kto").

Unpaired data: each row is (x, y, desirable?). With the implied reward
r(x, y) = log pi_theta(y|x) - log pi_ref(y|x) and the reference point

    z0 = max(0, mean over mismatched pairs (x, y') of [log pi_theta(y'|x) - log pi_ref(y'|x)])   (detached)

the per-row loss is (Eq. 7-8; TRL's `1 - sigma` form equals the paper's lambda_y - v(x, y))

    desirable:    lambda_D (1 - sigma(beta (r - z0)))
    undesirable:  lambda_U (1 - sigma(beta (z0 - r)))

averaged over all rows of the accumulated batch. lambda_D, lambda_U are `kto_desirable_weight`,
`kto_undesirable_weight` (1.0), beta is `rl_beta` (0.1).

The baseline z0 is a statistic of the whole accumulated batch, not of a micro-batch. Because it is
detached, it needs no gradient pass: `kto_kl_baseline(apply, micro_batches)` runs the KL rows of all
micro-batches through the policy and the reference under `no_grad` before the gradient passes, and
every micro-batch then carries the same value under `batch["kto_kl"]` (`kto_batch_stats`, the
loss's `batch_stats_fn`, which the train and eval steps run). So 1x4 = 2x2 = 4x1 micro-batching
gives the same z0, update and metrics. (TRL estimates z0 per device batch, and
gathers across processes; with gradient accumulation its z0 changes with the micro-batching.) A
micro-batch without `kto_kl`, or without the totals of `count_kto`, is an error. The KL pass runs
without dropout (no key), so it is a deterministic function of the params; TRL runs it in train mode.

The mismatched pairs come from `pure.data.kto_batch`: row j's KL row is the prompt of example j
with the completion of the example before it in the epoch order, so even one-row batches have one.

Metrics (TRL's names, means over the accumulated batch's desirable / undesirable rows, 0 when it has
none): `rewards/chosen`, `rewards/rejected` (beta r), `rewards/margins` (their difference),
`logps/chosen`, `logps/rejected` (policy log-probs), `logits/chosen`, `logits/rejected`, `kl` (z0),
`count/chosen`, `count/rejected` (rows of each kind).
"""
from __future__ import annotations

from typing import Sequence

import torch

from pure.losses.common import batch_total, completion_logps
from pure.losses.core import Loss

KL_KEY = "kto_kl"


def kto_terms(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
              kl: torch.Tensor | float, beta: float, desirable_weight: float = 1.0,
              undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KTO loss and reward for summed completion log-probs [R] and labels `desirable` [R] (bool).

    Returns (loss [R] as in the module docstring, reward [R] = beta * r, detached). `kl` is z0 and is
    treated as a constant.
    """
    kl = kl.detach() if isinstance(kl, torch.Tensor) else kl
    r = policy_logps - reference_logps
    gain = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    loss = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable.bool(), gain, loss), beta * r.detach()


def kl_estimate(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(policy - reference)) over mismatched rows, detached (TRL `.mean().clamp(min=0)`)."""
    return (policy_kl_logps - reference_kl_logps).detach().mean().clamp(min=0)


def _kl_rows(batch: dict, where: str) -> dict:
    missing = [k for k in ("kl_input_ids", "kl_labels") if k not in batch]
    if missing:
        raise ValueError(f"{where}: a KTO micro-batch needs the mismatched KL rows {missing} "
                         f"(built by pure.data.kto_batch.collate_kto)")
    return {"input_ids": batch["kl_input_ids"], "labels": batch["kl_labels"]}


def kto_kl_baseline(apply, micro_batches: Sequence[dict]) -> torch.Tensor:
    """z0 of the accumulated batch: `kl_estimate` over the KL rows of all `micro_batches`, computed
    with the policy (no dropout) and the reference without gradient. A scalar float32 tensor."""
    if not micro_batches:
        raise ValueError("kto_kl_baseline: no micro-batches")
    policy, reference = [], []
    with torch.no_grad():
        for i, mb in enumerate(micro_batches):
            rows = _kl_rows(mb, f"kto_kl_baseline: micro-batch {i}")
            policy.append(completion_logps(apply, rows)["logps"].detach())
            reference.append(completion_logps(apply, rows, reference=True)["logps"])
    return kl_estimate(torch.cat(policy), torch.cat(reference))


def kto_batch_stats(apply, micro_batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The KTO loss's `batch_stats_fn`: z0 of the accumulated batch under `kto_kl`."""
    return {KL_KEY: kto_kl_baseline(apply, micro_batches)}


def count_kto(micro_batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Totals of the accumulated batch (the KTO loss's `count_fn`): `total_kto_rows`,
    `total_desirable`, `total_undesirable`, `total_kl_rows`."""
    desirable = undesirable = kl_rows = 0
    for i, mb in enumerate(micro_batches):
        if "kto_label" not in mb:
            raise ValueError(f"count_kto: micro-batch {i} has no `kto_label` (built by pure.data.kto_batch)")
        labels = mb["kto_label"].bool()
        desirable += int(labels.sum())
        undesirable += int((~labels).sum())
        kl_rows += int(_kl_rows(mb, f"count_kto: micro-batch {i}")["input_ids"].shape[0])
    return {"total_kto_rows": torch.tensor(max(desirable + undesirable, 1)),
            "total_desirable": torch.tensor(max(desirable, 1)), "total_undesirable": torch.tensor(max(undesirable, 1)),
            "total_kl_rows": torch.tensor(max(kl_rows, 1))}


def make_kto(beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Loss:
    """The KTO `Loss` over `pure.data.kto_batch` micro-batches (see the module docstring)."""
    beta, desirable_weight, undesirable_weight = float(beta), float(desirable_weight), float(undesirable_weight)
    for name, value in (("rl_beta", beta), ("kto_desirable_weight", desirable_weight),
                        ("kto_undesirable_weight", undesirable_weight)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")

    def fn(apply, batch, key=None):
        if "kto_label" not in batch:
            raise ValueError("kto: the micro-batch has no `kto_label` (built by pure.data.kto_batch.collate_kto)")
        desirable = batch["kto_label"].bool()
        policy = completion_logps(apply, batch, key)
        reference = completion_logps(apply, batch, reference=True)
        z0 = torch.as_tensor(batch_total(batch, KL_KEY, "kto"))
        losses, rewards = kto_terms(policy["logps"], reference["logps"], desirable, z0, beta,
                                    desirable_weight, undesirable_weight)
        d = desirable.to(rewards.dtype)
        u = 1 - d
        rows = batch_total(batch, "total_kto_rows", "kto")
        n_d = batch_total(batch, "total_desirable", "kto")
        n_u = batch_total(batch, "total_undesirable", "kto")
        logps, logits = policy["logps"].detach(), policy["logits_mean"]
        chosen, rejected = (rewards * d).sum() / n_d, (rewards * u).sum() / n_u
        metrics = {
            "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "logps/chosen": (logps * d).sum() / n_d, "logps/rejected": (logps * u).sum() / n_u,
            "logits/chosen": (logits * d).sum() / n_d, "logits/rejected": (logits * u).sum() / n_u,
            # Metrics are summed over micro-batches: weight z0 by this micro-batch's share of rows.
            "kl": z0.detach() * desirable.numel() / rows,
            "count/chosen": d.sum(), "count/rejected": u.sum(),
        }
        return losses.sum() / rows, metrics

    return Loss(fn, "kto", count_fn=count_kto, batch_stats_fn=kto_batch_stats)


kto = make_kto()
