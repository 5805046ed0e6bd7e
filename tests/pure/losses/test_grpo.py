"""The GRPO loss family: every loss type's value and gradient against closed forms, TRL's
normalisers, micro-batch accumulation, and the Loss on a tiny model through the train step."""
import math

import pytest
import torch

from pure import rng
from pure.losses import count_grpo, grpo, grpo_token_losses, make_grpo, nll, reduce_grpo_loss
from pure.losses.grpo import CLIP_TYPES, LOSS_TYPES, completion_token_logps, entropy_sum
from pure.models.llama import forward, init
from pure.optim import sgd
from pure.train import init_train_state, make_apply, make_train_step
from tests.tiny import TINY

F64 = 1e-10  # float64 closed forms vs autograd of the same float64 math
F32 = 1e-5  # fp32 forward of the tiny model vs a float64 oracle on the same logits

# A fixed [3, 5] example. Log-ratios log(πθ/π_old) are chosen so clipping triggers on both sides,
# at token and at sequence level: row 0 (A > 0) has ratios above 1 + ε_hi and one below 1 - ε_lo
# (unclipped for A > 0); row 1 (A < 0) ratios below 1 - ε_lo and one above δ = 1.5; row 2 (A < 0)
# ratios inside the range and above δ. Masked tokens carry large log-ratios that must not count.
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
LOG_RATIO = torch.tensor([[0.6, -0.3, 0.4, 0.5, 0.9],
                          [-0.45, 0.6, -0.9, -2.0, 0.7],
                          [0.15, 0.9, 0.2, 0.6, 0.3]], dtype=torch.float64)
LOGPS = torch.tensor([[-1.2, -0.7, -2.5, -0.4, -1.0],
                      [-0.9, -1.6, -0.3, -2.2, -0.8],
                      [-1.1, -0.5, -1.9, -0.6, -1.3]], dtype=torch.float64)
OLD = LOGPS - LOG_RATIO
REF = LOGPS + torch.tensor([[0.1, -0.2, 0.05, 0.3, -0.1], [-0.15, 0.2, 0.1, 0.0, 0.4], [0.25, -0.05, -0.3, 0.1, 0.2]],
                           dtype=torch.float64)
ADV = torch.tensor([1.0, -0.7, -0.4], dtype=torch.float64)
EPS, EPS_HIGH, DELTA, CISPO_CAP, BETA = 0.2, 0.28, 1.5, 1.2, 0.04
TAU_POS, TAU_NEG = 1.0, 1.05
MAX_LEN, ACCUM, GEN_TOKENS = 8, 2, 37.0


def reducer_weights(loss_type, mask):
    """ω with loss = Σ_it ω_it l_it, TRL's normaliser of each type written out."""
    B = mask.shape[0]
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    return {"grpo": mask / (n * B * ACCUM), "sapo": mask / (n * B * ACCUM),
            "bnpo": mask / (mask.sum() * ACCUM), "dr_grpo": mask / (B * MAX_LEN * ACCUM),
            "dapo": mask / GEN_TOKENS, "cispo": mask / GEN_TOKENS}[loss_type]


def hand_objective(loss_type, w, A, logps, delta):
    """(f, df/dlog w, ∂f/∂ℓ) of the per-token objective at importance weight w (broadcast with A [B, 1])."""
    if loss_type == "cispo":
        capped = torch.clamp(w, max=CISPO_CAP)
        return -capped * A * logps, torch.zeros_like(w), -capped * A
    if loss_type == "sapo":
        tau = torch.where(A > 0, TAU_POS, TAU_NEG).double()
        s = torch.sigmoid(tau * (w - 1))
        return -(4 / tau) * s * A, -4 * s * (1 - s) * w * A, torch.zeros_like(logps)
    lo, hi = 1 - EPS, 1 + EPS_HIGH
    capped = w if delta is None else torch.clamp(w, max=delta)
    clipped = torch.clamp(w, lo, hi)
    # A > 0: the objective is min(w', clip(w)) A; A < 0: max(w', clip(w)) A.
    value = torch.where(A > 0, -torch.minimum(capped, clipped) * A, -torch.maximum(capped, clipped) * A)
    # -A w where the unclipped (and uncapped) ratio is the active branch, else 0; inside the clip
    # range both branches are w and torch.min splits the tie, so the gradient is still -A w.
    clipped_away = ((A > 0) & (w > hi)) | ((A < 0) & (w < lo))
    if delta is not None:
        clipped_away = clipped_away | (w > delta)
    return value, torch.where(clipped_away, 0.0, -A * w), torch.zeros_like(logps)


