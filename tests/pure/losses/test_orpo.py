"""ORPO (Hong et al. 2024): the paper's formula in float64, gradients, limits, composition, and
micro-batch invariance through the train step."""
import math

import pytest
import torch

from pure import rng
from pure.data.pair_batch import collate_pairs
from pure.losses import nll
from pure.losses.core import Loss
from pure.losses.orpo import log1m_exp, log_odds, make_orpo, orpo_terms
from pure.losses.sft import sft
from pure.lora import LoraConfig, init_lora
from pure.models import forward, init
from pure.optim import sgd
from pure.train import init_train_state, make_apply, make_train_step
from tests.tiny import TINY

CONFIG = TINY
LORA = LoraConfig(r=4, alpha=8)
CHOSEN = torch.tensor([-0.3, -1.2, -2.5, -0.05], dtype=torch.float64)
REJECTED = torch.tensor([-0.9, -0.4, -2.5, -3.0], dtype=torch.float64)


def paper_orpo_term(l_w: float, l_l: float, alpha: float) -> float:
    """-alpha log sigma(log(odds_w / odds_l)), odds = p / (1 - p), p = e^l (Eq. 4, 6)."""
    p_w, p_l = math.exp(l_w), math.exp(l_l)
    log_or = math.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
    return -alpha * math.log(1 / (1 + math.exp(-log_or)))


def test_orpo_term_matches_the_paper_in_float64():
    losses, rw, rl, extra = orpo_terms(CHOSEN, REJECTED, alpha=0.25)
    want = torch.tensor([paper_orpo_term(w, l, 0.25) for w, l in zip(CHOSEN.tolist(), REJECTED.tolist())],
                        dtype=torch.float64)
    torch.testing.assert_close(losses, want, atol=1e-10, rtol=0)  # float64 vs float64 closed form
    torch.testing.assert_close(extra["log_odds_ratio"], -want / 0.25, atol=1e-10, rtol=0)
    torch.testing.assert_close(rw, 0.25 * CHOSEN, atol=0, rtol=0)
    torch.testing.assert_close(rl, 0.25 * REJECTED, atol=0, rtol=0)


def test_log1m_exp_is_accurate_at_both_ends():
    for x in (-1e-12, -1e-3, -0.5, -math.log(2.0), -2.0, -40.0):
        got = log1m_exp(torch.tensor(x, dtype=torch.float64)).item()
        # log(1 - e^x) = -e^x - e^2x / 2 - ... for very negative x (where 1 - e^x rounds to 1)
        want = math.log(-math.expm1(x)) if x > -10 else -math.exp(x) - math.exp(2 * x) / 2
        assert abs(got - want) <= 1e-12 * abs(want)  # float64 relative rounding
    assert torch.isfinite(log_odds(torch.tensor(-1e-9))).item()  # fp32 p = 1 - 1e-9 still finite


def test_orpo_term_gradients_match_finite_differences():
    w, l = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: orpo_terms(a, b, 0.3)[0], (w, l))


def test_identical_chosen_and_rejected_give_log_two():
    losses, rw, rl, extra = orpo_terms(CHOSEN, CHOSEN.clone(), alpha=0.7)
    torch.testing.assert_close(losses, torch.full_like(CHOSEN, 0.7 * math.log(2.0)), atol=1e-12, rtol=0)
    assert torch.equal(extra["log_odds_chosen"], torch.zeros_like(CHOSEN))


# --- the Loss on a tiny model ------------------------------------------------------------------

def examples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = lambda k: torch.randint(1, CONFIG.vocab_size, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": tokens(2 + i % 3), "chosen_ids": tokens(1 + (i * 2) % 5), "rejected_ids": tokens(2 + i % 2)}
            for i in range(n)]


def lora_setup(std=0.1):
    params = init(CONFIG, rng.key(0))
    delta = init_lora(params, LORA, rng.key(1), target_linear=True)
    delta = {p: dict(e, B=rng.normal(rng.fold_in(rng.key(2), i), e["B"].shape, std=std))
             for i, (p, e) in enumerate(delta.items())}
    return params, {"lora": delta}, make_apply(CONFIG, params, lora_config=LORA)


