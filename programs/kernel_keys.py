"""axolotl's kernel plugins and kernel keys, served by puretune's own kernels.

axolotl switches fused implementations on with plugins (Liger, Cut Cross Entropy, Kernels) and
keys (`liger_rms_norm`, `cut_cross_entropy`, `lora_mlp_kernel`, ...). The fused kernels of
`kernels/` compute the same functions and run by default, so a key set to true keeps that default
and a key set to false selects the op's plain-torch reference (`kernels.reference_model_ops`).
`served_ops` returns the ops for `pure.train.make_apply` and the one startup line that says which
function serves each requested key; `check_kernel_keys` refuses at validation what cannot be served.
"""
from __future__ import annotations

import functools

from programs.config.schema import ConfigError

LIGER = "axolotl.integrations.liger.LigerPlugin"
CUT_CROSS_ENTROPY = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
KERNELS = "axolotl.integrations.kernels.KernelsPlugin"

# The plugins puretune serves with its own kernels -> what they switch. puretune runs no plugin code.
KERNEL_PLUGINS = {
    LIGER: "the liger_* keys",
    CUT_CROSS_ENTROPY: "cut_cross_entropy, true unless set",
    KERNELS: "use_kernels, true unless set (its MoE keys use_scattermoe / use_sonicmoe are refused)",
}

# key -> the op of `kernels.select_model_ops` it switches (None: a key with no op of its own).
KEY_OPS = {
    "liger_rms_norm": "rms_norm_fn",
    "use_kernels": "rms_norm_fn",  # transformers' hub kernels for Llama-family layers: RMSNorm and rope
    "liger_glu_activation": "swiglu_fn",
    "liger_cross_entropy": "token_logprob_fn",
    "liger_fused_linear_cross_entropy": "token_logprob_fn",
    "cut_cross_entropy": "token_logprob_fn",
    "lora_mlp_kernel": "lora_linear_fn",
    "lora_qkv_kernel": "lora_linear_fn",
    "lora_o_kernel": "lora_linear_fn",
    "fused_attn_kernel": "attention_fn",
    "liger_rope": None,
    "liger_layer_norm": None,
}

LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
_WHAT = {"lora_mlp_kernel": "gate/up/down_proj", "lora_qkv_kernel": "q/k/v_proj", "lora_o_kernel": "o_proj"}
_ROPE = "pure.models.llama.apply_rope in the forward (kernels/ has no fused rope)"


def _short(plugin: str) -> str:
    return plugin.rsplit(".", 1)[-1]


def requested_keys(config) -> dict[str, bool]:
    """The kernel keys this config sets, with the values the plugins imply where a key is unset
    (axolotl's CutCrossEntropyPlugin defaults cut_cross_entropy to true, its KernelsPlugin sets
    use_kernels), in KEY_OPS order."""
    given = {
        "liger_rms_norm": config.liger_rms_norm, "use_kernels": config.use_kernels,
        "liger_glu_activation": config.liger_glu_activation, "liger_cross_entropy": config.liger_cross_entropy,
        "liger_fused_linear_cross_entropy": config.liger_fused_linear_cross_entropy,
        "cut_cross_entropy": config.cut_cross_entropy, "lora_mlp_kernel": config.lora_mlp_kernel,
        "lora_qkv_kernel": config.lora_qkv_kernel, "lora_o_kernel": config.lora_o_kernel,
        "fused_attn_kernel": config.fused_attn_kernel, "liger_rope": config.liger_rope,
        "liger_layer_norm": config.liger_layer_norm,
    }
    plugins = config.plugins or []
    for plugin, key in ((CUT_CROSS_ENTROPY, "cut_cross_entropy"), (KERNELS, "use_kernels")):
        if plugin in plugins and given[key] is None:
            given[key] = True
    return {key: bool(value) for key, value in given.items() if value is not None}


def check_plugins(plugins: list) -> None:
    """Refuse, with one line naming it, a plugin puretune does not serve (before its own keys are
    reported as unknown)."""
    for plugin in plugins:
        if isinstance(plugin, str) and plugin not in KERNEL_PLUGINS:  # other types: the schema's error
            served = ", ".join(_short(p) for p in KERNEL_PLUGINS)
            raise ConfigError(f"plugins: {plugin} is not supported yet by puretune; it runs no plugin code and "
                              f"serves only the kernel plugins {served} (axolotl.integrations.*), with its own kernels")


