"""QLoRA (`adapter: qlora`, `load_in_4bit`), LoRA on an 8-bit base (`load_in_8bit`), their
`bnb_config_kwargs`, and LoftQ (`peft.loftq_config`), set through YAML configs: a run trains, its
adapter reloads in PEFT over transformers' quantised model of the same base, and merge, inference
and evaluate work on it."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("bitsandbytes")

from backends.hf import load_pretrained
from kernels.quantized import QuantizedWeight, dequantize
from programs import common, evaluate, inference, merge_lora
from programs.config import ConfigError, load_config
from programs.sft import run
from pure import rng
from pure.models import forward

REPO = Path(__file__).resolve().parents[2]
ROWS = (REPO / "configs" / "data" / "arithmetic_train.jsonl").read_text().splitlines()[:24]
QLORA = {"adapter": "qlora", "load_in_4bit": True}
INT8 = {"adapter": "lora", "load_in_8bit": True}


@pytest.fixture(scope="module")
def tiny_model(tiny_model_64):
    """Linears of >= 64 inputs: bitsandbytes' CPU path needs whole 4-bit blocks per row."""
    return tiny_model_64


def config_file(folder: Path, tiny_model, name="run", **keys) -> Path:
    (folder / "train.jsonl").write_text("\n".join(ROWS) + "\n")
    raw = {"base_model": str(tiny_model), "datasets": [{"path": str(folder / "train.jsonl"), "type": "chat_template"}],
           "dataset_prepared_path": str(folder / "prepared"), "sequence_len": 128, "lora_r": 4, "lora_alpha": 8,
           "lora_target_linear": True, "micro_batch_size": 2, "max_steps": 3, "learning_rate": 1e-2,
           "optimizer": "adamw_torch", "lr_scheduler": "constant", "logging_steps": 1, "save_strategy": "no",
           "output_dir": str(folder / name), "seed": 5, **keys}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(result) -> list[float]:
    return [r["train/loss"] for r in result["records"] if "train/loss" in r]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("qlora")
    path = config_file(folder, tiny_model, **QLORA)
    return path, run(load_config(path))


def ours_with_adapter(config_path, tokens):
    """Our logits over the config's quantised base with the run's adapter."""
    config = load_config(config_path)
    params, model_config, _, delta, lora_config = common.load_model_with_adapter(config)
    assert any(isinstance(v, QuantizedWeight) for v in params.values()) or not (config.load_in_4bit or config.load_in_8bit)
    return forward(params, tokens, model_config, lora=delta, lora_config=lora_config,
                   **common.quantized_ops(params)).logits


@pytest.mark.parametrize("keys, bnb", [
    (QLORA, {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}),
    (INT8, {"load_in_8bit": True}),
], ids=["qlora-nf4", "lora-int8"])
def test_a_quantised_run_trains_and_its_adapter_reloads_in_peft_over_transformers_quantised_base(
        tmp_path, tiny_model, keys, bnb):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    path = config_file(tmp_path, tiny_model, **keys)
    result = run(load_config(path))
    assert losses(result)[-1] < losses(result)[0]
    out = Path(load_config(path).output_dir)
    delta = common.load_model_with_adapter(load_config(path))[3]
    assert all(entry["B"].abs().sum() > 0 for entry in delta.values())  # the adapter trained

    base = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model, quantization_config=transformers.BitsAndBytesConfig(**bnb), device_map="cpu", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out)
    model.train()  # bitsandbytes' CPU eval path repacks weights for a bf16 kernel; training runs fp32 (no dropout here)
    tokens = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens).logits
    torch.testing.assert_close(ours_with_adapter(path, tokens), reference, rtol=0, atol=1e-3)  # issue bound; ~1e-6 measured


def test_qlora_loss_tracks_lora_on_the_same_steps(tmp_path, tiny_model, qlora_run):
    lora = run(load_config(config_file(tmp_path, tiny_model, "lora", adapter="lora")))
    # NF4 moves each weight by up to ~1e-2 of N(0, 0.02) values: the losses (~10.8) differ by ~1e-3
    # relative (measured 0.00074 at step 2)
    assert losses(qlora_run[1]) == pytest.approx(losses(lora), rel=3e-3)
    assert losses(qlora_run[1]) != losses(lora)  # and they are not the same run


def test_gradient_checkpointing_over_a_quantised_base_gives_the_same_losses(tmp_path, tiny_model, qlora_run):
    remat = run(load_config(config_file(tmp_path, tiny_model, "remat", gradient_checkpointing=True, **QLORA)))
    assert losses(remat) == pytest.approx(losses(qlora_run[1]), rel=1e-6)  # the same products, recomputed


def test_merge_lora_of_a_qlora_run_computes_the_trained_model(qlora_run):
    path, _ = qlora_run
    assert merge_lora.main(["--config", str(path)]) == 0
    merged, model_config, _ = load_pretrained(Path(load_config(path).output_dir) / "merged")
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in merged.values())
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    # dequantised base + s B A merged in fp32, against the quantised forward with the adapter
    torch.testing.assert_close(forward(merged, tokens, model_config).logits, ours_with_adapter(path, tokens),
                               rtol=0, atol=1e-5)


