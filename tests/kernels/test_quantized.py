"""kernels/quantized.py: frozen bases in bitsandbytes' formats (QLoRA NF4/FP4, LLM.int8's int8 rows).

The forward over a quantised base must equal the reference forward over the dequantised weights,
match transformers + BitsAndBytesConfig + PEFT on the same base, and give the LoRA factors the
gradient the dequantised reference gives, under `torch.func.grad` and remat."""
import pytest
import torch

pytest.importorskip("bitsandbytes")

from kernels import select_model_ops
from kernels.quantized import (
    QuantizationSpec,
    QuantizedWeight,
    dequantize,
    dequantize_params,
    is_quantized,
    params_nbytes,
    quantize_params,
    quantized_linear,
    quantized_lora_linear,
)
from pure import rng
from pure.lora import LoraConfig, init_lora
from pure.models import llama
from pure.models.config import ModelConfig

# in_features >= 64: one 4-bit block per row at least (transformers' CPU path needs it)
CONFIG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
SPECS = {"nf4": QuantizationSpec(4), "fp4-double": QuantizationSpec(4, "fp4", double_quant=True),
         "int8": QuantizationSpec(8)}
QUANTISED_OPS = dict(linear_fn=quantized_linear, lora_linear_fn=quantized_lora_linear)


def model_and_delta(use_dora=False):
    params = llama.init(CONFIG, rng.key(0))
    lora_config = LoraConfig(r=4, alpha=8, use_dora=use_dora)
    delta = init_lora(params, lora_config, rng.key(1), target_linear=True)
    # B = 0 at init would hide the low-rank path; give it values
    delta = {k: {**v, "B": rng.normal(rng.fold_in(rng.key(2), i), v["B"].shape, std=0.1)}
             for i, (k, v) in enumerate(delta.items())}
    return params, lora_config, delta


@pytest.mark.parametrize("kind", list(SPECS))
def test_only_the_decoder_linears_are_quantised(kind):
    params = llama.init(CONFIG, rng.key(0))
    quantised = quantize_params(params, SPECS[kind])
    kinds = {name: type(v).__name__ for name, v in quantised.items()}
    assert all(kinds[n] == "QuantizedWeight" for n in params if n.endswith("_proj.weight"))
    assert all(kinds[n] == "Tensor" for n in params if not n.endswith("_proj.weight"))  # norms, embed, lm_head
    # kept tensors are copies: no view into the loaded (memory-mapped) checkpoint keeps it resident
    assert all(torch.equal(quantised[n], params[n]) and quantised[n].data_ptr() != params[n].data_ptr()
               for n in params if kinds[n] == "Tensor")
    # the dequantised weight is close to the original: int8 within one step (row absmax / 127) of
    # it; the 16 NF4/FP4 levels of N(0, 0.02) weights within 2e-2
    w = params["model.layers.0.mlp.up_proj.weight"]
    err = (dequantize(quantised["model.layers.0.mlp.up_proj.weight"]) - w).abs().max().item()
    assert err < (w.abs().max().item() / 127 if kind == "int8" else 2e-2)


def test_quantised_weights_take_a_fraction_of_the_memory():
    params = {f"model.layers.0.mlp.{n}.weight": torch.randn(256, 512) for n in ("up_proj", "down_proj")}
    fp32 = params_nbytes(params)
    # NF4: half a byte per weight + one fp32 absmax per 64 (1/16 byte): 0.1406x of fp32's 4 bytes;
    # double quantisation stores the absmaxes in 8 bits (0.127x) plus a 1 KiB code book per weight
    # (0.004x at this size); int8: 1 byte + a row absmax: 0.25x
    assert params_nbytes(quantize_params(params, QuantizationSpec(4))) / fp32 == pytest.approx(0.1406, abs=1e-3)
    assert params_nbytes(quantize_params(params, QuantizationSpec(4, double_quant=True))) / fp32 == \
        pytest.approx(0.131, abs=1e-3)
    assert params_nbytes(quantize_params(params, QuantizationSpec(8))) / fp32 == pytest.approx(0.25, abs=2e-3)


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("use_dora", [False, True])
def test_forward_equals_the_reference_on_the_dequantised_weights(kind, use_dora):
    params, lora_config, delta = model_and_delta(use_dora)
    quantised = quantize_params(params, SPECS[kind])
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = llama.forward(quantised, tokens, CONFIG, lora=delta, lora_config=lora_config, **QUANTISED_OPS).logits
    reference = llama.forward(dequantize_params(quantised), tokens, CONFIG, lora=delta, lora_config=lora_config).logits
    # the same dequantised weights in the same fp32 products; 1e-5 allows a different GEMM blocking
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("checkpoint_layers", [False, True])
def test_lora_gradients_through_the_quantised_base_equal_the_dequantised_reference(kind, checkpoint_layers):
    params, lora_config, delta = model_and_delta()
    quantised = quantize_params(params, SPECS[kind])
    dense = dequantize_params(quantised)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))

    def loss(lora, base, ops):
        out = llama.forward(base, tokens, CONFIG, lora=lora, lora_config=lora_config,
                            checkpoint_layers=checkpoint_layers, **ops)
        return torch.log_softmax(out.logits, -1)[..., 0].mean()

    ours = torch.func.grad(loss)(delta, quantised, QUANTISED_OPS)
    reference = torch.func.grad(loss)(delta, dense, {})
    for path in delta:
        for name in ("A", "B"):
            # fp32 parity: same products, only the order of accumulation may differ
            torch.testing.assert_close(ours[path][name], reference[path][name], rtol=1e-4, atol=1e-6)
    assert any(ours[p]["A"].abs().sum() > 0 for p in ours)  # the gradient is not trivially zero


