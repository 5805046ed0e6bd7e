"""SimPO (Meng et al. 2024) and CPO (Xu et al. 2024) as TRL's CPOTrainer: the papers' formulas in
float64, gradients, limits, composition, and micro-batch invariance through the train step."""
import math

import pytest
import torch

from pure import rng
from pure.data.pair_batch import collate_pairs
from pure.losses import nll
from pure.losses.core import Loss
from pure.losses.simpo import cpo_terms, make_cpo, make_simpo
from pure.lora import LoraConfig, init_lora
from pure.models import forward, init
from pure.optim import sgd
from pure.train import init_train_state, make_apply, make_train_step
from tests.tiny import TINY

CONFIG = TINY
LORA = LoraConfig(r=4, alpha=8)
CHOSEN = torch.tensor([-0.3, -1.2, -2.5, -7.0], dtype=torch.float64)
REJECTED = torch.tensor([-0.9, -0.4, -2.5, -3.0], dtype=torch.float64)


def neg_log_sigmoid(z: float) -> float:
    return math.log1p(math.exp(-z))


def paper_simpo(l_w: float, l_l: float, beta: float, gamma: float, eps: float = 0.0) -> float:
    """-log sigma(beta l_w - beta l_l - gamma) (SimPO Eq. 6), smoothed as TRL: (1-eps) . + eps -log sigma(-z)."""
    z = beta * l_w - beta * l_l - gamma
    return (1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z)


def test_simpo_term_matches_the_paper_in_float64():
    for beta, gamma, eps in ((2.0, 0.5, 0.0), (0.1, 0.5, 0.0), (2.5, 1.4, 0.2)):
        losses, rw, rl, _ = cpo_terms(CHOSEN, REJECTED, beta, gamma, eps)
        want = [paper_simpo(w, l, beta, gamma, eps) for w, l in zip(CHOSEN.tolist(), REJECTED.tolist())]
        torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=0)  # float64
        torch.testing.assert_close(rw - rl, beta * (CHOSEN - REJECTED), atol=1e-12, rtol=0)


def test_cpo_term_is_the_dpo_form_without_reference():
    losses, _, _, _ = cpo_terms(CHOSEN, REJECTED, 0.3)
    want = [neg_log_sigmoid(0.3 * (w - l)) for w, l in zip(CHOSEN.tolist(), REJECTED.tolist())]
    torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=0)  # float64


def test_simpo_term_gradients_match_finite_differences():
    w, l = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: cpo_terms(a, b, 2.0, 0.5, 0.1)[0], (w, l))


def test_limits_beta_to_zero_and_identical_completions():
    # beta -> 0: every pair costs -log sigma(-gamma) (SimPO) and log 2 (CPO), whatever the log-probs
    small, _, _, _ = cpo_terms(CHOSEN, REJECTED, 1e-9, 0.5)
    assert torch.allclose(small, torch.full_like(small, neg_log_sigmoid(-0.5)), atol=1e-8, rtol=0)  # O(beta)
    small, _, _, _ = cpo_terms(CHOSEN, REJECTED, 1e-9)
    assert torch.allclose(small, torch.full_like(small, math.log(2.0)), atol=1e-8, rtol=0)  # O(beta)
    same, rw, rl, _ = cpo_terms(CHOSEN, CHOSEN.clone(), 2.0, 0.5)
    torch.testing.assert_close(same, torch.full_like(same, neg_log_sigmoid(-0.5)), atol=1e-12, rtol=0)
    assert torch.equal(rw, rl)


# --- the Losses on a tiny model ----------------------------------------------------------------

def examples(n=4, seed=1):
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


