"""The research API as a notebook uses it: load the embedded model, write a new loss from the
pure pieces, build a step and train ten steps (under thirty lines)."""
import torch

from backends.hf import load_pretrained
from pure import rng
from pure.losses import Loss, next_token_targets, sft, token_logprobs
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
