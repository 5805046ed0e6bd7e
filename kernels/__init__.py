"""Fast fused versions of hot pure/ ops, each with a plain-torch reference and a dispatcher.

This package is puretune's, not the Hugging Face `kernels` hub package: it defines no
`__version__`, so transformers' probe (`is_kernels_available`) never takes it for that one.
"""


def select_model_ops(device, dtype, sliding_window: int | None = None) -> dict:
    """The fastest available version of every hot op, by the keyword names `pure.train.make_apply`
    takes them under: attention, RMSNorm, SwiGLU, LoRA linear and the linear + cross-entropy head."""
    from kernels.attention import select_attention
    from kernels.linear_ce import select_token_logprob_fn
    from kernels.lora_linear import select_lora_linear
    from kernels.rmsnorm import select_rms_norm
    from kernels.swiglu import select_swiglu

    return {
        "attention_fn": select_attention(device, dtype, sliding_window),
        "rms_norm_fn": select_rms_norm(device, dtype),
        "swiglu_fn": select_swiglu(device, dtype),
        "lora_linear_fn": select_lora_linear(device, dtype),
        "token_logprob_fn": select_token_logprob_fn(device, dtype),
    }
