"""Fast fused versions of hot pure/ ops, each with a plain-torch reference and a dispatcher.

This package is puretune's, not the Hugging Face `kernels` hub package: it defines no
`__version__`, so transformers' probe (`is_kernels_available`) never takes it for that one.
"""
from __future__ import annotations

from typing import Collection

# The keyword names `pure.train.make_apply` takes the hot ops under.
MODEL_OPS = ("attention_fn", "rms_norm_fn", "swiglu_fn", "lora_linear_fn", "token_logprob_fn")


def reference_model_ops() -> dict:
    """The plain-torch reference of every hot op, by the names of `select_model_ops`."""
    from pure.linear_ce import reference_token_logprobs
    from pure.lora import lora_linear
    from pure.models.llama import rms_norm, sdpa_attention, swiglu

    return {"attention_fn": sdpa_attention, "rms_norm_fn": rms_norm, "swiglu_fn": swiglu,
            "lora_linear_fn": lora_linear, "token_logprob_fn": reference_token_logprobs}


def select_model_ops(device, dtype, sliding_window: int | None = None, reference: Collection[str] = (),
                     quantized: bool = False) -> dict:
    """The fastest available version of every hot op, by the keyword names `pure.train.make_apply`
    takes them under: attention, RMSNorm, SwiGLU, LoRA linear and the linear + cross-entropy head.
    The ops named in `reference` get their plain-torch reference instead (`reference_model_ops`).

    quantized: the base's linear weights are `kernels.quantized.QuantizedWeight`s. Their plain layers
    then take `quantized_linear` (bitsandbytes dequantises the weight); the LoRA linear is the same
    selected one (its Function dequantises a quantised weight in the forward and the backward), or
    `quantized_lora_linear` when `reference` names it; attention, RMSNorm, SwiGLU and the head keep
    their kernels."""
    from kernels.attention import select_attention
    from kernels.linear_ce import select_token_logprob_fn
    from kernels.lora_linear import select_lora_linear
    from kernels.rmsnorm import select_rms_norm
    from kernels.swiglu import select_swiglu

    unknown = set(reference) - set(MODEL_OPS)
    if unknown:
        raise ValueError(f"reference: unknown ops {sorted(unknown)}; the ops are {', '.join(MODEL_OPS)}")
    ops = {
        "attention_fn": select_attention(device, dtype, sliding_window),
        "rms_norm_fn": select_rms_norm(device, dtype),
        "swiglu_fn": select_swiglu(device, dtype),
        "lora_linear_fn": select_lora_linear(device, dtype),
        "token_logprob_fn": select_token_logprob_fn(device, dtype),
    }
    references = reference_model_ops()
    ops = {name: references[name] if name in reference else fn for name, fn in ops.items()}
    if quantized:
        from kernels.lora_linear import lora_linear_function, lora_linear_triton

        quantized_ops = quantized_model_ops()
        ops["linear_fn"] = quantized_ops["linear_fn"]
        if ops["lora_linear_fn"] not in (lora_linear_function, lora_linear_triton):  # those take a quantised weight
            ops["lora_linear_fn"] = quantized_ops["lora_linear_fn"]
    return ops


def quantized_model_ops() -> dict:
    """The linear ops of a quantised base (`kernels.quantized`), by the names of `select_model_ops`."""
    from kernels.quantized import quantized_linear, quantized_lora_linear

    return {"linear_fn": quantized_linear, "lora_linear_fn": quantized_lora_linear}
