"""The benchmark harness on a tiny random Llama with the real SmolLM2 tokenizer: the FLOP formula on a
known shape, the hf-packed rows equal our packed batches and give our loss, and a short run emits
every report field."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from backends.flops import attention_pairs, flop_counter, measure_matmul_peak
from programs import bench, common
from programs.config import load_config
from pure import rng
from pure.lora import LoraConfig, init_lora
from pure.models import ModelConfig, init

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"


@pytest.fixture(scope="module")
def bench_config(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    rows = (DATA / "conversions_alpaca.jsonl").read_text().splitlines()[:40]
    (tmp / "train.jsonl").write_text("\n".join(rows) + "\n")
    raw = yaml.safe_load((REPO / "configs" / "bench-sft-lora-smollm2.yaml").read_text())
    raw.update({"base_model": str(tiny_model), "datasets": [{"path": str(tmp / "train.jsonl"), "type": "alpaca"}],
                "dataset_prepared_path": str(tmp / "prepared"), "output_dir": str(tmp / "out"),
                "micro_batch_size": 2, "lora_r": 4, "lora_alpha": 8})
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


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


def test_hf_packed_rows_are_our_packed_batches_and_give_our_loss(bench_config, tiny_model):
    """transformers honours packed position_ids with sdpa: the same packed batch, the same loss."""
    from pure.losses import sft
    from pure.train import make_apply

    params, model_config, tokenizer = common.load_model(bench_config)
    examples = bench.load_train_examples(bench_config, tokenizer)
    batches = bench.plan_micro_batches(examples, bench_config, common.pad_id(tokenizer), 2)
    assert all(b["input_ids"].shape == (2, 512) for b in batches)
    rows = bench.hf_packed_rows(batches, common.pad_id(tokenizer))
    hf_batch = bench.collate_packed_rows(rows[:2])
    ours = batches[0]
    assert torch.equal(hf_batch["input_ids"], ours["input_ids"])
    assert torch.equal(hf_batch["labels"], ours["labels"])
    assert torch.equal(hf_batch["position_ids"], ours["positions"])
    assert hf_batch["bench_counts"]["tokens"] == ours["num_tokens"]
    assert hf_batch["bench_counts"]["supervised"] == ours["num_trained"]

    model = bench.load_hf_model(bench_config, tokenizer, torch.device("cpu"))  # LoRA B = 0: the base model
    with torch.no_grad():
        theirs = model(input_ids=hf_batch["input_ids"], labels=hf_batch["labels"],
                       position_ids=hf_batch["position_ids"]).loss
        mine, _ = sft.on_batch(make_apply(model_config, params)({}), common.tensors_only(ours))
        # Without segment-aware attention (one causal row) the loss must differ: the check can fail.
        one_row = {"input_ids": ours["input_ids"], "labels": ours["labels"], "positions": ours["positions"]}
        unpacked, _ = sft.on_batch(make_apply(model_config, params)({}), one_row)
    assert abs(theirs.item() - mine.item()) <= 1e-5  # fp32, same math, different kernels' op order
    assert abs(unpacked.item() - mine.item()) > 1e-4


def test_bench_runs_ours_and_the_hf_baseline_and_reports_every_field(bench_config):
    report = bench.run_bench(bench_config, None, steps=2, baseline_steps=1, warmup=0, baseline="hf", repeats=1,
                             isolate=False, peak_size=256, log=lambda line: None)
    assert set(report["variants"]) == {"ours", "hf-padded", "hf-packed"}
    fields = {"trained_tokens_per_s", "supervised_tokens_per_s", "step_time_median_s", "step_time_iqr_s",
              "peak_memory_mb", "slot_efficiency", "flops_per_s", "fraction_of_peak", "ours_over_this_tokens_per_s",
              "ours_over_this_peak_memory", "first_step_loss"}
    for name, r in report["variants"].items():
        assert fields <= set(r), name
        assert r["measured_steps"] == (2 if name == "ours" else 1), name
        assert r["trained_tokens_per_s"] > 0 and r["supervised_tokens_per_s"] > 0 and r["fraction_of_peak"] > 0, name
    ours, padded, packed = (report["variants"][v] for v in ("ours", "hf-padded", "hf-packed"))
    assert ours["ours_over_this_tokens_per_s"] == 1.0
    # The same packed batches: the same tokens, loss terms and (B = 0 at step 1) first loss.
    first = ours["runs"][0]["steps"][0]
    assert (first["tokens"], first["supervised"]) == (packed["total_tokens"], packed["total_supervised"])
    assert abs(ours["first_step_loss"] - packed["first_step_loss"]) <= 1e-5  # fp32, op order only
    assert padded["slot_efficiency"] < 1.0 and ours["slot_efficiency"] > padded["slot_efficiency"]
    assert 0 < report["packing_efficiency"] <= 1 and report["flop_formula"].startswith("F = ")
    json.dumps(report, default=str)
    table = bench.markdown_table(report)
    assert table.count("\n| ") >= 3 and "hf-padded" in table and "packing efficiency" in table
