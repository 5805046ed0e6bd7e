"""What the schema accepts but puretune does not run: refused by name, or ignored on purpose.

Every key of the schema is exactly one of: read by the code that implements it; refused before
anything loads when set to a value puretune cannot honour (`NOT_SUPPORTED_YET`); or listed in
`IGNORED_KEYS` with the reason it has no effect here. `tests/programs/config/test_accounting.py`
walks the schema and fails for a key that is none of these.
"""
from __future__ import annotations

from typing import Any, Callable

from programs.config.schema import SUPPORTED_OPTIMIZERS


def _truthy(value: Any) -> bool:
    return bool(value)


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value in values


def _not_in(allowed: tuple) -> Callable[[Any], bool]:
    return lambda value: value is not None and value not in allowed


def _above_one(value: Any) -> bool:
    return value is not None and value > 1


# key -> (is this value unsupported?, hint)
NOT_SUPPORTED_YET: dict[str, tuple[Callable[[Any], bool], str]] = {
    "load_in_8bit": (_truthy, "bitsandbytes quantisation; use adapter: lora on the full-precision model"),
    "load_in_4bit": (_truthy, "bitsandbytes quantisation; use adapter: lora on the full-precision model"),
    "adapter": (_one_of("qlora", "llama-adapter"), "use adapter: lora"),
    "gptq": (_truthy, ""),
    "bnb_config_kwargs": (_truthy, ""),
    "qlora_sharded_model_loading": (_truthy, ""),
    "peft_layer_replication": (_truthy, ""),
    "peft": (lambda v: bool(v.get("loftq_config")), "LoftQ initialisation"),
    "lora_target_parameters": (_truthy, ""),
    "relora": (_truthy, ""),
    "jagged_restart_steps": (_truthy, ""),
    "lisa_n_layers": (_truthy, ""),
    "model_quantization_config": (_truthy, ""),
    "quantize_moe_experts": (_truthy, ""),
    "llama4_linearized_experts": (_truthy, ""),
    "use_kernels": (_truthy, ""),
    "processor_type": (_truthy, "multimodal models"),
    "image_size": (_truthy, "multimodal models"),
    "tokenizer_use_mistral_common": (_truthy, ""),
    "trainer_cls": (_truthy, "custom HF trainer classes; puretune has no HF Trainer"),
    "plugins": (_truthy, ""),
    "deepspeed": (_truthy, ""),
    "deepcompile": (_truthy, ""),
    "fsdp": (_truthy, ""),
    "fsdp_config": (_truthy, ""),
    "fsdp_version": (_truthy, ""),
    "dp_shard_size": (_above_one, ""),
    "dp_replicate_size": (_above_one, ""),
    "sequence_parallel_degree": (_above_one, ""),
    "context_parallel_size": (_above_one, ""),
    "tensor_parallel_size": (_above_one, ""),
    "use_ray": (_truthy, ""),
    "auto_find_batch_size": (_truthy, ""),
    "optimizer": (_not_in(SUPPORTED_OPTIMIZERS), f"supported: {', '.join(SUPPORTED_OPTIMIZERS)}"),
    "fp8": (_truthy, ""),
    "fp8_enable_fsdp_float8_all_gather": (_truthy, ""),
    "xformers_attention": (_truthy, "use sdp_attention or flash_attention"),
    "sage_attention": (_truthy, "use sdp_attention or flash_attention"),
    "s2_attention": (_truthy, "use sdp_attention or flash_attention"),
    "flash_attn_cross_entropy": (_truthy, ""),
    "flash_attn_rms_norm": (_truthy, ""),
    "flash_attn_fuse_mlp": (_truthy, ""),
    "flash_optimum": (_truthy, ""),
    "fused_attn_kernel": (_truthy, ""),
    "scaling_softmax": (_truthy, ""),
    "lora_mlp_kernel": (_truthy, ""),
    "lora_qkv_kernel": (_truthy, ""),
    "lora_o_kernel": (_truthy, ""),
    "lora_embedding_kernel": (_truthy, ""),
    "unsloth_cross_entropy_loss": (_truthy, ""),
    "unsloth_lora_mlp": (_truthy, ""),
    "unsloth_lora_qkv": (_truthy, ""),
    "unsloth_lora_o": (_truthy, ""),
    "unsloth_rms_norm": (_truthy, ""),
    "unsloth_rope": (_truthy, ""),
    "liger_rope": (_truthy, ""),
    "liger_rms_norm": (_truthy, ""),
    "liger_glu_activation": (_truthy, ""),
    "liger_layer_norm": (_truthy, ""),
    "liger_cross_entropy": (_truthy, ""),
    "liger_fused_linear_cross_entropy": (_truthy, ""),
    "cut_cross_entropy": (_truthy, ""),
    "dpo_use_liger_kernel": (_truthy, ""),
    "tiled_mlp": (_truthy, ""),
    "gradient_checkpointing": (_one_of("offload", "offload_disk"), "use gradient_checkpointing: true"),
    "activation_offloading": (_truthy, ""),
    "layer_offloading": (_truthy, ""),
    "use_pose": (_truthy, ""),
    "push_dataset_to_hub": (_truthy, ""),
    "hub_model_id": (_truthy, "pushing to the Hub"),
    "do_causal_lm_eval": (_truthy, ""),
    "do_bench_eval": (_truthy, ""),
    "use_comet": (_truthy, ""),
    "use_trackio": (_truthy, ""),
    "use_otel_metrics": (_truthy, ""),
    "qat": (_truthy, ""),
    "quantization": (_truthy, ""),
}

# Keys axolotl still reads under an old name: old -> new.
LEGACY_ALIASES = {
    "dpo_beta": "rl_beta",
    "evaluation_strategy": "eval_strategy",
    "noisy_embedding_alpha": "neftune_noise_alpha",
    "dataset_processes": "dataset_num_proc",
}

PREFERENCE_RL = ("dpo", "ipo", "kto", "orpo", "simpo")