def test_inference_and_evaluate_run_on_a_qlora_run(qlora_run, monkeypatch, capsys):
    path, _ = qlora_run
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 2?"))
    assert inference.main(["--config", str(path), "--max-new-tokens", "4"]) == 0
    first = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 2?"))
    assert inference.main(["--config", str(path), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == first and len(first) > 1  # greedy: the same reply, tokens streamed
    assert evaluate.main(["--config", str(path)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "base quantised: nf4 4-bit" in captured.err
    assert math.isfinite(report["train_loss"]) and report["train_loss"] > 0


def test_bnb_config_kwargs_reach_the_quantisation(tmp_path, tiny_model):
    path = config_file(tmp_path, tiny_model, **QLORA, bnb_config_kwargs={
        "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "bfloat16",
        "llm_int8_skip_modules": ["down_proj"]})
    params, _, _ = common.load_model(load_config(path))
    q = params["model.layers.0.self_attn.q_proj.weight"]
    assert q.kind == "fp4" and not q.state.nested and q.compute_dtype == torch.bfloat16
    assert isinstance(params["model.layers.0.mlp.down_proj.weight"], torch.Tensor)  # skipped: dense
    default, _, _ = common.load_model(load_config(config_file(tmp_path, tiny_model, "default", **QLORA)))
    d = default["model.layers.0.self_attn.q_proj.weight"]
    assert d.kind == "nf4" and d.state.nested and d.compute_dtype is None  # axolotl's qlora defaults
    int8, _, _ = common.load_model(load_config(config_file(tmp_path, tiny_model, "int8", **INT8)))
    assert int8["model.layers.0.mlp.down_proj.weight"].kind == "int8"


def test_the_compute_dtype_sets_the_precision_of_the_quantised_products(tmp_path, tiny_model):
    fp32 = run(load_config(config_file(tmp_path, tiny_model, "fp32", max_steps=1, **QLORA)))
    bf16 = run(load_config(config_file(tmp_path, tiny_model, "bf16", max_steps=1, **QLORA,
                                       bnb_config_kwargs={"bnb_4bit_compute_dtype": "bfloat16"})))
    # bf16 products round to 8 mantissa bits: the loss moves, but only at bf16's 1e-2 relative scale
    assert losses(bf16)[0] != losses(fp32)[0]
    assert losses(bf16)[0] == pytest.approx(losses(fp32)[0], rel=1e-2)


@pytest.mark.parametrize("keys, message", [
    ({"adapter": "qlora"}, "adapter: qlora needs load_in_4bit: true"),
    ({"adapter": None, "load_in_4bit": True}, "load_in_4bit quantises the frozen base, so it needs an adapter"),
    ({"adapter": "qlora", "load_in_4bit": True, "load_in_8bit": True}, "cannot both be true"),
    ({**QLORA, "bnb_config_kwargs": {"bnb_4bit_quant_type": "int4"}}, "bnb_4bit_quant_type: expected 'nf4' or 'fp4'"),
    ({**QLORA, "bnb_config_kwargs": {"bnb_4bit_quant_storage": "bfloat16"}}, "bnb_4bit_quant_storage: bfloat16 is not supported yet"),
    ({**QLORA, "bnb_config_kwargs": {"llm_int8_threshold": 4.0}}, "llm_int8_threshold has no effect"),
    ({**QLORA, "bnb_config_kwargs": {"block_size": 32}}, "bnb_config_kwargs: unknown option 'block_size'"),
    ({**INT8, "bnb_config_kwargs": {"bnb_4bit_quant_type": "fp4"}}, "bnb_config_kwargs sets the 4-bit quantisation"),
    ({**QLORA, "peft": {"loftq_config": {"loftq_bits": 8}}}, "loftq_bits: 8 but the base is loaded in 4 bits"),
    ({"adapter": None, "peft": {"loftq_config": {"loftq_bits": 4}}}, "loftq_config initialises LoRA factors"),
])
def test_bad_quantisation_settings_fail_at_validation_naming_the_key(tmp_path, tiny_model, keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file(tmp_path, tiny_model, **keys))


@pytest.mark.parametrize("keys", [{**QLORA}, {"adapter": "lora"}], ids=["qlora", "lora"])
def test_loftq_starts_the_adapted_model_closer_to_the_full_precision_weights(tmp_path, tiny_model, keys):
    path = config_file(tmp_path, tiny_model, peft={"loftq_config": {"loftq_bits": 4}}, **keys)
    config = load_config(path)
    params, _, _ = common.load_model(config)
    dense, _, _ = common.load_model(config, quantize=False)
    trainable, _, lora_config = common.build_trainable(config, params, rng.key(0))
    for module, entry in trainable["lora"].items():
        name = module + ".weight"
        w, q = dense[name], dequantize(params[name])
        before = torch.linalg.matrix_norm(w - q)
        after = torch.linalg.matrix_norm(w - q - lora_config.scale * entry["B"] @ entry["A"])
        # the best rank-r fit of the residual: the error left is exactly its other singular values
        rest = torch.linalg.svdvals(w - q)[lora_config.r:].square().sum().sqrt()
        assert after < before and after == pytest.approx(rest.item(), rel=1e-4)
    result = run(config)
    assert losses(result)[-1] < losses(result)[0]