def test_the_dispatcher_routes_a_quantised_base_to_its_linear():
    from kernels.lora_linear import lora_linear_function

    ops = select_model_ops("cpu", torch.float32, quantized=True)
    # the fused LoRA Function (measured fastest on CPU) takes the quantised weight; plain layers bnb's
    assert ops["linear_fn"] is quantized_linear and ops["lora_linear_fn"] is lora_linear_function
    assert select_model_ops("cpu", torch.float32, reference=["lora_linear_fn"], quantized=True)[
        "lora_linear_fn"] is quantized_lora_linear
    assert "linear_fn" not in select_model_ops("cpu", torch.float32)
    assert is_quantized(quantize_params(llama.init(CONFIG, rng.key(0)), SPECS["nf4"]))


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_fused_lora_function_over_a_quantised_base_equals_the_reference(kind, dropout):
    """`kernels.lora_linear`'s Function on a QuantizedWeight: the same output and gradients as the
    reference (bnb linear + the pure LoRA path), with only the quantised weight kept."""
    from kernels.lora_linear import lora_linear_function

    weight = rng.normal(rng.key(3), (128, 64), std=0.02)
    q = quantize_params({"m.up_proj.weight": weight}, SPECS[kind])["m.up_proj.weight"]
    config = LoraConfig(r=4, alpha=8, dropout=dropout)
    entry = {"A": rng.normal(rng.key(4), (4, 64), std=0.1), "B": rng.normal(rng.key(5), (128, 4), std=0.1)}
    x = rng.normal(rng.key(6), (2, 5, 64))
    key = rng.key(7) if dropout else None

    def run(fn):
        def loss(e, x):
            return fn(x, q, None, e, config, key).square().sum()
        return torch.func.grad_and_value(loss, argnums=(0, 1))(entry, x)

    (g_ours, dx_ours), y_ours = run(lora_linear_function)
    (g_ref, dx_ref), y_ref = run(quantized_lora_linear)
    # fp32: the same products in another association (addmm folds the low-rank term)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_ours, dx_ref, rtol=1e-5, atol=1e-6)
    for name in ("A", "B"):
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-5, atol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear_function(x.requires_grad_(), q, None, entry, config, key)
    assert not any(t.shape == weight.shape for t in saved)


def test_the_backward_keeps_only_the_quantised_weight():
    """The autograd graph of a quantised layer holds the 4-bit codes, not a dense copy of the weight."""
    weight = torch.randn(128, 64)
    q = quantize_params({"m.q_proj.weight": weight}, SPECS["nf4"])["m.q_proj.weight"]
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = quantized_linear(x, q)
    y.sum().backward()
    assert not any(t.shape == weight.shape for t in saved)
    torch.testing.assert_close(x.grad, torch.ones(3, 128) @ dequantize(q), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, spec", [
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, QuantizationSpec(4)),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
     QuantizationSpec(4, "fp4", double_quant=True)),
    ({"load_in_8bit": True}, QuantizationSpec(8)),
])
def test_matches_transformers_bitsandbytes_and_peft_on_the_same_base(tmp_path, kwargs, spec):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from backends import hf

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    model.save_pretrained(tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.BitsAndBytesConfig(**kwargs), device_map="cpu", dtype=torch.float32)
    lora = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False))
    # train mode: bitsandbytes' CPU inference path repacks the weights for a bf16 kernel; the
    # training path (what QLoRA runs) multiplies in fp32 (no dropout in this model)
    lora.train()
    params, config = hf.load_params(tmp_path), hf.load_config(tmp_path)
    quantised = quantize_params(params, spec)
    hf_weight = hf_model.model.layers[0].self_attn.q_proj.base_layer.weight
    ours_weight = quantised["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(hf_weight.data.view(ours_weight.data.dtype).reshape(ours_weight.data.shape), ours_weight.data)

    state = lora.state_dict()
    delta = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
            delta.setdefault(module, {})["A" if ".lora_A." in name else "B"] = tensor.detach().float()
    tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = lora(tokens).logits
    ours = llama.forward(quantised, tokens, config, lora=delta, lora_config=LoraConfig(r=4, alpha=8),
                         **QUANTISED_OPS).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-3)  # the bound; measured ~1e-7


def test_quantized_weight_is_a_leaf_of_the_params_tree():
    from pure.tree import tree_leaves

    q = quantize_params({"m.up_proj.weight": torch.randn(64, 64)}, SPECS["nf4"])
    leaves = tree_leaves(q)
    assert len(leaves) == 1 and isinstance(leaves[0], QuantizedWeight)
