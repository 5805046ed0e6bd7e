"""KTO (Ethayarajh et al. 2024) as TRL's kto_loss: the paper's formula in float64, the clamped and
detached KL baseline, gradients, limits, edge batches, composition, and micro-batch invariance."""
import math

import pytest
import torch

from pure import rng
from pure.data.kto_batch import collate_kto
from pure.losses import nll
from pure.losses.core import Loss
from pure.losses.kto import KL_KEY, count_kto, kl_estimate, kto_kl_baseline, kto_terms, make_kto
from pure.lora import LoraConfig, init_lora
from pure.models import forward, init
from pure.optim import sgd
from pure.train import init_train_state, make_apply, make_train_step
from tests.tiny import TINY

CONFIG = TINY
LORA = LoraConfig(r=4, alpha=8)
POLICY = torch.tensor([-3.0, -5.5, -1.2, -8.0, -2.0], dtype=torch.float64)
REFERENCE = torch.tensor([-3.4, -5.0, -1.2, -7.1, -2.6], dtype=torch.float64)
DESIRABLE = torch.tensor([True, False, True, False, True])


def paper_kto(r: float, desirable: bool, z0: float, beta: float, w_d: float, w_u: float) -> float:
    """lambda_y - v(x, y): v = lambda_D sigma(beta (r - z0)) if desirable else lambda_U sigma(beta (z0 - r))."""
    sigma = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    return w_d - w_d * sigma(beta * (r - z0)) if desirable else w_u - w_u * sigma(beta * (z0 - r))


def test_kto_terms_match_the_paper_in_float64():
    losses, rewards = kto_terms(POLICY, REFERENCE, DESIRABLE, torch.tensor(0.37, dtype=torch.float64), 0.3, 1.5, 0.7)
    r = (POLICY - REFERENCE).tolist()
    want = [paper_kto(r[i], bool(DESIRABLE[i]), 0.37, 0.3, 1.5, 0.7) for i in range(5)]
    torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=0)  # float64
    torch.testing.assert_close(rewards, 0.3 * (POLICY - REFERENCE), atol=0, rtol=0)
    assert not rewards.requires_grad


def test_kl_baseline_is_the_detached_mean_clamped_at_zero():
    policy = torch.tensor([-2.0, -3.0, -1.0], dtype=torch.float64, requires_grad=True)
    up = kl_estimate(policy, torch.tensor([-2.5, -3.5, -1.1], dtype=torch.float64))
    assert abs(up.item() - (0.5 + 0.5 + 0.1) / 3) < 1e-12 and not up.requires_grad  # float64 mean
    down = kl_estimate(policy, torch.tensor([-1.0, -3.0, -1.0], dtype=torch.float64))
    assert down.item() == 0.0  # mean -1/3 clamps to 0


def test_kto_term_gradients_match_finite_differences():
    policy = POLICY.clone().requires_grad_()
    z0 = torch.tensor(0.2, dtype=torch.float64)  # a constant: detached in the loss
    assert torch.autograd.gradcheck(lambda p: kto_terms(p, REFERENCE, DESIRABLE, z0, 0.5, 1.3, 0.8)[0], (policy,))


def test_beta_to_zero_costs_half_the_weight_per_row():
    losses, _ = kto_terms(POLICY, REFERENCE, DESIRABLE, 0.4, 1e-9, 1.5, 0.7)
    want = torch.where(DESIRABLE, torch.tensor(0.75), torch.tensor(0.35)).double()
    torch.testing.assert_close(losses, want, atol=1e-8, rtol=0)  # O(beta) from the limit


# --- the Loss on a tiny model ------------------------------------------------------------------

def examples(labels=(True, False, True, False), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(0, 61, (3 + i,), generator=g).tolist(),
             "completion_ids": torch.randint(0, 61, (2 + i % 3,), generator=g).tolist(), "label": label}
            for i, label in enumerate(labels)]


