"""The research API as a notebook uses it: load the embedded model, write a new loss from the
pure pieces, build a step and train ten steps (under thirty lines); and a preference loss through
the same `make_train_step(loss, optimizer, bind)`, with no other argument."""
import pytest
import torch

from backends.hf import load_pretrained
from pure import rng
from pure.data.pair_batch import collate_pairs
from pure.losses import Loss, dpo, next_token_targets, pair_nll, sft
from pure.lora import LoraConfig, init_lora
from pure.optim import adamw
from pure.train import init_train_state, make_apply, make_train_step


def test_notebook_trains_the_embedded_model_with_a_custom_loss_in_ten_steps():
    params, config, tokenizer = load_pretrained("smollm2-135m-instruct")
    ids = torch.tensor([tokenizer("The answer is forty-two. The answer is forty-two.")["input_ids"]] * 2)
    batch = {"input_ids": ids, "labels": ids.clone()}

    def entropy_bonus(apply, batch, key=None):  # a new objective: reward confident predictions
        targets = next_token_targets(batch["labels"])
        logits = apply(batch["input_ids"], logits_at=targets != -100, key=key).logits
        entropy = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1).mean()
        return entropy, {"entropy": entropy.detach()}

    objective = sft + 0.01 * Loss(entropy_bonus, "entropy")
    lora_config = LoraConfig(r=8, alpha=16)
    delta = init_lora(params, lora_config, rng.key(0), target_modules=["q_proj", "v_proj"])
    optimizer = adamw(1e-3)
    step = make_train_step(objective, optimizer, make_apply(config, params, lora_config=lora_config))
    state = init_train_state({"lora": delta}, optimizer, rng.key(1))
    losses = []
    for _ in range(10):
        state, metrics = step(state, [batch])
        losses.append(metrics["train/loss"].item())
    assert state.step == 10 and "entropy" in metrics and "loss/sft" in metrics
    assert losses[-1] < losses[0]


def test_notebook_trains_dpo_with_the_plain_step_whatever_the_micro_batching():
    params, config, tokenizer = load_pretrained("smollm2-135m-instruct")
    def ids(text):
        return tokenizer(text)["input_ids"]

    pairs = [{"prompt_ids": ids(f"What is {a} + {a}? "), "chosen_ids": ids(f"{2 * a}."),
              "rejected_ids": ids(f"{2 * a + 1}.")} for a in (3, 7, 12, 20)]
    lora_config = LoraConfig(r=8, alpha=16)
    delta = init_lora(params, lora_config, rng.key(0), target_modules=["q_proj", "v_proj"])
    bind = make_apply(config, params, lora_config=lora_config)
    first_losses = []
    for size in (4, 2):  # one micro-batch of 4 pairs, two of 2: the loss counts pairs itself
        optimizer = adamw(1e-3)
        step = make_train_step(dpo + 0.1 * pair_nll, optimizer, bind)  # RPO, as a notebook writes it
        state = init_train_state({"lora": delta}, optimizer, rng.key(1))
        state, metrics = step(state, collate_pairs(pairs, range(4), size, tokenizer.pad_token_id))
        first_losses.append(metrics["loss/dpo"].item())
    # LoRA B = 0: policy == reference, so DPO's first loss is -log sigmoid(0) = log 2 (fp32)
    assert first_losses == pytest.approx([0.6931472] * 2, rel=1e-6)
    for _ in range(3):
        state, metrics = step(state, collate_pairs(pairs, range(4), 2, tokenizer.pad_token_id))
    assert metrics["rewards/margins"].item() > 0  # chosen pulled above rejected


def test_notebook_trains_grpo_with_its_own_reward_and_an_extra_loss_term():
    from backends.rollout import Sampling
    from backends.rollout.native import NativeEngine
    from pure.advantages import group_advantages
    from pure.data.rollout_batch import collate_rollouts
    from pure.losses import make_grpo, nll

    params, config, tokenizer = load_pretrained("smollm2-135m-instruct")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Say a number below {n}."}],
                                             add_generation_prompt=True, tokenize=True) for n in (5, 9)]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]

    def digits(texts):  # a new reward: the share of digits in the reply
        return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]

    lora_config = LoraConfig(r=8, alpha=16)
    delta = init_lora(params, lora_config, rng.key(0), target_modules=["q_proj", "v_proj"])
    engine = NativeEngine(config, params, lora_config=lora_config, pad_token_id=tokenizer.pad_token_id)
    optimizer = adamw(1e-3)
    step = make_train_step(make_grpo(loss_type="grpo", beta=0.04) + 0.05 * nll, optimizer,
                           make_apply(config, params, lora_config=lora_config))
    state = init_train_state({"lora": delta}, optimizer, rng.key(1))
    sampling = Sampling(max_tokens=8, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,))
    for i in range(3):
        out = engine.generate(state.trainable, prompts, 4, sampling, rng.fold_in(rng.key(2), i))
        rewards = torch.tensor(digits(tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)))
        adv = group_advantages(rewards[:, None].double(), torch.ones(1, dtype=torch.float64), 4).advantages
        state, metrics = step(state, [collate_rollouts(out.prompt_ids, out.completion_ids, adv, tokenizer.pad_token_id)])
    assert state.step == 3 and {"loss/grpo", "loss/0.05*nll", "kl", "entropy"} <= set(metrics)
    assert any(torch.count_nonzero(e["B"]) for e in state.trainable["lora"].values())  # the adapter moved
