"""DPO family: every loss type against its paper's formula, gradients, limits, composition, the step."""
import math

import pytest
import torch
import torch.nn.functional as F

from pure import rng
from pure.data.pair_batch import collate_pairs
from pure.losses import dpo
from pure.losses.common import completion_logps
from pure.losses.core import Loss
from pure.losses.dpo import (LOSS_TYPES, PAIR_LOSSES, build_dpo_loss, dpo_losses, make_dpo, pair_nll,
                             pair_reference_logps, wpo_log_weights)
from pure.lora import LoraConfig, init_lora
from pure.models import forward, init
from pure.optim import sgd
from pure.train import init_train_state, make_apply, make_train_step
from tests.tiny import TINY

CONFIG = TINY

# Three pairs of summed completion log-probs; no ties among the sorted quantities (aot).
PC, PR = [-12.5, -30.25, -7.0], [-14.0, -28.0, -9.5]
RC, RR = [-13.0, -29.0, -7.25], [-13.6, -29.5, -8.0]
CHOSEN_TOKENS, REJECTED_TOKENS = [5, 12, 3], [6, 10, 4]
BETA, EPS = 0.3, 0.1


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def smoothed(z, eps):
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def by_hand(name, pc=PC, pr=PR, rc=RC, rr=RR, beta=BETA, eps=EPS, delta=None):
    """The paper formulas, written out per pair in Python floats (float64)."""
    c = [a - b for a, b in zip(pc, rc)]
    r = [a - b for a, b in zip(pr, rr)]
    h = [x - y for x, y in zip(c, r)]
    if name == "sigmoid":  # DPO / conservative DPO
        return [smoothed(beta * x, eps) for x in h]
    if name == "hinge":  # SLiC
        return [max(0.0, 1 - beta * x) for x in h]
    if name == "ipo":  # IPO Eq. 17 on per-token log-probs
        hn = [(a / n - b / n) - (x / m - y / m)
              for a, b, x, y, n, m in zip(pc, rc, pr, rr, CHOSEN_TOKENS, REJECTED_TOKENS)]
        return [(x - 1 / (2 * beta)) ** 2 for x in hn]
    if name == "exo_pair":  # EXO Eq. 16: KL(softmax(beta h) || (1 - eps, eps))
        return [sig(beta * x) * (logsig(beta * x) - math.log(1 - eps))
                + sig(-beta * x) * (logsig(-beta * x) - math.log(eps)) for x in h]
    if name == "nca_pair":
        return [-logsig(beta * a) - 0.5 * logsig(-beta * a) - 0.5 * logsig(-beta * b) for a, b in zip(c, r)]
    if name == "robust":  # rDPO: unbiased under label flips with rate eps
        return [((1 - eps) * -logsig(beta * x) - eps * -logsig(-beta * x)) / (1 - 2 * eps) for x in h]
    if name == "bco_pair":
        if delta is None:
            delta = sum(beta * v for v in c + r) / (2 * len(c))
        return [-logsig(beta * a - delta) - logsig(-(beta * b - delta)) for a, b in zip(c, r)]
    if name == "sppo_hard":
        return [(a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2 for a, b in zip(c, r)]
    if name == "aot":
        policy = sorted(a - b for a, b in zip(pc, pr))
        ref = sorted(a - b for a, b in zip(rc, rr))
        return [smoothed(beta * (a - b), eps) for a, b in zip(policy, ref)]
    if name == "aot_unpaired":
        return [smoothed(beta * (a - b), eps) for a, b in zip(sorted(c), sorted(r))]
    if name == "apo_zero":
        return [1 - sig(beta * a) + sig(beta * b) for a, b in zip(c, r)]
    if name == "apo_down":
        return [sig(beta * a) + 1 - sig(beta * (a - b)) for a, b in zip(c, r)]
    if name == "discopop":
        tau = 0.05
        return [(1 - sig(beta * x / tau)) * -logsig(beta * x) + sig(beta * x / tau) * math.exp(-beta * x) for x in h]
    raise AssertionError(name)


def t64(values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def formula(name, **kw):
    tokens = dict(chosen_tokens=torch.tensor(CHOSEN_TOKENS), rejected_tokens=torch.tensor(REJECTED_TOKENS))
    return dpo_losses(t64(PC), t64(PR), t64(RC), t64(RR), beta=BETA, loss_type=name, **{**tokens, **kw})


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_every_loss_type_matches_its_formula_in_float64(name):
    smoothing = EPS if name in ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired") else 0.0
    losses, chosen, rejected = formula(name, label_smoothing=smoothing)
    want = by_hand(name, eps=smoothing)
    assert torch.allclose(losses, t64(want), atol=1e-10, rtol=0)  # float64 vs float64
    if name == "ipo":  # TRL: with ipo every log-prob is per token, rewards included
        want_c = [BETA * (a - b) / n for a, b, n in zip(PC, RC, CHOSEN_TOKENS)]
        want_r = [BETA * (a - b) / n for a, b, n in zip(PR, RR, REJECTED_TOKENS)]
    else:
        want_c = [BETA * (a - b) for a, b in zip(PC, RC)]
        want_r = [BETA * (a - b) for a, b in zip(PR, RR)]
    assert torch.allclose(chosen, t64(want_c), atol=1e-12, rtol=0)
    assert torch.allclose(rejected, t64(want_r), atol=1e-12, rtol=0)
    assert not chosen.requires_grad


def test_exo_pair_uses_epsilon_1e3_when_label_smoothing_is_zero():
    losses, _, _ = formula("exo_pair")
    assert torch.allclose(losses, t64(by_hand("exo_pair", eps=1e-3)), atol=1e-10, rtol=0)


def test_bco_pair_takes_delta_as_an_argument():
    losses, _, _ = formula("bco_pair", bco_delta=0.37)
    assert torch.allclose(losses, t64(by_hand("bco_pair", delta=0.37)), atol=1e-10, rtol=0)


def test_a_list_of_loss_types_is_the_weighted_sum_and_so_are_the_rewards():
    losses, chosen, _ = formula(["sigmoid", "hinge", "apo_zero"], loss_weights=[0.5, 0.25, 2.0], label_smoothing=EPS)
    want = [0.5 * a + 0.25 * b + 2.0 * c
            for a, b, c in zip(by_hand("sigmoid"), by_hand("hinge"), by_hand("apo_zero"))]
    assert torch.allclose(losses, t64(want), atol=1e-10, rtol=0)
    # TRL sums the weighted rewards of every term
    assert torch.allclose(chosen, t64([2.75 * BETA * (a - b) for a, b in zip(PC, RC)]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_gradients_match_finite_differences(name):
    smoothing = EPS if name in ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired") else 0.0
    tokens = dict(chosen_tokens=torch.tensor(CHOSEN_TOKENS), rejected_tokens=torch.tensor(REJECTED_TOKENS))

    def fn(pc, pr, rc, rr):
        # a fixed delta: the default batch mean is detached, as in TRL, which finite differences would see
        return dpo_losses(pc, pr, rc, rr, beta=BETA, loss_type=name, label_smoothing=smoothing, bco_delta=0.2,
                          **tokens)[0]

    assert torch.autograd.gradcheck(fn, (t64(PC, True), t64(PR, True), t64(RC, True), t64(RR, True)))


def test_sigmoid_tends_to_log_2_as_beta_tends_to_zero():
    losses, chosen, rejected = dpo_losses(t64(PC), t64(PR), t64(RC), t64(RR), beta=1e-9)
    # log 2 - z/2 + O(z^2) with |z| = 1e-9 * |h| < 3e-9
    assert torch.allclose(losses, torch.full((3,), math.log(2), dtype=torch.float64), atol=1e-8, rtol=0)
    assert chosen.abs().max() < 1e-8 and rejected.abs().max() < 1e-8


def test_identical_chosen_and_rejected_give_log_2_and_zero_margin():
    for name, limit in (("sigmoid", math.log(2)), ("hinge", 1.0), ("discopop", 0.5 * math.log(2) + 0.5)):
        losses, chosen, rejected = dpo_losses(t64(PC), t64(PC), t64(RC), t64(RC), beta=BETA, loss_type=name)
        assert torch.allclose(losses, torch.full((3,), limit, dtype=torch.float64), atol=1e-12, rtol=0), name
        assert torch.equal(chosen, rejected)


def test_bad_loss_configurations_are_refused_by_name():
    with pytest.raises(ValueError, match="loss_type 'kto' is not a DPO loss type"):
        dpo_losses(t64(PC), t64(PR), t64(RC), t64(RR), beta=BETA, loss_type="kto")
    with pytest.raises(ValueError, match="loss_weights has 1 entries but loss_type has 2"):
        make_dpo(loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="ipo uses length-averaged log-probs"):
        dpo_losses(t64(PC), t64(PR), t64(RC), t64(RR), beta=BETA, loss_type="ipo")
    with pytest.raises(ValueError, match="dpo_label_smoothing=0.1 has no effect"):
        build_dpo_loss(rl="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="rl: ipo selects loss_type ipo"):
        build_dpo_loss("sigmoid", rl="ipo")
    with pytest.raises(ValueError, match="robust divides by 1 - 2"):
        make_dpo(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        make_dpo(beta=0.0)
    assert set(LOSS_TYPES) == set(PAIR_LOSSES) | {"sft"}


# --- the loss on a model --------------------------------------------------------------------------

def make_examples(n, seed, same=False):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(1, CONFIG.vocab_size, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()

    out = []
    for _ in range(n):
        chosen = ids(2, 6)
        out.append({"prompt_ids": ids(2, 5), "chosen_ids": chosen, "rejected_ids": list(chosen) if same else ids(2, 6)})
    return out


def setup():
    """A tiny model with a LoRA adapter whose B is nonzero, so policy != reference."""
    params = init(CONFIG, rng.key(0))
    lcfg = LoraConfig(r=4, alpha=8)
    delta = init_lora(params, lcfg, rng.key(1), target_linear=True)
    delta = {p: dict(e, B=rng.normal(rng.fold_in(rng.key(2), i), e["B"].shape, std=0.05))
             for i, (p, e) in enumerate(delta.items())}
    return params, {"lora": delta}, make_apply(CONFIG, params, lora_config=lcfg), lcfg


def full_logits(params, lora, lcfg, ids):
    return forward(params, ids, CONFIG, lora=lora, lora_config=lcfg).logits


def test_reference_by_disabling_lora_equals_the_base_model():
    params, trainable, bind, _ = setup()
    mb = collate_pairs(make_examples(3, 0), range(3), 3, pad_id=0)[0]
    apply = bind(trainable)
    reference = completion_logps(apply, mb, reference=True)["logps"]
    base = completion_logps(make_apply(CONFIG, params)({}), mb)["logps"]
    policy = completion_logps(apply, mb)["logps"]
    assert torch.allclose(reference, base, atol=1e-6, rtol=0)  # same fp32 computation
    assert (policy - base).abs().max() > 1e-3  # the adapter does change the policy


def test_loss_and_metrics_on_a_model_follow_trl():
    params, trainable, bind, lcfg = setup()
    mb = collate_pairs(make_examples(3, 1), range(3), 3, pad_id=0)[0]
    loss, metrics = make_dpo(beta=0.2).on_batch(bind(trainable), mb)
    # Independent computation from full [2B, T, V] logits.
    targets = mb["labels"][:, 1:]
    mask = targets != -100

    def logps(logits):
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (lp * mask).sum(-1)

    logits = full_logits(params, trainable["lora"], lcfg, mb["input_ids"])
    pol, ref = logps(logits), logps(forward(params, mb["input_ids"], CONFIG).logits)
    c, r = pol[:3] - ref[:3], pol[3:] - ref[3:]
    # fp32 forward, float64 reductions: 1e-5
    assert abs(loss.item() - (-F.logsigmoid(0.2 * (c - r))).mean().item()) < 1e-5
    assert abs(metrics["rewards/chosen"].item() - (0.2 * c).mean().item()) < 1e-5
    assert abs(metrics["rewards/rejected"].item() - (0.2 * r).mean().item()) < 1e-5
    assert abs(metrics["rewards/margins"].item() - (0.2 * (c - r)).mean().item()) < 1e-5
    assert metrics["rewards/accuracies"].item() == pytest.approx((c > r).double().mean().item())
    assert abs(metrics["logps/chosen"].item() - pol[:3].mean().item()) < 1e-4
    assert abs(metrics["logps/rejected"].item() - pol[3:].mean().item()) < 1e-4
    shifted = logits[:, :-1]
    assert abs(metrics["logits/chosen"].item() - shifted[:3][mask[:3]].mean().item()) < 1e-5
    assert abs(metrics["logits/rejected"].item() - shifted[3:][mask[3:]].mean().item()) < 1e-5


def test_pair_nll_is_the_per_token_cross_entropy_of_the_chosen_rows():
    params, trainable, bind, lcfg = setup()
    mb = collate_pairs(make_examples(3, 2), range(3), 3, pad_id=0)[0]
    value, metrics = pair_nll.on_batch(bind(trainable), mb)
    logits = full_logits(params, trainable["lora"], lcfg, mb["input_ids"][:3])
    want = F.cross_entropy(logits[:, :-1].reshape(-1, CONFIG.vocab_size), mb["labels"][:3, 1:].reshape(-1))
    assert abs(value.item() - want.item()) < 1e-5  # fp32, another summation order
    assert metrics["nll_loss"].item() == value.item()


def test_losses_compose_and_rpo_is_that_composition():
    _, trainable, bind, _ = setup()
    mb = collate_pairs(make_examples(3, 3), range(3), 3, pad_id=0)[0]
    apply = bind(trainable)
    dpo = make_dpo(beta=0.1)
    composed = dpo + 0.2 * pair_nll
    assert isinstance(composed, Loss) and isinstance(build_dpo_loss(rpo_alpha=0.2), Loss)
    dpo_value, _ = dpo.on_batch(apply, mb)
    nll_value, _ = pair_nll.on_batch(apply, mb)
    total, metrics = composed.on_batch(apply, mb)
    assert torch.allclose(total, dpo_value + 0.2 * nll_value, atol=1e-6, rtol=0)  # fp32 sum of two terms
    for loss in (build_dpo_loss("sigmoid", 0.1, rpo_alpha=0.2),
                 make_dpo(0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])):
        value, other = loss.on_batch(apply, mb)
        assert value.item() == total.item()
        assert other["nll_loss"].item() == metrics["nll_loss"].item() and "loss/dpo" in other
    ipo = build_dpo_loss(rl="ipo").on_batch(apply, mb)[0]
    assert ipo.item() == make_dpo(loss_type="ipo").on_batch(apply, mb)[0].item()


def test_ipo_on_a_model_uses_per_token_logps_everywhere():
    _, trainable, bind, _ = setup()
    mb = collate_pairs(make_examples(3, 4), range(3), 3, pad_id=0)[0]
    apply = bind(trainable)
    loss, metrics = make_dpo(beta=0.5, loss_type="ipo").on_batch(apply, mb)
    pol, ref = completion_logps(apply, mb), completion_logps(apply, mb, reference=True)["logps"]
    n = pol["tokens"].double()
    avg, ref_avg = pol["logps"].double() / n, ref.double() / n
    h = (avg[:3] - ref_avg[:3]) - (avg[3:] - ref_avg[3:])
    assert abs(loss.item() - ((h - 1.0) ** 2).mean().item()) < 1e-5  # 1/(2 beta) = 1; fp32 inputs
    assert abs(metrics["logps/chosen"].item() - avg[:3].mean().item()) < 1e-5
    assert abs(metrics["rewards/chosen"].item() - (0.5 * (avg[:3] - ref_avg[:3])).mean().item()) < 1e-5


def test_precomputed_reference_logps_replace_the_reference_forward():
    _, trainable, bind, _ = setup()
    mb = collate_pairs(make_examples(3, 5), range(3), 3, pad_id=0)[0]
    apply = bind(trainable)
    ref = completion_logps(apply, mb, reference=True)["logps"]
    loss = make_dpo()
    assert loss.on_batch(apply, {**mb, "ref_logps": ref})[0].item() == loss.on_batch(apply, mb)[0].item()
    shifted = ref + torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # a worse reference for the chosen rows
    assert loss.on_batch(apply, {**mb, "ref_logps": shifted})[0].item() > loss.on_batch(apply, mb)[0].item()
    with pytest.raises(ValueError, match=r"ref_logps'\] must have shape \[6\]"):
        loss.on_batch(apply, {**mb, "ref_logps": ref[:3]})


def test_identical_chosen_and_rejected_on_a_model():
    _, trainable, bind, _ = setup()
    mb = collate_pairs(make_examples(3, 6, same=True), range(3), 3, pad_id=0)[0]
    loss, metrics = make_dpo(beta=0.1).on_batch(bind(trainable), mb)
    # identical rows of one fp32 batch: equal up to summation noise
    assert abs(loss.item() - math.log(2)) < 1e-6 and abs(metrics["rewards/margins"].item()) < 1e-6


def test_wpo_weights_follow_trl():
    params, trainable, bind, lcfg = setup()
    mb = collate_pairs(make_examples(3, 7), range(3), 3, pad_id=0)[0]
    apply = bind(trainable)
    loss, _ = make_dpo(beta=0.1, use_weighting=True).on_batch(apply, mb)
    plain, _ = make_dpo(beta=0.1).on_batch(apply, mb)
    targets = mb["labels"][:, 1:]
    mask = targets != -100
    lp = torch.log_softmax(full_logits(params, trainable["lora"], lcfg, mb["input_ids"])[:, :-1].double(), -1)
    token_lp = lp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    adjusted = token_lp - torch.logsumexp(2 * lp, -1)  # log p(y_t) - log sum_v p_v^2
    w = (adjusted * mask).sum(-1) / mask.sum(-1)
    weights = torch.clamp(torch.exp(w[:3] + w[3:]), max=1)
    pol = completion_logps(apply, mb)
    ref = completion_logps(apply, mb, reference=True)["logps"]
    h = (pol["logps"][:3] - ref[:3]) - (pol["logps"][3:] - ref[3:])
    want = (weights * -F.logsigmoid(0.1 * h.double())).mean()
    assert abs(loss.item() - want.item()) < 1e-5  # fp32 logits, float64 post-processing
    assert loss.item() < plain.item()  # weights are in (0, 1]
    # The identity the implementation uses: log p(y) - log sum_v p_v^2 = log softmax(2z)[y] - log p(y)
    logits = full_logits(params, trainable["lora"], lcfg, mb["input_ids"])[:, :-1].double()
    sharpened = torch.log_softmax(2 * logits, -1)
    sharpened_lp = sharpened.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    got = wpo_log_weights((token_lp * mask).sum(-1), (sharpened_lp * mask).sum(-1), mask.sum(-1))
    assert torch.allclose(got, w, atol=1e-10, rtol=0)  # float64 throughout


def test_micro_batching_does_not_change_the_update():
    exs = make_examples(4, 8)
    _, trainable, bind, _ = setup()
    loss = build_dpo_loss("sigmoid", 0.2, rpo_alpha=0.5, use_weighting=True)
    results = []
    for size in (4, 2, 1):
        optimizer = sgd(0.5)
        step = make_train_step(loss, optimizer, bind)
        new, metrics = step(init_train_state(trainable, optimizer, rng.key(3)), collate_pairs(exs, range(4), size, 0))
        results.append((new.trainable["lora"], metrics))
    first, first_metrics = results[0]
    assert {"rewards/chosen", "logits/rejected", "nll_loss", "loss/dpo"} <= set(first_metrics)
    for delta, metrics in results[1:]:
        for name, value in first_metrics.items():
            # fp32 sums in another order, micro-batches padded to other widths
            assert abs(metrics[name].item() - value.item()) < 1e-5, name
        for path in delta:
            for part in ("A", "B"):
                assert torch.allclose(delta[path][part], first[path][part], atol=1e-6, rtol=1e-5)
    assert any((first[p]["B"] - trainable["lora"][p]["B"]).abs().max() > 1e-4 for p in first)  # it did move


def test_the_plain_step_of_dpo_is_the_pair_mean_for_any_micro_batching():
    """`make_train_step(dpo, optimizer, bind)` with no other argument: the loss carries its pair count.
    (Counting target tokens instead gave 0.69516 for 1x4 pairs and 1.39033 for 2x2: review 4.6.)"""
    exs = make_examples(4, 9)
    _, trainable, bind, _ = setup()
    apply = bind(trainable)
    pairs = collate_pairs(exs, range(4), 4, 0)[0]
    policy, ref = completion_logps(apply, pairs)["logps"], completion_logps(apply, pairs, reference=True)["logps"]
    h = (policy[:4] - ref[:4]) - (policy[4:] - ref[4:])
    want = -F.logsigmoid(0.1 * h.double()).mean().item()  # DPO's sigmoid loss, beta 0.1, per pair
    for size in (4, 2, 1):
        optimizer = sgd(0.5)
        step = make_train_step(dpo, optimizer, bind)
        _, metrics = step(init_train_state(trainable, optimizer, rng.key(3)), collate_pairs(exs, range(4), size, 0))
        assert metrics["train/loss"].item() == pytest.approx(want, rel=1e-6), size  # fp32 vs float64 tail
        assert metrics["rewards/accuracies"].item() <= 1.0


def test_pair_reference_logps_are_the_reference_logps_of_each_pair_in_order():
    _, trainable, bind, _ = setup()
    exs = make_examples(5, 10)
    apply = bind(trainable)
    got = pair_reference_logps(apply, collate_pairs(exs, range(5), 2, 0))  # batches of 2, 2 and 1 pairs
    whole = collate_pairs(exs, range(5), 5, 0)[0]
    ref = completion_logps(apply, whole, reference=True)["logps"]
    assert got.shape == (5, 2) and got.dtype == torch.float32
    # the same fp32 forward over rows padded to other widths: op order only
    torch.testing.assert_close(got, torch.stack([ref[:5], ref[5:]], dim=1), atol=1e-5, rtol=0)
    policy = completion_logps(apply, whole)["logps"]
    assert (policy[:5] - got[:, 0]).abs().max() > 1e-3  # the reference, not the policy with its adapter