def hand_loss_and_grad(loss_type, level, beta, delta):
    A = ADV[:, None]
    if level == "token":
        log_w = LOG_RATIO
    else:
        log_w = ((LOG_RATIO * MASK).sum(-1) / MASK.sum(-1)).unsqueeze(-1)
    w = torch.exp(log_w)
    f, df_dlogw, df_dlogp = hand_objective(loss_type, w, A, LOGPS, delta)
    omega = reducer_weights(loss_type, MASK)
    diff = REF - LOGPS
    kl = torch.exp(diff) - diff - 1
    value = (omega * (f + beta * kl)).sum()
    direct = omega * (df_dlogp + beta * (1 - torch.exp(diff)))
    if level == "token":
        grad = direct + omega * df_dlogw
    else:  # log w_i = Σ_t m_it (ℓ_it - ℓ_old_it) / n_i: chain rule into each active token
        grad = direct + (omega * df_dlogw).sum(-1, keepdim=True) * MASK / MASK.sum(-1, keepdim=True)
    return value, grad


def implementation_loss_and_grad(loss_type, level, beta, delta):
    logps = LOGPS.clone().requires_grad_(True)
    eps_high = CISPO_CAP if loss_type == "cispo" else EPS_HIGH
    per_token, parts = grpo_token_losses(logps, OLD, REF, ADV, MASK, loss_type=loss_type, epsilon=EPS,
                                         epsilon_high=eps_high, delta=delta, beta=beta,
                                         importance_sampling_level=level, sapo_temperature_pos=TAU_POS,
                                         sapo_temperature_neg=TAU_NEG)
    assert per_token.shape == MASK.shape
    value = reduce_grpo_loss(per_token, MASK, loss_type, accumulation_steps=ACCUM,
                             generation_tokens=torch.tensor(GEN_TOKENS), max_completion_length=MAX_LEN)
    (grad,) = torch.autograd.grad(value, logps)
    return value, grad, parts


CASES = [(t, level, beta, delta) for t in LOSS_TYPES for level in ("token", "sequence") for beta in (0.0, BETA)
         for delta in ((None, DELTA) if t in CLIP_TYPES else (None,))]


@pytest.mark.parametrize("loss_type,level,beta,delta", CASES)
def test_value_and_gradient_match_the_closed_forms(loss_type, level, beta, delta):
    value, grad, _ = implementation_loss_and_grad(loss_type, level, beta, delta)
    want_value, want_grad = hand_loss_and_grad(loss_type, level, beta, delta)
    torch.testing.assert_close(value, want_value, atol=F64, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=F64, rtol=0)
    assert (grad[MASK == 0] == 0).all()  # padding never moves the policy


def test_the_example_clips_on_both_sides_at_both_levels():
    """The closed-form tests above exercise every branch: the example must clip low, clip high, and cap at δ."""
    for level in ("token", "sequence"):
        _, grad_plain, parts = implementation_loss_and_grad("dapo", level, 0.0, None)
        active = MASK.bool() if level == "token" else torch.ones(3, 1, dtype=torch.bool)
        assert (parts["is_low_clipped"] & active).any() and (parts["is_high_clipped"] & active).any()
        torch.testing.assert_close(parts["is_region_clipped"], parts["is_low_clipped"] | parts["is_high_clipped"])
        _, grad_delta, _ = implementation_loss_and_grad("dapo", level, 0.0, DELTA)
        assert not torch.equal(grad_plain, grad_delta)  # δ caps a negative-advantage ratio
    _, _, parts = implementation_loss_and_grad("cispo", "token", 0.0, None)
    assert parts["is_cispo_clipped"].any() and parts["is_low_clipped"] is None


