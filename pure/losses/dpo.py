"""The DPO family: pairwise preference losses against a reference policy, as TRL 0.20+ computes them.

For pair i with prompt x, chosen y_w and rejected y_l, and summed completion log-probs,

    c_i = log πθ(y_w|x) - log π_ref(y_w|x)        r_i = log πθ(y_l|x) - log π_ref(y_l|x)
    h_i = c_i - r_i                               z_i = β h_i

the implicit rewards are β c_i and β r_i (TRL's `rewards/chosen`, `rewards/rejected`). Per pair,
with ε = `label_smoothing` (`dpo_label_smoothing`):

| loss_type | per-pair loss | source |
|---|---|---|
| sigmoid | -(1-ε) log σ(z) - ε log σ(-z) | DPO, Rafailov et al. 2023; conservative DPO, Mitchell 2023 |
| hinge | max(0, 1 - z) | SLiC-HF, Zhao et al. 2023 |
| ipo | (h - 1/(2β))² on length-averaged log-probs | IPO, Azar et al. 2023, Eq. 17 |
| exo_pair | σ(z)(log σ(z) - log(1-ε)) + σ(-z)(log σ(-z) - log ε); ε = 1e-3 if 0 | EXO, Ji et al. 2024, Eq. 16 |
| nca_pair | -log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr) | NCA, Chen et al. 2024 |
| robust | [-(1-ε) log σ(z) + ε log σ(-z)] / (1 - 2ε) | rDPO, Chowdhury et al. 2024 |
| bco_pair | -log σ(βc - δ) - log σ(-(βr - δ)) | BCO, Jung et al. 2024 |
| sppo_hard | (c - 1/(2β))² + (r + 1/(2β))² | SPPO, Wu et al. 2024, Eq. 4.7 with P ∈ {0, 1} |
| aot | sigmoid form of Δ = sort(πθ ratios) - sort(π_ref ratios) | AOT, Melnyk et al. 2024 |
| aot_unpaired | sigmoid form of Δ = sort(c) - sort(r) | AOT, Melnyk et al. 2024 |
| apo_zero | 1 - σ(βc) + σ(βr) | APO, D'Oosterlinck et al. 2024, Eq. 7 |
| apo_down | σ(βc) + 1 - σ(z) | APO, Eq. 8 |
| discopop | (1 - m) (-log σ(z)) + m e^{-z}, m = σ(z/τ), τ = 0.05 | DiscoPOP, Chris Lu et al. 2024, Eq. 5 |
| sft | NLL of the chosen completions, mean per token (`pair_nll`) | MPO's generation term |

TRL's semantics are kept where they matter: a list of loss types is the `loss_weights`-weighted sum
of the per-pair losses, and the rewards reported are the same weighted sum (an `sft` entry adds no
reward); when `ipo` is in the list, every log-prob (policy and reference, hence every term and the
`rewards/*`, `logps/*` metrics) is divided by its completion length, as TRL's `concatenated_forward`
does. Three types are not per-pair functions, so they depend on how the batch is cut into
micro-batches (TRL computes them per device micro-batch too): `aot`/`aot_unpaired` sort within the
micro-batch, and `bco_pair`'s δ is TRL's running mean of the rewards; being pure we take δ as an
argument (`bco_delta`), defaulting to the detached mean of this micro-batch's 2B rewards (TRL's
running mean after its first update).

`rpo_alpha` (RPO, Pang et al. 2024) is literally `dpo + rpo_alpha * pair_nll`. WPO weighting
(`dpo_use_weighting`, Zhou et al. 2024, Eq. 2) multiplies each pair's preference loss by
min(1, exp(w_w + w_l)), w = mean over the completion of log p(y_t) - log Σ_v p_v(t)² (detached,
see `wpo_log_weights`);
unlike TRL the weights do not multiply the `rpo`/`sft` NLL term, which stays a separate `Loss`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pure.losses.common import IGNORE_INDEX, batch_total, completion_logps, next_token_targets
from pure.losses.core import Loss
from pure.losses.pairs import count_pairs, num_pairs

EXO_DEFAULT_EPSILON = 1e-3  # TRL replaces label_smoothing = 0 by this for exo_pair (log ε must be finite)


@dataclass(frozen=True)
class PairLogps:
    """Per-pair completion log-probs [B] under the policy and the reference."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        """h = (log πθ(y_w) - log πθ(y_l)) - (log π_ref(y_w) - log π_ref(y_l))."""
        return (self.policy_chosen - self.policy_rejected) - (self.ref_chosen - self.ref_rejected)


@dataclass(frozen=True)
class Options:
    label_smoothing: float
    bco_delta: torch.Tensor | float
    discopop_tau: float


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _sigmoid(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    return _smoothed_sigmoid(beta * p.margin, o.label_smoothing)


def _hinge(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    return torch.relu(1 - beta * p.margin)


def _ipo(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    return (p.margin - 1 / (2 * beta)) ** 2


def _exo_pair(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    eps = o.label_smoothing or EXO_DEFAULT_EPSILON
    z = beta * p.margin
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def _nca_pair(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    chosen, rejected = beta * p.chosen_logratios, beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    z, eps = beta * p.margin, o.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    chosen, rejected = beta * p.chosen_logratios, beta * p.rejected_logratios
    return -F.logsigmoid(chosen - o.bco_delta) - F.logsigmoid(-(rejected - o.bco_delta))


def _sppo_hard(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    return (p.chosen_logratios - 0.5 / beta) ** 2 + (p.rejected_logratios + 0.5 / beta) ** 2


def _aot(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    policy = torch.sort(p.policy_chosen - p.policy_rejected, dim=0).values
    ref = torch.sort(p.ref_chosen - p.ref_rejected, dim=0).values
    return _smoothed_sigmoid(beta * (policy - ref), o.label_smoothing)


def _aot_unpaired(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    chosen = torch.sort(p.chosen_logratios, dim=0).values
    rejected = torch.sort(p.rejected_logratios, dim=0).values
    return _smoothed_sigmoid(beta * (chosen - rejected), o.label_smoothing)


def _apo_zero(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    return 1 - torch.sigmoid(beta * p.chosen_logratios) + torch.sigmoid(beta * p.rejected_logratios)


def _apo_down(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    return torch.sigmoid(beta * p.chosen_logratios) + 1 - torch.sigmoid(beta * p.margin)


def _discopop(p: PairLogps, beta: float, o: Options) -> torch.Tensor:
    z = beta * p.margin
    mix = torch.sigmoid(z / o.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


PAIR_LOSSES: dict[str, Callable[[PairLogps, float, Options], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
}
LOSS_TYPES = (*PAIR_LOSSES, "sft")
# The types whose formula reads ε; setting label_smoothing for none of them is a config mistake.
SMOOTHED_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")


def resolve_loss_types(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None = None
                       ) -> list[tuple[str, float]]:
    """`loss_type` (a name or a list) and `loss_weights` (None = all 1.0, TRL's default) as (name, weight)
    pairs, validated."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type is an empty list; expected one or more of " + ", ".join(LOSS_TYPES))
    for name in types:
        if name not in LOSS_TYPES:
            raise ValueError(f"loss_type {name!r} is not a DPO loss type; expected one of {', '.join(LOSS_TYPES)}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(f"loss_weights has {len(weights)} entries but loss_type has {len(types)} ({types}); "
                             "give one weight per loss type")
    return list(zip(types, weights))