def check_kernel_keys(config) -> None:
    """Refuse, with one line, kernel keys puretune cannot honour: keys of one op set to different
    values, LoRA kernels without an adapter."""
    check_plugins(config.plugins or [])
    wanted = requested_keys(config)
    by_op: dict[str, dict[str, bool]] = {}
    for key, on in wanted.items():
        if KEY_OPS[key] is not None:
            by_op.setdefault(KEY_OPS[key], {})[key] = on
    for op, keys in by_op.items():
        if len(set(keys.values())) > 1:
            shown = ", ".join(f"{key}: {str(on).lower()}" + ("" if getattr(config, key) is not None else " (from plugins)")
                              for key, on in keys.items())
            why = ("one LoRA linear (kernels.lora_linear) serves every adapted projection"
                   if op == "lora_linear_fn" else f"they switch the same op ({op})")
            raise ConfigError(f"{shown}: {why}; set them alike")
    lora_on = [key for key in LORA_KERNEL_KEYS if wanted.get(key)]
    if lora_on and config.adapter not in ("lora", "qlora"):
        raise ConfigError(f"{lora_on[0]}: true applies to LoRA projections; this config has no adapter "
                          "(set adapter: lora, or drop the key)")


def _name(fn) -> str:
    """`module.function`, with a partial's bound options: `kernels.linear_ce.chunked_token_logprobs(chunk_size=512)`."""
    if isinstance(fn, functools.partial):
        options = ", ".join(f"{k}={v}" for k, v in fn.keywords.items())
        return f"{fn.func.__module__}.{fn.func.__name__}({options})"
    return f"{fn.__module__}.{fn.__name__}"


def _served(key: str, on: bool, ops: dict, references: dict, where: str, compiled: bool) -> str:
    op = KEY_OPS[key]
    if key == "liger_layer_norm":
        return "nothing to serve: Llama-family models have no LayerNorm (their norms are RMSNorm: liger_rms_norm)"
    if key == "liger_rope":
        return f"{'served by' if on else 'false, and still'} {_ROPE}" + (", compiled by Inductor" if compiled else "")
    fn = ops[op] if not compiled else ops.get(op, references[op])
    if compiled:
        text = (f"{'served by' if on else 'false:'} the reference {_name(fn)}, compiled by Inductor "
                "(torch_compile: true runs the plain-torch references through torch.compile, not the eager kernels)")
    elif not on:
        text = f"false: the plain-torch reference {_name(fn)}"
    elif fn is references[op]:
        text = f"served by the reference {_name(fn)} (what kernels/ selects on {where} for this model)"
    else:
        module, _, name = _name(fn).partition(".")[2].partition(".")
        text = f"served by kernels.{module} ({name} on {where})"
    if key in _WHAT:
        text += f" for {_WHAT[key]} and every other LoRA projection"
    if key == "use_kernels":
        text = f"RMSNorm {text}; the rotary embedding {_ROPE}"
    return text


def served_ops(config, device, dtype, sliding_window: int | None = None, quantized: bool = False
               ) -> tuple[dict, str | None]:
    """(ops for `pure.train.make_apply`, the startup line naming what serves each requested plugin
    and kernel key, or None when the config requests none). Keys set to false get the reference of
    their op; under torch_compile: true every op is the reference (Inductor compiles the forward).
    A quantised base's layers always take its own linear ops (`kernels.quantized_model_ops`): its
    weights are not tensors."""
    from kernels import quantized_model_ops, reference_model_ops, select_model_ops

    wanted = requested_keys(config)
    reference = {KEY_OPS[key] for key, on in wanted.items() if not on and KEY_OPS[key] is not None}
    compiled = config.torch_compile is True
    # Under torch_compile the plain-torch references are traced and fused by Inductor; the eager
    # kernels' host-side checks (data-dependent sizes) stall the compiler instead.
    ops = ({} if not quantized else quantized_model_ops()) if compiled else \
        select_model_ops(device, dtype, sliding_window, reference, quantized=quantized)
    plugins = config.plugins or []
    if not wanted and not plugins:
        return ops, None
    where = f"{device} {str(dtype).removeprefix('torch.')}"
    parts = [f"plugins {', '.join(_short(p) for p in plugins)}: served by puretune's kernels through their keys"
             ] if plugins else []
    parts += [f"{key}: {_served(key, on, ops, reference_model_ops(), where, compiled)}" for key, on in wanted.items()]
    if plugins and not wanted:
        parts.append("no kernel key is set, so the default kernels run")
    return ops, "kernel keys: " + "; ".join(parts)