@pytest.mark.parametrize("kind", ["simpo", "cpo"])
def test_loss_and_metrics_equal_the_formula_on_model_log_probs(kind):
    params, trainable, bind = lora_setup()
    batch = collate_pairs(examples(), range(4), 4, pad_id=0)[0]
    if kind == "simpo":
        loss, gamma = make_simpo(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.7), 0.5
    else:
        loss, gamma = make_cpo(beta=0.2, cpo_alpha=0.7), 0.0
    beta = 2.0 if kind == "simpo" else 0.2
    value, metrics = loss.on_batch(bind(trainable), batch)
    sums, counts = float64_row_logps(params, trainable, batch)
    used = (sums / counts if kind == "simpo" else sums).tolist()
    nll_want = -sums[:4].sum().item() / counts[:4].sum().item()
    pref = sum(paper_simpo(used[i], used[4 + i], beta, gamma) for i in range(4)) / 4
    # fp32 forward vs float64 logits of the same forward: 1e-5 (relative, CPO sums are ~10)
    assert abs(value.item() - (pref + 0.7 * nll_want)) < 1e-5 * max(1.0, abs(value.item()))
    assert abs(metrics["nll_loss"].item() - nll_want) < 1e-5
    assert abs(metrics["logps/rejected"].item() - sum(used[4:]) / 4) < 1e-5 * max(1.0, abs(sum(used[4:]) / 4))
    assert abs(metrics["rewards/chosen"].item() - beta * sum(used[:4]) / 4) < 1e-5 * max(1.0, beta * abs(sum(used[:4])))
    assert metrics["rewards/accuracies"].item() == sum(used[i] > used[4 + i] for i in range(4)) / 4
    assert set(metrics) >= {"rewards/rejected", "rewards/margins", "logps/chosen", "logits/chosen", "logits/rejected"}


def test_cpo_alpha_adds_exactly_alpha_times_the_chosen_nll():
    _, trainable, bind = lora_setup()
    batch = collate_pairs(examples(), range(4), 4, pad_id=0)[0]
    apply = bind(trainable)
    for make in (make_simpo, make_cpo):
        without, metrics = make(cpo_alpha=0.0).on_batch(apply, batch)
        with_nll, _ = make(cpo_alpha=1.5).on_batch(apply, batch)
        assert abs(with_nll.item() - (without.item() + 1.5 * metrics["nll_loss"].item())) < 1e-6  # fp32 add


def test_simpo_composes_with_nll():
    _, trainable, bind = lora_setup()
    batch = collate_pairs(examples(), range(4), 4, pad_id=0)[0]
    apply = bind(trainable)
    combined = make_simpo() + 0.2 * nll
    assert isinstance(combined, Loss) and isinstance(0.5 * make_cpo(), Loss)
    value, metrics = combined.on_batch(apply, batch)
    simpo_value, _ = make_simpo().on_batch(apply, batch)
    nll_value, _ = nll.on_batch(apply, batch)
    assert abs(value.item() - (simpo_value.item() + 0.2 * nll_value.item())) < 1e-6  # fp32 add
    assert "loss/simpo" in metrics and "loss/0.2*nll" in metrics


@pytest.mark.parametrize("make", [lambda: make_simpo(beta=2.0, simpo_gamma=0.5), lambda: make_cpo(beta=0.1)])
def test_micro_batching_does_not_change_the_update(make):
    data = examples()
    results = []
    for size in (4, 2, 1):
        _, trainable, bind = lora_setup()
        optimizer = sgd(0.5)
        step = make_train_step(make(), optimizer, bind)
        new, metrics = step(init_train_state(trainable, optimizer, rng.key(3)),
                            collate_pairs(data, range(4), size, pad_id=0))
        results.append((new.trainable["lora"], metrics))
    base_lora, base_metrics = results[0]
    for lora, metrics in results[1:]:
        assert set(metrics) == set(base_metrics)
        for name, value in metrics.items():  # fp32 sums in another order
            assert abs(value.item() - base_metrics[name].item()) < 1e-5 * max(1.0, abs(value.item())), name
        for path in lora:
            for part in ("A", "B"):
                torch.testing.assert_close(lora[path][part], base_lora[path][part], atol=1e-6, rtol=1e-5)
    assert base_metrics["train/grad_norm"].item() > 0


def test_hyperparameters_are_checked():
    with pytest.raises(ValueError, match="cpo_alpha"):
        make_simpo(cpo_alpha=-1)
    with pytest.raises(ValueError, match="label_smoothing"):
        make_cpo(label_smoothing=0.7)
    with pytest.raises(ValueError, match="rl_beta"):
        make_cpo(beta=-0.1)