def _check_hyperparameters(beta: float, label_smoothing: float, types: Sequence[str]) -> None:
    if not beta > 0:
        raise ValueError(f"beta (rl_beta / trl.beta) must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo_label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if "robust" in types and label_smoothing >= 0.5:
        raise ValueError("loss_type robust divides by 1 - 2 * dpo_label_smoothing; it must be < 0.5, "
                         f"got {label_smoothing}")


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    bco_delta: torch.Tensor | float | None = None,
    discopop_tau: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss [B], chosen rewards [B], rejected rewards [B]) from per-pair summed completion
    log-probs [B], for one loss type or the `loss_weights`-weighted sum of several (module docstring).

    With `ipo` among the types, `chosen_tokens` / `rejected_tokens` [B] (completion lengths) are
    required and all four log-probs are divided by them first. The rewards β c and β r are detached;
    `sft` cannot be computed from log-probs (use `pair_nll` or `make_dpo`).
    """
    terms = resolve_loss_types(loss_type, loss_weights)
    names = [name for name, _ in terms]
    if "sft" in names:
        raise ValueError("loss_type sft is the NLL of the chosen tokens and needs the model's logits: "
                         "use make_dpo / pair_nll, not dpo_losses")
    _check_hyperparameters(beta, label_smoothing, names)
    if "ipo" in names:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type ipo uses length-averaged log-probs: pass chosen_tokens and rejected_tokens")
        chosen_n = chosen_tokens.clamp(min=1).to(policy_chosen.dtype)
        rejected_n = rejected_tokens.clamp(min=1).to(policy_chosen.dtype)
        policy_chosen, ref_chosen = policy_chosen / chosen_n, ref_chosen / chosen_n
        policy_rejected, ref_rejected = policy_rejected / rejected_n, ref_rejected / rejected_n
    pairs = PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_rewards = beta * pairs.chosen_logratios.detach()
    rejected_rewards = beta * pairs.rejected_logratios.detach()
    if bco_delta is None:
        bco_delta = torch.cat([chosen_rewards, rejected_rewards]).mean()
    options = Options(label_smoothing, bco_delta, discopop_tau)
    losses = sum(weight * PAIR_LOSSES[name](pairs, beta, options) for name, weight in terms)
    total_weight = sum(weight for _, weight in terms)
    return losses, total_weight * chosen_rewards, total_weight * rejected_rewards


def wpo_log_weights(logps: torch.Tensor, sharpened_logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """WPO's per-row log weight (Zhou et al. 2024, Eq. 2, as TRL computes it), detached:

        w_r = (1/|y_r|) Σ_t [log p(y_t) - log Σ_v p_v(t)²] = (1/|y_r|) Σ_t [log q(y_t) - log p(y_t)]

    where p = softmax(z) and q = softmax(2z) (since q(y) = p(y)² / Σ_v p_v²). `logps` and
    `sharpened_logps` [R] are Σ_t log p(y_t) and Σ_t log q(y_t) per row; `tokens` [R] the lengths.
    Written with q, the weight needs only token log-probs, never the [tokens, vocab] logits.
    """
    return ((sharpened_logps - logps) / tokens.clamp(min=1).to(logps.dtype)).detach()


def wpo_pair_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """min(1, exp(w_chosen + w_rejected)) per pair, from the 2B row log weights (chosen rows first)."""
    chosen, rejected = log_weights.chunk(2)
    return torch.clamp(torch.exp(chosen + rejected), max=1.0)


def _recording(apply):
    """The policy `apply`, but also keeping what its lm_head was asked (final hidden states [N, D] and
    targets [N]), so WPO reuses the policy forward of `completion_logps` instead of running another."""
    calls = []

    def token_logprobs(hidden, targets):
        calls.append((hidden, targets))
        return apply.token_logprobs(hidden, targets)

    return dataclasses.replace(apply, token_logprobs=token_logprobs), calls


def _sharpened_row_logps(apply, calls: list, batch: dict, like: torch.Tensor) -> torch.Tensor:
    """Σ_t log softmax(2 z_t)[y_t] per row, no gradient. The lm_head is linear without bias, so the
    logits 2z are those of the hidden states 2h: any `token_logprobs` implementation computes them."""
    if len(calls) != 1:
        raise RuntimeError(f"dpo_use_weighting reads the lm_head call of the policy forward; completion_logps made "
                           f"{len(calls)} calls through apply.token_logprobs, expected 1")
    hidden, targets = calls[0]
    mask = next_token_targets(batch["labels"], batch.get("segment_ids")) != IGNORE_INDEX
    with torch.no_grad():
        sharpened = apply.token_logprobs(2 * hidden.detach(), targets).logprobs
    rows = mask.nonzero()[:, 0]
    return torch.zeros(mask.shape[0], dtype=like.dtype, device=like.device).index_add(0, rows, sharpened.to(like.dtype))


def make_dpo(
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    use_weighting: bool = False,
    bco_delta: float | None = None,
    discopop_tau: float = 0.05,
    name: str = "dpo",
) -> Loss:
    """The DPO-family objective as a composable `Loss` over pair micro-batches (`pure.data.pair_batch`).

    One policy forward over the 2B rows (chosen rows first) and one reference forward
    (`apply.reference`: the adapter disabled) unless the batch carries precomputed `ref_logps` [2B].
    The micro-batch loss is Σ_pairs loss_i / `total_pairs` (the pairs of the whole accumulated batch,
    from `count_pairs`, the loss's `count_fn`), so summed over micro-batches it is the batch mean.
    Metrics (TRL's names) are emitted the same way, so the train step's sum over micro-batches is the
    batch mean:
    `rewards/chosen|rejected|margins|accuracies`, `logps/chosen|rejected` and `logits/chosen|rejected`
    (mean logit over the vocabulary and the completion tokens, per token as in TRL). An `sft` entry
    in `loss_type` adds `weight * pair_nll`.
    """
    terms = resolve_loss_types(loss_type, loss_weights)
    preference = [(t, w) for t, w in terms if t != "sft"]
    sft_weight = sum(w for t, w in terms if t == "sft")
    pref_names = [t for t, _ in preference]
    _check_hyperparameters(beta, label_smoothing, pref_names)
    if label_smoothing > 0 and not any(t in SMOOTHED_TYPES for t in pref_names):
        raise ValueError(f"dpo_label_smoothing={label_smoothing} has no effect on loss_type {pref_names}; "
                         f"only {', '.join(SMOOTHED_TYPES)} use it (do not set it with rl: ipo)")
    average = "ipo" in pref_names

    def dpo_loss(apply, batch, key=None):
        pairs = num_pairs(batch)
        run, calls = _recording(apply) if use_weighting else (apply, None)
        policy = completion_logps(run, batch, key)
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(device=policy["logps"].device, dtype=policy["logps"].dtype)
            if ref.shape != (2 * pairs,):
                raise ValueError(f"batch['ref_logps'] must have shape [{2 * pairs}] (chosen rows, then rejected), "
                                 f"got {list(ref.shape)}")
        else:
            ref = completion_logps(apply, batch, reference=True)["logps"]
        logps, tokens = policy["logps"], policy["tokens"]
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta=beta,
            loss_type=pref_names, loss_weights=[w for _, w in preference], label_smoothing=label_smoothing,
            chosen_tokens=tokens[:pairs], rejected_tokens=tokens[pairs:], bco_delta=bco_delta,
            discopop_tau=discopop_tau)
        if use_weighting:
            sharpened = _sharpened_row_logps(apply, calls, batch, logps)
            losses = losses * wpo_pair_weights(wpo_log_weights(logps, sharpened, tokens))
        total_pairs = batch_total(batch, "total_pairs", name)
        shown = (logps / tokens.clamp(min=1) if average else logps).detach()
        logit_sums = policy["logits_mean"] * tokens
        chosen_tokens = batch_total(batch, "total_chosen_tokens", name)
        rejected_tokens = batch_total(batch, "total_rejected_tokens", name)
        metrics = {
            "rewards/chosen": chosen_rewards.sum() / total_pairs,
            "rewards/rejected": rejected_rewards.sum() / total_pairs,
            "rewards/margins": (chosen_rewards - rejected_rewards).sum() / total_pairs,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum() / total_pairs,
            "logps/chosen": shown[:pairs].sum() / total_pairs,
            "logps/rejected": shown[pairs:].sum() / total_pairs,
            "logits/chosen": logit_sums[:pairs].sum() / chosen_tokens,
            "logits/rejected": logit_sums[pairs:].sum() / rejected_tokens,
        }
        return losses.sum() / total_pairs, metrics

    loss = Loss(dpo_loss, name, count_fn=count_pairs) if preference else None
    if sft_weight:
        nll_term = sft_weight * pair_nll
        loss = nll_term if loss is None else loss + nll_term
    if loss is None:
        raise ValueError(f"loss_type {[t for t, _ in terms]} with loss_weights {loss_weights} leaves no term")
    return loss


def pair_nll_loss(apply, batch, key=None):
    """L = -(1/N_w) Σ log πθ(y_w,t | x, y_w,<t) over the chosen completion tokens (TRL's RPO / `sft`
    term), N_w = `total_chosen_tokens` of the whole accumulated batch (`count_pairs`), so the sum over
    micro-batches is the per-token mean. Only the B chosen rows run through the model."""
    pairs = num_pairs(batch)
    chosen = {k: batch[k][:pairs] for k in ("input_ids", "labels", "positions", "segment_ids")
              if batch.get(k) is not None}
    out = completion_logps(apply, chosen, key)
    normaliser = batch_total(batch, "total_chosen_tokens", "pair_nll")
    value = -out["logps"].sum() / normaliser
    return value, {"nll_loss": value.detach()}


pair_nll = Loss(pair_nll_loss, "pair_nll", count_fn=count_pairs)


def pair_reference_logps(apply, batches: Sequence[dict]) -> torch.Tensor:
    """[P, 2] float32: log π_ref(y_w|x) and log π_ref(y_l|x) (summed over each completion) of every
    pair of the pair micro-batches `batches`, in their order, under `apply.reference` (no gradient).

    What `precompute_ref_log_probs` computes once before training: the batches then carry these as
    `ref_logps` and `make_dpo` runs no reference forward."""
    rows = []
    for batch in batches:
        logps = completion_logps(apply, batch, reference=True)["logps"]
        pairs = num_pairs(batch, "pair_reference_logps")
        rows.append(torch.stack([logps[:pairs], logps[pairs:]], dim=1))
    return torch.cat(rows).float()


def build_dpo_loss(
    loss_type: str | Sequence[str] | None = None,
    beta: float = 0.1,
    *,
    rl: str = "dpo",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    use_weighting: bool = False,
    rpo_alpha: float | None = None,
    bco_delta: float | None = None,
    discopop_tau: float = 0.05,
) -> Loss:
    """The objective an `rl: dpo | ipo` config asks for: `make_dpo(...)`, plus `rpo_alpha * pair_nll`
    when `rpo_alpha` is set and nonzero (RPO, Pang et al. 2024). `rl: ipo` selects `loss_type: ipo`;
    `loss_type` None means `sigmoid` for `rl: dpo`."""
    if rl not in ("dpo", "ipo"):
        raise ValueError(f"build_dpo_loss handles rl: dpo or rl: ipo, got rl: {rl!r}")
    if rl == "ipo":
        if loss_type not in (None, "ipo", ["ipo"], ("ipo",)):
            raise ValueError(f"rl: ipo selects loss_type ipo, but loss_type is {loss_type!r}; "
                             "use rl: dpo with that loss_type instead")
        loss_type = "ipo"
    loss = make_dpo(beta, loss_type or "sigmoid", loss_weights, label_smoothing, use_weighting, bco_delta,
                    discopop_tau)
    if rpo_alpha:
        loss = loss + rpo_alpha * pair_nll
    return loss
