"""The model-FLOP formula on a shape counted by hand, and the measured matmul peak."""
from backends.flops import attention_pairs, flop_counter, measure_matmul_peak
from pure import rng
from pure.lora import LoraConfig, init_lora
from pure.models import ModelConfig, init


def test_flop_formula_on_a_known_shape():
    config = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    params = init(config, rng.key(0))
    lora = init_lora(params, LoraConfig(r=2), rng.key(1), target_linear=True)
    counter = flop_counter(config, {"params": {}, "lora": lora})
    # Per layer: q 8x8, k 4x8, v 4x8, o 8x8, gate/up 12x8, down 8x12 = 64+32+32+64+96+96+96 = 480 frozen;
    # LoRA r=2: q 2(8+8), k 2(8+4), v 2(8+4), o 2(8+8), gate/up 2(8+12), down 2(12+8) = 32+24+24+32+40+40+40 = 232.
    assert counter.frozen_matmul_params == 2 * 480
    assert counter.trained_matmul_params == 2 * 232
    assert (counter.attention_width, counter.head_params, counter.head_trained) == (8, 800, False)
    assert attention_pairs([3, 1]) == 6 + 1
    # T = 10 tokens, P = 7 pairs, S = 4 supervised:
    expected = 4 * 960 * 10 + 6 * 464 * 10 + 12 * 2 * 8 * 7 + 4 * 800 * 4
    assert counter.step_flops(10, 7, 4) == expected
    full = flop_counter(config, {"params": dict(params)})
    assert (full.frozen_matmul_params, full.trained_matmul_params, full.head_trained) == (0, 960, True)
    assert "N_frozen=960" in counter.formula() and "4*V*E*S" in counter.formula()


def test_matmul_peak_is_a_positive_rate():
    peak = measure_matmul_peak("cpu", size=64, repeats=2)
    assert peak["flops_per_s"] > 0 and peak["best_s"] > 0 and peak["size"] == 64


def test_the_6n_convention_credits_a_lora_step_like_full_fine_tuning():
    config = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    params = init(config, rng.key(0))
    lora = init_lora(params, LoraConfig(r=2), rng.key(1), target_linear=True)
    adapter = sum(e["A"].numel() + e["B"].numel() for e in lora.values())
    lora_step = flop_counter(config, {"params": {}, "lora": lora}).six_n_flops(10, 7, adapter_params=adapter)
    full_step = flop_counter(config, {"params": dict(params)}).six_n_flops(10, 7)
    # 6 (N_matmul 960 + V E 800) T + 12 n_layers d_attn P, whatever is trained
    assert lora_step == full_step == 6 * (960 + 800) * 10 + 12 * 2 * 8 * 7