def test_trl_clip_indicators():
    _, _, parts = implementation_loss_and_grad("grpo", "token", 0.0, None)
    r = torch.exp(LOG_RATIO)
    torch.testing.assert_close(parts["coef_1"], r, atol=F64, rtol=0)
    assert torch.equal(parts["is_low_clipped"], (r < 1 - EPS) & (ADV[:, None] < 0))
    assert torch.equal(parts["is_high_clipped"], (r > 1 + EPS_HIGH) & (ADV[:, None] > 0))
    assert parts["per_token_kl"] is None


def test_without_old_logps_the_ratio_is_one_and_the_gradient_is_the_policy_gradient():
    """μ = 1: old_logps None means ℓ.detach(), so r = 1 and ∇ = -A ∇ℓ (every clip type, token level)."""
    logps = LOGPS.clone().requires_grad_(True)
    per_token, parts = grpo_token_losses(logps, None, None, ADV, MASK, loss_type="dapo")
    assert torch.equal(parts["coef_1"], torch.ones_like(LOGPS))
    torch.testing.assert_close(per_token, (-ADV[:, None]).expand(3, 5))
    (grad,) = torch.autograd.grad(reduce_grpo_loss(per_token, MASK, "dapo", generation_tokens=MASK.sum()), logps)
    torch.testing.assert_close(grad, -ADV[:, None] * MASK / MASK.sum(), atol=F64, rtol=0)


def test_reduce_grpo_loss_normalisers():
    loss = torch.arange(15, dtype=torch.float64).view(3, 5)
    masked = loss * MASK  # row sums 6, 18, 60 over 4, 3, 5 tokens
    rows = torch.tensor([6 / 4, 18 / 3, 60 / 5], dtype=torch.float64)
    kw = dict(accumulation_steps=2, generation_tokens=torch.tensor(40.0), max_completion_length=10)
    torch.testing.assert_close(reduce_grpo_loss(loss, MASK, "grpo", **kw), rows.mean() / 2)
    torch.testing.assert_close(reduce_grpo_loss(loss, MASK, "sapo", **kw), rows.mean() / 2)
    torch.testing.assert_close(reduce_grpo_loss(loss, MASK, "bnpo", **kw), masked.sum() / 12 / 2)
    torch.testing.assert_close(reduce_grpo_loss(loss, MASK, "dr_grpo", **kw), masked.sum() / (3 * 10) / 2)
    torch.testing.assert_close(reduce_grpo_loss(loss, MASK, "dapo", **kw), masked.sum() / 40)
    torch.testing.assert_close(reduce_grpo_loss(loss, MASK, "cispo", **kw), masked.sum() / 40)
    # generation_tokens = 0 (an all-masked generation batch) is clamped to 1, as TRL clamps it
    zero = reduce_grpo_loss(loss, MASK * 0, "dapo", generation_tokens=0)
    torch.testing.assert_close(zero, torch.zeros((), dtype=torch.float64))
    with pytest.raises(ValueError, match="max_completion_length"):
        reduce_grpo_loss(loss, MASK, "dr_grpo")