def float64_row_logps(params, trainable, batch):
    """Per-row summed completion log-probs and token counts from the full logits, in float64."""
    logits = forward(params, batch["input_ids"], CONFIG, lora=trainable["lora"], lora_config=LORA).logits
    lp = torch.log_softmax(logits.double(), -1)[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    token = lp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (token * mask).sum(-1), mask.sum(-1)


def test_orpo_loss_and_metrics_equal_the_formula_on_model_log_probs():
    params, trainable, bind = lora_setup()
    batch = collate_pairs(examples(), range(4), 4, pad_id=0)[0]
    value, metrics = make_orpo(0.2).on_batch(bind(trainable), batch)
    sums, counts = float64_row_logps(params, trainable, batch)
    avg = (sums / counts).tolist()
    nll_want = -sums[:4].sum().item() / counts[:4].sum().item()
    terms = [paper_orpo_term(avg[i], avg[4 + i], 0.2) for i in range(4)]
    # fp32 forward vs float64 logits of the same forward: 1e-5
    assert abs(value.item() - (nll_want + sum(terms) / 4)) < 1e-5
    assert abs(metrics["nll_loss"].item() - nll_want) < 1e-5
    assert abs(metrics["logps/chosen"].item() - sum(avg[:4]) / 4) < 1e-5
    assert abs(metrics["rewards/margins"].item() - 0.2 * (sum(avg[:4]) - sum(avg[4:])) / 4) < 1e-5
    assert abs(metrics["log_odds_ratio"].item() + sum(terms) / 4 / 0.2) < 1e-5
    assert metrics["rewards/accuracies"].item() == sum(avg[i] > avg[4 + i] for i in range(4)) / 4
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "logits/chosen", "logits/rejected",
                            "logps/rejected", "log_odds_chosen"}


def test_orpo_with_alpha_zero_is_sft_on_the_chosen_completions():
    _, trainable, bind = lora_setup()
    batch = collate_pairs(examples(), range(4), 4, pad_id=0)[0]
    apply = bind(trainable)
    only_chosen = dict(batch, labels=batch["labels"].clone())
    only_chosen["labels"][4:] = -100
    got, _ = make_orpo(0.0).on_batch(apply, batch)
    want, _ = sft.on_batch(apply, only_chosen)
    assert abs(got.item() - want.item()) < 1e-6  # fp32: the same log-probs summed in another order


def test_orpo_composes_with_nll():
    _, trainable, bind = lora_setup()
    batch = collate_pairs(examples(), range(4), 4, pad_id=0)[0]
    apply = bind(trainable)
    combined = make_orpo(0.1) + 0.2 * nll
    assert isinstance(combined, Loss)
    value, metrics = combined.on_batch(apply, batch)
    orpo_value, _ = make_orpo(0.1).on_batch(apply, batch)
    nll_value, _ = nll.on_batch(apply, batch)
    assert abs(value.item() - (orpo_value.item() + 0.2 * nll_value.item())) < 1e-6  # fp32 add
    assert "loss/orpo" in metrics and "log_odds_chosen" in metrics


def test_micro_batching_does_not_change_the_orpo_update():
    data = examples()
    results = []
    for size in (4, 2, 1):
        _, trainable, bind = lora_setup()
        optimizer = sgd(0.5)
        step = make_train_step(make_orpo(0.3), optimizer, bind)
        new, metrics = step(init_train_state(trainable, optimizer, rng.key(3)),
                            collate_pairs(data, range(4), size, pad_id=0))
        results.append((new.trainable["lora"], metrics))
    base_lora, base_metrics = results[0]
    for lora, metrics in results[1:]:
        assert set(metrics) == set(base_metrics)
        for name, value in metrics.items():  # fp32 sums in another order
            assert abs(value.item() - base_metrics[name].item()) < 1e-5, name
        for path in lora:
            for part in ("A", "B"):
                torch.testing.assert_close(lora[path][part], base_lora[path][part], atol=1e-6, rtol=1e-5)
    assert base_metrics["train/grad_norm"].item() > 0


def test_pair_batches_must_have_an_even_row_count_and_trained_rows():
    _, trainable, bind = lora_setup()
    batch = collate_pairs(examples(), range(2), 2, pad_id=0)[0]
    odd = {k: batch[k][:3] for k in ("input_ids", "labels")}
    with pytest.raises(ValueError, match="2B rows"):
        make_orpo().on_batch(bind(trainable), odd)
    empty = dict(batch, labels=batch["labels"].clone())
    empty["labels"][3] = -100
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        make_orpo().on_batch(bind(trainable), empty)
    with pytest.raises(ValueError, match="orpo_alpha"):
        make_orpo(-1.0)