def lora_setup(std=0.1, noise_seed=6):
    """A LoRA whose policy differs from the reference; noise_seed 6 gives z0 ~ 0.2 > 0 on `examples()`."""
    params = init(CONFIG, rng.key(0))
    delta = init_lora(params, LORA, rng.key(1), target_linear=True)
    delta = {p: dict(e, B=rng.normal(rng.fold_in(rng.key(noise_seed), i), e["B"].shape, std=std))
             for i, (p, e) in enumerate(delta.items())}
    return params, {"lora": delta}, make_apply(CONFIG, params, lora_config=LORA)


def float64_row_logps(params, lora, ids, labels):
    """Per-row summed completion log-probs from the full logits in float64 (lora None = reference)."""
    logits = forward(params, ids, CONFIG, lora=lora, lora_config=LORA).logits
    lp = torch.log_softmax(logits.double(), -1)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    return (lp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)


def test_kto_loss_and_metrics_equal_the_formula_on_model_log_probs():
    params, trainable, bind = lora_setup()
    batch = collate_kto(examples(), range(4), 4, pad_id=0)[0]
    value, metrics = make_kto(0.3, 1.5, 0.7).on_batch(bind(trainable), batch)
    lora = trainable["lora"]
    r = (float64_row_logps(params, lora, batch["input_ids"], batch["labels"])
         - float64_row_logps(params, None, batch["input_ids"], batch["labels"])).tolist()
    kl = (float64_row_logps(params, lora, batch["kl_input_ids"], batch["kl_labels"])
          - float64_row_logps(params, None, batch["kl_input_ids"], batch["kl_labels"]))
    z0 = max(0.0, kl.mean().item())
    assert z0 > 0.1  # the chosen LoRA exercises a non-zero baseline
    labels = [True, False, True, False]
    want = sum(paper_kto(r[i], labels[i], z0, 0.3, 1.5, 0.7) for i in range(4)) / 4
    # fp32 forward vs float64 logits of the same forward: 1e-5
    assert abs(value.item() - want) < 1e-5
    assert abs(metrics["kl"].item() - z0) < 1e-5
    assert abs(metrics["rewards/chosen"].item() - 0.3 * (r[0] + r[2]) / 2) < 1e-5
    assert abs(metrics["rewards/margins"].item() - 0.3 * (r[0] + r[2] - r[1] - r[3]) / 2) < 1e-5
    assert metrics["count/chosen"].item() == 2 and metrics["count/rejected"].item() == 2
    assert set(metrics) >= {"rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}


def test_policy_equal_to_reference_costs_half_the_weights():
    _, trainable, bind = lora_setup(std=0.0)  # B = 0: the adapter is the identity
    batch = collate_kto(examples(), range(4), 4, pad_id=0)[0]
    value, metrics = make_kto(0.1, 1.5, 0.7).on_batch(bind(trainable), batch)
    assert abs(value.item() - (2 * 0.75 + 2 * 0.35) / 4) < 1e-6  # fp32 sigmoid(0) = 0.5
    assert metrics["kl"].item() == 0.0 and abs(metrics["rewards/margins"].item()) < 1e-6


@pytest.mark.parametrize("labels", [(True,), (True, True, True), (False, False, False)])
def test_edge_batches_give_finite_loss_gradients_and_metrics(labels):
    _, trainable, bind = lora_setup()
    optimizer = sgd(0.5)
    step = make_train_step(make_kto(), optimizer, bind)
    batches = collate_kto(examples(labels), range(len(labels)), 1, pad_id=0)
    new, metrics = step(init_train_state(trainable, optimizer, rng.key(3)), batches)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert metrics["train/grad_norm"].item() > 0
    assert all(torch.isfinite(e[part]).all() for e in new.trainable["lora"].values() for part in ("A", "B"))
    absent = "rewards/rejected" if labels[0] else "rewards/chosen"
    assert metrics[absent].item() == 0.0 and metrics["logps/" + absent.split("/")[1]].item() == 0.0


def test_count_kto_totals_the_accumulated_batch():
    batches = collate_kto(examples((True, False, True)), [2, 0, 1], 2, pad_id=0)
    counts = count_kto(batches)
    assert (counts["total_kto_rows"].item(), counts["total_desirable"].item(), counts["total_undesirable"].item(),
            counts["total_kl_rows"].item()) == (3, 2, 1, 3)
    assert "total_target_tokens" in (make_kto() + nll).count_fn(batches)  # so `+ nll` terms normalise right


def test_kl_baseline_of_the_accumulated_batch_is_the_one_micro_batch_estimate():
    _, trainable, bind = lora_setup()
    apply = bind(trainable)
    whole = collate_kto(examples(), range(4), 4, pad_id=0)
    split = collate_kto(examples(), range(4), 1, pad_id=0)
    z_whole, z_split = kto_kl_baseline(apply, whole), kto_kl_baseline(apply, split)
    assert abs(z_whole.item() - z_split.item()) < 1e-6  # fp32 mean in another order
    # Without the attached baseline, a one-row micro-batch estimates z0 from its own KL row.
    _, alone = make_kto().on_batch(apply, split[0])
    assert abs(alone["kl"].item() * 4 - z_whole.item()) > 1e-3
    _, attached = make_kto()(apply, {**split[0], **count_kto(split[:1]), KL_KEY: z_whole})
    assert abs(attached["kl"].item() - z_whole.item()) < 1e-7  # one row is its own total here


def test_micro_batching_does_not_change_the_kto_update():
    data = examples()
    results = []
    for size in (4, 2, 1):
        _, trainable, bind = lora_setup()
        optimizer = sgd(0.5)
        step = make_train_step(make_kto(0.5), optimizer, bind)
        state = init_train_state(trainable, optimizer, rng.key(3))
        new, metrics = step(state, collate_kto(data, range(4), size, 0))  # z0: the loss's batch_stats_fn
        results.append((new.trainable["lora"], metrics))
    base_lora, base_metrics = results[0]
    assert base_metrics["kl"].item() > 0.1
    for lora, metrics in results[1:]:
        assert set(metrics) == set(base_metrics)
        for name, value in metrics.items():  # fp32 sums in another order
            assert abs(value.item() - base_metrics[name].item()) < 1e-5 * max(1.0, abs(value.item())), name
        for path in lora:
            for part in ("A", "B"):
                torch.testing.assert_close(lora[path][part], base_lora[path][part], atol=1e-6, rtol=1e-5)


def test_kto_composes_with_nll():
    _, trainable, bind = lora_setup()
    batch = collate_kto(examples(), range(4), 4, pad_id=0)[0]
    apply = bind(trainable)
    combined = make_kto() + 0.2 * nll
    assert isinstance(combined, Loss)
    value, metrics = combined.on_batch(apply, batch)
    kto_value, _ = make_kto().on_batch(apply, batch)
    nll_value, _ = nll.on_batch(apply, batch)
    assert abs(value.item() - (kto_value.item() + 0.2 * nll_value.item())) < 1e-6  # fp32 add
    assert "loss/kto" in metrics and "kl" in metrics


def test_missing_fields_are_named():
    _, trainable, bind = lora_setup()
    batch = collate_kto(examples(), range(4), 4, pad_id=0)[0]
    with pytest.raises(ValueError, match="kto_label"):
        make_kto().on_batch(bind(trainable), {k: v for k, v in batch.items() if k != "kto_label"})
    with pytest.raises(ValueError, match="kl_input_ids"):
        make_kto().on_batch(bind(trainable), {k: v for k, v in batch.items() if k != "kl_input_ids"})
    with pytest.raises(ValueError, match="kto_undesirable_weight"):
        make_kto(undesirable_weight=-1)
