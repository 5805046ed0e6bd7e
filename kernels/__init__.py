"""Fast fused versions of hot pure/ ops, each with a plain-torch reference and a dispatcher.

This package is puretune's, not the Hugging Face `kernels` hub package: it defines no
`__version__`, so transformers' probe (`is_kernels_available`) never takes it for that one.
"""


def select_model_ops(device, dtype, sliding_window: int | None = None, quantized: bool = False) -> dict:
    """The fastest available version of every hot op, by the keyword names `pure.train.make_apply`
    takes them under: attention, RMSNorm, SwiGLU, LoRA linear and the linear + cross-entropy head.

    quantized: the base's linear weights are `kernels.quantized.QuantizedWeight`s. Their layers then
    take `quantized_linear` / `quantized_lora_linear` (bitsandbytes dequantises the weight, the LoRA
    path is the reference's), not the fused LoRA matmul, which needs a dense weight; attention,
    RMSNorm, SwiGLU and the head keep their fused kernels."""
    from kernels.attention import select_attention
    from kernels.linear_ce import select_token_logprob_fn
    from kernels.lora_linear import select_lora_linear
    from kernels.rmsnorm import select_rms_norm
    from kernels.swiglu import select_swiglu

    if quantized:
        from kernels.quantized import quantized_linear, quantized_lora_linear

        lora_linear_fn, linear_fn = quantized_lora_linear, quantized_linear
    else:
        lora_linear_fn, linear_fn = select_lora_linear(device, dtype), None
    ops = {
        "attention_fn": select_attention(device, dtype, sliding_window),
        "rms_norm_fn": select_rms_norm(device, dtype),
        "swiglu_fn": select_swiglu(device, dtype),
        "lora_linear_fn": lora_linear_fn,
        "token_logprob_fn": select_token_logprob_fn(device, dtype),
    }
    if linear_fn is not None:
        ops["linear_fn"] = linear_fn
    return ops