def test_micro_batch_sums_dapo_is_exact_grpo_and_bnpo_are_means_of_micro_batch_means():
    """Split rows {0} | {1, 2} (4 tokens | 8 tokens). dapo and cispo divide token sums by one global
    count, so the micro-batch losses add up to the whole-batch loss. grpo (and sapo, dr_grpo) average
    each micro-batch and divide by the number of micro-batches, as TRL does with
    current_gradient_accumulation_steps: grpo's sum is the mean over micro-batches of their row means
    (equal to the whole-batch row mean only when micro-batches have equal rows); bnpo's sum is the
    mean over micro-batches of their token means, not the token mean of the batch."""
    loss = torch.arange(15, dtype=torch.float64).view(3, 5)
    parts = [slice(0, 1), slice(1, 3)]
    total = MASK.sum()

    def summed(loss_type):
        return sum(reduce_grpo_loss(loss[p], MASK[p], loss_type, accumulation_steps=2, generation_tokens=total)
                   for p in parts)

    whole = {t: reduce_grpo_loss(loss, MASK, t, accumulation_steps=1, generation_tokens=total)
             for t in ("dapo", "grpo", "bnpo")}
    torch.testing.assert_close(summed("dapo"), whole["dapo"], atol=F64, rtol=0)
    rows = torch.tensor([6 / 4, 18 / 3, 60 / 5], dtype=torch.float64)
    torch.testing.assert_close(summed("grpo"), (rows[0] + rows[1:].mean()) / 2, atol=F64, rtol=0)
    assert abs(summed("grpo") - whole["grpo"]) > 1e-3
    torch.testing.assert_close(summed("bnpo"), (6 / 4 + 78 / 8) / 2 * torch.ones((), dtype=torch.float64),
                               atol=F64, rtol=0)
    torch.testing.assert_close(whole["bnpo"], 84 / 12 * torch.ones((), dtype=torch.float64), atol=F64, rtol=0)


def test_beta_needs_reference_logps():
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_token_losses(LOGPS, OLD, None, ADV, MASK, loss_type="grpo", beta=0.1)


def test_make_grpo_validates_up_front():
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo, cispo, sapo"):
        make_grpo("ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        make_grpo("dr_grpo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        make_grpo(importance_sampling_level="row")
    with pytest.raises(ValueError, match="delta"):
        make_grpo("sapo", delta=2.0)
    assert make_grpo("dr_grpo", max_completion_length=16).name == "grpo"


# ---- the Loss on a tiny random model -------------------------------------------------------------

P, C = 3, 5


def tiny_batch(seed=1, rows=4):
    """Prompts left-padded to P, completions right-padded to C; row 1's completion is all masked."""
    ids = rng.randint(rng.key(seed), 1, TINY.vocab_size, (rows, P + C))
    mask = torch.ones(rows, C)
    mask[0, 3:] = 0
    mask[1, :] = 0
    segment_ids = torch.ones(rows, P + C, dtype=torch.long)
    segment_ids[:, P:] = mask.long()
    segment_ids[2, 0] = 0  # a left-padded prompt
    positions = (segment_ids.cumsum(-1) - 1).clamp(min=0)
    labels = torch.full((rows, P + C), -100)
    labels[:, P:] = torch.where(mask > 0, ids[:, P:], -100)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.3, 0.8, -0.2])[:rows]
    return {"input_ids": ids, "positions": positions, "segment_ids": segment_ids, "completion_ids": ids[:, P:],
            "completion_mask": mask, "advantages": advantages, "labels": labels}


def split(batch, cut):
    """Two micro-batches of rows [:cut] and [cut:]; 0-dim values (generation_tokens) go to both."""
    return [{k: v if v.dim() == 0 else v[part] for k, v in batch.items()} for part in (slice(0, cut), slice(cut, None))]


@pytest.fixture(scope="module")
def params():
    return init(TINY, rng.key(0))


