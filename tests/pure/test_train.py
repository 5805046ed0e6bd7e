"""The pure train step: token-weighted accumulation, determinism, composition, checkpoints."""
import dataclasses

import pytest
import torch

from pure import rng
from pure.losses import Loss, sft, token_logprobs
from pure.lora import LoraConfig, init_lora
from pure.models import forward, init
from pure.optim import adamw, sgd
from pure.train import init_train_state, make_apply, make_eval_step, make_train_step
from tests.tiny import TINY

CONFIG = TINY


def batch_rows(n, length=10, seed=0):
    """n rows whose prompt (a random-length prefix) is masked."""
    keys = rng.split(rng.key(seed), n + 1)
    ids = rng.randint(keys[0], 0, CONFIG.vocab_size, (n, length))
    labels = ids.clone()
    for i in range(n):
        cut = int(rng.randint(keys[i + 1], 1, length - 2, ()))
        labels[i, :cut] = -100
    return ids, labels


def micro_batches(ids, labels, size):
    return [{"input_ids": ids[i:i + size], "labels": labels[i:i + size]} for i in range(0, len(ids), size)]


def setup(lora=True, optimizer=None, dropout=0.0):
    params = init(CONFIG, rng.key(0))
    if lora:
        lcfg = LoraConfig(r=4, alpha=8, dropout=dropout)
        delta = init_lora(params, lcfg, rng.key(1), target_linear=True)
        delta = {p: dict(e, B=rng.normal(rng.fold_in(rng.key(2), i), e["B"].shape, std=0.02))
                 for i, (p, e) in enumerate(delta.items())}
        trainable, bind = {"lora": delta}, make_apply(CONFIG, params, lora_config=lcfg)
    else:
        trainable, bind = {"params": params}, make_apply(CONFIG, {})
    optimizer = optimizer or adamw(1e-2)
    return init_train_state(trainable, optimizer, rng.key(3)), make_train_step(sft, optimizer, bind), bind


def test_loss_is_the_mean_over_trained_tokens_of_the_whole_batch():
    state, step, bind = setup()
    ids, labels = batch_rows(8)
    _, metrics = step(state, micro_batches(ids, labels, 8))
    logits = forward(init(CONFIG, rng.key(0)), ids, CONFIG,
                     lora=state.trainable["lora"], lora_config=LoraConfig(r=4, alpha=8)).logits
    targets = labels[:, 1:]
    lp = token_logprobs(logits[:, :-1], targets.clamp(min=0))
    expected = -(lp * (targets != -100)).sum() / (targets != -100).sum()
    assert abs(metrics["train/loss"].item() - expected.item()) < 1e-5  # fp32, different summation order


def test_micro_batching_does_not_change_the_update():
    ids, labels = batch_rows(8)
    results = []
    for size in (8, 4, 1):
        state, step, _ = setup(optimizer=sgd(0.5))
        new, metrics = step(state, micro_batches(ids, labels, size))
        results.append((new.trainable["lora"], metrics["train/loss"]))
    for delta, loss in results[1:]:
        assert abs(loss.item() - results[0][1].item()) < 1e-5
        for path in delta:
            for name in ("A", "B"):  # fp32 sums in another order: 1e-6 relative
                assert torch.allclose(delta[path][name], results[0][0][path][name], atol=1e-6, rtol=1e-5)


def test_same_state_and_batches_give_bitwise_identical_steps_with_dropout():
    ids, labels = batch_rows(4)
    runs = []
    for _ in range(2):
        state, step, _ = setup(dropout=0.3)
        for _ in range(3):
            state, metrics = step(state, micro_batches(ids, labels, 2))
        runs.append((state, metrics))
    (a, ma), (b, mb) = runs
    assert torch.equal(a.rng_key, b.rng_key) and ma["train/loss"].item() == mb["train/loss"].item()
    for path in a.trainable["lora"]:
        assert torch.equal(a.trainable["lora"][path]["A"], b.trainable["lora"][path]["A"])


def test_loss_falls_when_training_a_full_model():
    state, step, bind = setup(lora=False, optimizer=adamw(3e-3))
    ids, labels = batch_rows(8)
    first = None
    for _ in range(15):
        state, metrics = step(state, micro_batches(ids, labels, 4))
        first = first if first is not None else metrics["train/loss"].item()
    assert metrics["train/loss"].item() < 0.7 * first
    evaluated = make_eval_step(sft, bind)(state.trainable, micro_batches(ids, labels, 4))
    assert evaluated["eval/loss"].item() < first


def test_losses_compose_by_addition_and_scaling():
    state, _, bind = setup()
    ids, labels = batch_rows(4)
    mb = micro_batches(ids, labels, 4)[0]
    apply = bind(state.trainable)
    single, _ = sft.on_batch(apply, mb)
    combined, metrics = (sft + 0.5 * sft).on_batch(apply, mb)
    assert torch.allclose(combined, 1.5 * single)
    assert isinstance(0.5 * sft, Loss) and "loss/sft" in metrics


def test_bind_gives_a_frozen_policy_whose_reference_is_the_base_model():
    state, _, bind = setup()
    policy = bind(state.trainable)
    ids, _ = batch_rows(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.params = {}
    assert policy.reference.reference is None and policy.reference.params is policy.params  # LoRA: no copy
    base = forward(init(CONFIG, rng.key(0)), ids, CONFIG).logits
    assert torch.equal(policy.reference(ids).logits, base)  # the adapter disabled
    assert not torch.allclose(policy(ids).logits, base)
