"""Precision keys resolve to the documented plan; bf16 autocast tracks fp32 on the tiny model and
keeps fp32 master weights through a train step."""
import pytest
import torch

from backends.precision import PrecisionError, autocast_context, cast_params, resolve_precision
from pure import rng
from pure.lora import LoraConfig, init_lora
from pure.losses import sft
from pure.models.llama import forward, init
from pure.optim import adamw
from pure.train import init_train_state, make_apply, make_train_step
from tests.tiny import TINY

CONFIG = TINY


def test_defaults_and_auto_train_in_fp32_on_cpu():
    for keys in ({}, {"bf16": "auto"}, {"bf16": False}, {"float32": True}, {"bf16": None, "tf32": True}):
        plan = resolve_precision(**keys, device="cpu")
        assert plan.is_fp32, keys
        assert plan.param_dtype == torch.float32 and plan.autocast_dtype is None


@pytest.mark.parametrize("bf16, eval_dtype", [(True, torch.float32), ("full", torch.bfloat16)])
def test_bf16_is_autocast_over_fp32_master_weights(bf16, eval_dtype):
    plan = resolve_precision(bf16=bf16, device="cpu")
    assert plan.param_dtype == torch.float32
    assert plan.autocast_dtype == torch.bfloat16
    assert plan.eval_param_dtype == eval_dtype


def test_bfloat16_stores_params_in_bf16_without_a_master_copy():
    plan = resolve_precision(bfloat16=True, device="cpu")
    assert plan.param_dtype == plan.eval_param_dtype == torch.bfloat16 and plan.autocast_dtype is None
    params = {"w": torch.randn(3, 3), "ids": torch.arange(3)}
    cast = cast_params(params, plan)
    assert cast["w"].dtype == torch.bfloat16 and cast["ids"].dtype == torch.int64


@pytest.mark.parametrize("keys, message", [
    ({"float16": True}, "float16: true is refused on CPU"),
    ({"bf16": True, "fp16": True}, "bf16 and fp16"),
    ({"bfloat16": True, "float16": True}, "bfloat16 and float16"),
    ({"float32": True, "bf16": True}, "float32: true cannot be combined"),
    ({"bf16": "half"}, "bf16: expected"),
    ({"tf32": "yes"}, "tf32: expected"),
])
def test_unrunnable_settings_are_refused_naming_the_key(keys, message):
    with pytest.raises(PrecisionError, match=message):
        resolve_precision(**keys, device="cpu")


def test_fp32_plan_leaves_autocast_off():
    with autocast_context(resolve_precision(device="cpu"), "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_autocast_forward_is_within_1e_2_of_fp32():
    params = init(CONFIG, rng.key(0))
    tokens = rng.randint(rng.key(1), 0, CONFIG.vocab_size, (2, 12))
    with torch.no_grad():
        reference = forward(params, tokens, CONFIG).logits
        with autocast_context(resolve_precision(bf16=True, device="cpu"), "cpu"):
            low = forward(params, tokens, CONFIG).logits
    assert low.dtype == torch.bfloat16  # the matmuls really ran in bf16
    # bf16 keeps 8 mantissa bits (relative rounding 2**-9 ~ 2e-3 per op); over two layers the
    # logits stay within 1e-2 of fp32 relative to their scale (measured 3.9e-3), and so do the
    # next-token probabilities in absolute terms (measured 2.4e-5).
    scale = reference.abs().max()
    assert ((low.float() - reference).abs().max() / scale).item() < 1e-2
    assert (low.float().softmax(-1) - reference.softmax(-1)).abs().max().item() < 1e-2


def test_train_step_under_bf16_autocast_keeps_fp32_master_weights_and_tracks_fp32():
    params = init(CONFIG, rng.key(0))
    lora_config = LoraConfig(r=4, alpha=8)
    delta = init_lora(params, lora_config, rng.key(1), target_linear=True)
    delta = {path: {"A": e["A"], "B": e["A"].new_full((e["B"].shape), 0.1)} for path, e in delta.items()}
    optimizer = adamw(1e-3)
    step = make_train_step(sft, optimizer, make_apply(CONFIG, params, lora_config=lora_config))
    ids = rng.randint(rng.key(2), 0, CONFIG.vocab_size, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = [{"input_ids": ids, "labels": labels}]
    state = init_train_state({"lora": delta, "params": {}}, optimizer, rng.key(3))
    fp32_state, fp32_metrics = step(state, batch)
    with autocast_context(resolve_precision(bf16=True, device="cpu"), "cpu"):
        bf16_state, bf16_metrics = step(state, batch)
    for path, entry in bf16_state.trainable["lora"].items():
        assert entry["A"].dtype == entry["B"].dtype == torch.float32, path
    # Loss: bf16 matmuls, fp32 log-softmax; relative 1e-2 as above.
    assert bf16_metrics["train/loss"].item() == pytest.approx(fp32_metrics["train/loss"].item(), rel=1e-2)
    assert bf16_metrics["train/grad_norm"].item() == pytest.approx(fp32_metrics["train/grad_norm"].item(), rel=5e-2)


def test_config_keys_resolve_through_the_validated_config():
    from programs.config.derived import precision_plan
    from programs.config import ConfigError, validate

    base = {"base_model": "x", "learning_rate": 1e-4, "datasets": [{"path": "a.jsonl", "type": "alpaca"}]}
    assert precision_plan(validate(base)).is_fp32  # bf16: auto by default, fp32 on CPU
    assert precision_plan(validate({**base, "bf16": True})).autocast_dtype == torch.bfloat16
    assert precision_plan(validate({**base, "bfloat16": True})).param_dtype == torch.bfloat16
    fp16 = precision_plan(validate({**base, "fp16": True}))
    assert fp16.autocast_dtype == torch.float16 and fp16.loss_scaling and fp16.param_dtype == torch.float32
    with pytest.raises(ConfigError, match="float32: true cannot be combined"):
        validate({**base, "float32": True, "bf16": "full"})