def full_logits_logps(params, batch, temperature=1.0):
    """The float64 oracle: log_softmax of the full logits, completion token j read at position P-1+j."""
    logits = forward(params, batch["input_ids"], TINY, positions=batch["positions"],
                     segment_ids=batch["segment_ids"]).logits.double() / temperature
    lp = torch.log_softmax(logits[:, P - 1:-1], -1)
    return lp.gather(-1, batch["completion_ids"][..., None])[..., 0] * batch["completion_mask"], lp


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loss_reads_completion_logps_at_the_right_positions(params, temperature):
    """cispo's value is -Σ sg(min(r, cap)) A ℓ / N, so at r = 1 it exposes the per-token log-probs."""
    batch = tiny_batch()
    policy = make_apply(TINY, params)({})
    want, _ = full_logits_logps(params, batch, temperature)
    got = completion_token_logps(policy, batch, temperature=temperature)
    torch.testing.assert_close(got.double(), want, atol=F32, rtol=0)
    loss = make_grpo("cispo", epsilon_high=5.0, temperature=temperature)
    value, _ = loss.on_batch(policy, batch)
    mask = batch["completion_mask"]
    expected = -(batch["advantages"][:, None].double() * want).sum() / mask.sum()
    torch.testing.assert_close(value.double(), expected, atol=F32, rtol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo", "sapo"])
def test_value_at_ratio_one_is_minus_the_weighted_mean_advantage(params, loss_type):
    batch = tiny_batch()
    policy = make_apply(TINY, params)({})
    value, _ = make_grpo(loss_type, max_completion_length=C).on_batch(policy, batch)
    A, mask = batch["advantages"], batch["completion_mask"]
    n = mask.sum(-1)
    expected = {
        "grpo": -(A * (n > 0)).sum() / 4,  # row means; the all-masked row 1 adds 0
        "sapo": -(2 / torch.where(A > 0, 1.0, 1.05) * A * (n > 0)).sum() / 4,  # (4/τ) σ(0) = 2/τ
        "dapo": -(A * n).sum() / n.sum(),
        "bnpo": -(A * n).sum() / n.sum(),
        "dr_grpo": -(A * n).sum() / (4 * C),
    }[loss_type]
    torch.testing.assert_close(value, expected, atol=F32, rtol=0)


def test_gradient_at_ratio_one_is_the_policy_gradient_and_nonzero(params):
    """At r = 1 every clip type's gradient is -Σ ω A ∇ℓ: the same as cispo's with a cap above 1."""
    batch = tiny_batch()
    bind = make_apply(TINY, {})
    trainable = {"params": params}

    def grad_of(loss):
        def f(t):
            return loss(bind(t), {**batch, **loss.count_fn([batch])})[0]
        return torch.func.grad(f)(trainable)["params"]

    clip, pg = grad_of(make_grpo("dapo")), grad_of(make_grpo("cispo", epsilon_high=5.0))
    norm = sum(g.norm() ** 2 for g in clip.values()) ** 0.5
    assert norm > 1e-4
    for name in clip:
        torch.testing.assert_close(clip[name], pg[name], atol=1e-6, rtol=1e-5)  # fp32, same graph up to r = 1


def test_reference_logps_default_to_the_reference_policy(params):
    batch = tiny_batch()
    policy = make_apply(TINY, params)({})
    loss = make_grpo("dapo", beta=0.1)
    value, metrics = loss.on_batch(policy, batch)
    assert abs(metrics["kl"].item()) < 1e-7  # the reference is the policy itself: k3 KL 0 (fp32 rounding)
    ref = completion_token_logps(policy.reference, batch) - 0.2 * batch["completion_mask"]
    value, metrics = loss.on_batch(policy, {**batch, "ref_logps": ref})
    mask = batch["completion_mask"]
    kl = (math.exp(-0.2) + 0.2 - 1)
    torch.testing.assert_close(metrics["kl"], torch.tensor(kl), atol=F32, rtol=0)
    A, n = batch["advantages"], mask.sum(-1)
    torch.testing.assert_close(value, (-(A * n).sum() + 0.1 * kl * n.sum()) / n.sum(), atol=F32, rtol=0)


def test_entropy_metric_is_the_mean_token_entropy(params):
    batch = tiny_batch()
    policy = make_apply(TINY, params)({})
    _, metrics = grpo.on_batch(policy, batch)
    _, lp = full_logits_logps(params, batch)
    entropy = -(lp.exp() * lp).sum(-1)
    mask = batch["completion_mask"]
    torch.testing.assert_close(metrics["entropy"].double(), (entropy * mask).sum() / mask.sum(), atol=F32, rtol=0)
    hidden = torch.randn(7, TINY.hidden_size, generator=torch.Generator().manual_seed(0))
    weight = params["model.embed_tokens.weight"]
    torch.testing.assert_close(entropy_sum(hidden, weight, chunk_rows=2), entropy_sum(hidden, weight))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_micro_batch_values_and_metrics_add_up_to_the_whole_batch(params, level):
    """dapo with generation_tokens: losses and every metric summed over micro-batches equal the whole batch's."""
    batch = tiny_batch(rows=6)
    old = completion_token_logps(make_apply(TINY, params)({}), batch).detach()
    # Rows move away from π_old in the direction of their advantage (by e^0.35 ~ 1.42 in ratio), so
    # both clip sides trigger at sequence level too; the noise spreads the token-level ratios.
    shift = -0.35 * torch.sign(batch["advantages"])[:, None]
    batch["old_logps"] = old + shift + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))
    batch["generation_tokens"] = batch["completion_mask"].sum()
    policy = make_apply(TINY, params)({})
    loss = make_grpo("dapo", beta=0.05, importance_sampling_level=level)
    whole, whole_metrics = loss.on_batch(policy, batch)
    assert whole_metrics["clip_ratio/low_mean"] > 0 and whole_metrics["clip_ratio/high_mean"] > 0
    parts = split(batch, 2)
    totals = loss.count_fn(parts)
    values, metrics = zip(*(loss(policy, {**mb, **totals}) for mb in parts))
    torch.testing.assert_close(sum(values), whole, atol=F32, rtol=0)
    for name, v in whole_metrics.items():
        torch.testing.assert_close(sum(m[name] for m in metrics), v, atol=F32, rtol=0)


def test_count_grpo():
    batch = tiny_batch(rows=6)
    counts = count_grpo(split(batch, 2))
    assert counts["total_completion_tokens"].item() == batch["completion_mask"].sum().item() == 3 + 0 + 4 * 5
    assert counts["total_micro_batches"].item() == 2 and counts["total_rows"].item() == 6


def test_missing_totals_are_an_error(params):
    with pytest.raises(ValueError, match="total_completion_tokens"):
        grpo(make_apply(TINY, params)({}), tiny_batch())


def test_grpo_plus_nll_composes(params):
    batch = tiny_batch()
    policy = make_apply(TINY, params)({})
    value, metrics = (make_grpo() + 0.05 * nll).on_batch(policy, batch)
    g, _ = make_grpo().on_batch(policy, batch)
    n, _ = nll.on_batch(policy, batch)
    torch.testing.assert_close(value, g + 0.05 * n)
    assert {"loss/grpo", "loss/0.05*nll", "entropy", "num_trained_tokens"} <= metrics.keys()


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_train_step_runs_through_torch_func(params, loss_type):
    batch = tiny_batch(rows=6)
    optimizer = sgd(0.1)
    loss = make_grpo(loss_type, epsilon_high=5.0 if loss_type == "cispo" else None) + 0.05 * nll
    step = make_train_step(loss, optimizer, make_apply(TINY, {}))
    state = init_train_state({"params": dict(params)}, optimizer, rng.key(3))
    new, metrics = step(state, split(batch, 3))
    assert new.step == 1 and metrics["train/grad_norm"] > 0
    assert torch.isfinite(metrics["train/loss"]) and "entropy" in metrics
    moved = any(not torch.equal(new.trainable["params"][k], params[k]) for k in params)
    assert moved


def test_a_micro_batch_with_no_active_tokens_gives_zero_and_a_zero_gradient(params):
    """lm_head then runs on no rows at all; the loss is 0 and the step still differentiates."""
    batch = tiny_batch()
    batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
    bind = make_apply(TINY, {})
    loss = make_grpo("dapo")

    def f(t):
        return loss(bind(t), {**batch, **loss.count_fn([batch])})[0]

    grads = torch.func.grad(f)({"params": params})["params"]
    assert f({"params": params}).item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
