"""What the schema accepts but puretune does not run: refused by name, or ignored on purpose.

Every key of the schema is exactly one of: read by the code that implements it; refused before
anything loads when set to a value puretune cannot honour (`NOT_SUPPORTED_YET`); or listed in
`IGNORED_KEYS` with the reason it has no effect here. `tests/programs/config/test_accounting.py`
walks the schema and fails for a key that is none of these.
"""
from __future__ import annotations

from typing import Any, Callable

from programs.config.schema import LR_SCHEDULERS, SUPPORTED_OPTIMIZERS, SUPPORTED_SCHEDULERS

# The test of a NOT_SUPPORTED_YET entry that refuses any value but the schema's default.
GIVEN = "given"


def _truthy(value: Any) -> bool:
    return bool(value)


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value in values


def _not_in(allowed: tuple) -> Callable[[Any], bool]:
    return lambda value: value is not None and value not in allowed


def _above_one(value: Any) -> bool:
    return value is not None and value > 1


# key -> (is this value unsupported?, hint). The test `GIVEN`: any value but the schema's default, for
# a key that only means something to a feature puretune has not built. A dotted key (`trl.use_vllm`)
# names a key inside a block.
NOT_SUPPORTED_YET: dict[str, tuple[Callable[[Any], bool], str]] = {
    "adapter": (_one_of("llama-adapter"), "use adapter: lora"),
    "gptq": (_truthy, ""),
    "qlora_sharded_model_loading": (_truthy, ""),
    "peft_layer_replication": (_truthy, ""),
    "lora_target_parameters": (_truthy, ""),
    "relora": (_truthy, ""),
    "jagged_restart_steps": (_truthy, ""),
    "lisa_n_layers": (_truthy, ""),
    "model_quantization_config": (_truthy, ""),
    "quantize_moe_experts": (_truthy, ""),
    "llama4_linearized_experts": (_truthy, ""),
    # the KernelsPlugin's MoE expert kernels (its use_kernels is served: programs/kernel_keys.py)
    "use_scattermoe": (_truthy, "MoE expert kernels; puretune's models (Llama family) have no MoE layers"),
    "use_sonicmoe": (_truthy, "MoE expert kernels; puretune's models (Llama family) have no MoE layers"),
    "processor_type": (_truthy, "multimodal models"),
    "image_size": (_truthy, "multimodal models"),
    "tokenizer_use_mistral_common": (_truthy, ""),
    "trainer_cls": (_truthy, "custom HF trainer classes; puretune has no HF Trainer"),
    # distributed: deepspeed, fsdp, fsdp_config, fsdp_version, dp_*_size and ddp_timeout are read by
    # programs.config.derived.sharding_plan (context_parallel_size too: packed SFT under torchrun, programs.launch);
    # tensor parallelism is not built (issue 17)
    "deepcompile": (_truthy, ""),
    "sequence_parallel_degree": (_above_one, ""),
    "use_ray": (_truthy, ""),
    "auto_find_batch_size": (_truthy, ""),
    "optimizer": (_not_in(SUPPORTED_OPTIMIZERS), f"supported: {', '.join(SUPPORTED_OPTIMIZERS)}"),
    "lr_scheduler": (lambda v: v in LR_SCHEDULERS and v not in SUPPORTED_SCHEDULERS, f"supported: {', '.join(SUPPORTED_SCHEDULERS)}"),
    "fp8": (_truthy, ""),
    "fp8_enable_fsdp_float8_all_gather": (_truthy, ""),
    "xformers_attention": (_truthy, "use sdp_attention or flash_attention"),
    "sage_attention": (_truthy, "use sdp_attention or flash_attention"),
    "s2_attention": (_truthy, "use sdp_attention or flash_attention"),
    "flash_attn_cross_entropy": (_truthy, ""),
    "flash_attn_rms_norm": (_truthy, ""),
    "flash_attn_fuse_mlp": (_truthy, ""),
    "flash_optimum": (_truthy, ""),
    "scaling_softmax": (_truthy, ""),
    "lora_embedding_kernel": (_truthy, "puretune puts LoRA on linear layers only, never on embed_tokens "
                                       "(train the embeddings whole with lora_modules_to_save: [embed_tokens])"),
    "unsloth_cross_entropy_loss": (_truthy, ""),
    "unsloth_lora_mlp": (_truthy, ""),
    "unsloth_lora_qkv": (_truthy, ""),
    "unsloth_lora_o": (_truthy, ""),
    "unsloth_rms_norm": (_truthy, ""),
    "unsloth_rope": (_truthy, ""),
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
    # online RL: EBFT (issue 18)
    "rl": (_one_of("ebft"), "supported: dpo, ipo, simpo, orpo, kto, grpo, gdpo (and reward_model, process_reward_model)"),
    # the vllm: block is read by programs.vllm_serve; these of its keys are not
    "vllm.device": (GIVEN, "the server takes the machine's device"),
    "vllm.enable_reasoning": (_truthy, "reasoning parsers"),
    "vllm.reasoning_parser": (GIVEN, "reasoning parsers"),
    "vllm.serve_module": (GIVEN, "programs.vllm_serve starts vLLM's OpenAI server itself"),
    "vllm.worker_extension_cls": (GIVEN, "TRL's NCCL weight-sync worker; puretune syncs over HTTP"),
    "ebft": (GIVEN, "rl: ebft"),
    "trl.replay_recompute_logps": (_one_of(False), "stale old log-probs for replayed groups: puretune takes every "
                                                   "group's old log-probs under the policy that trains on it"),
    "trl.vllm_guided_decoding_regex": (GIVEN, "guided (regex-constrained) decoding"),
    "trl.vllm_enable_sleep_mode": (_truthy, "vLLM's sleep mode (it frees GPU memory between generations; "
                                            "the CPU build accepts it and does nothing)"),
    "trl.use_liger_loss": (_truthy, "puretune's GRPO loss runs its own lm_head path"),
    "dpo_generate_during_eval": (_truthy, ""),
    "dpo_norm_loss": (_truthy, "length-normalised DPO log-probabilities"),
    # model loading
    **{key: (GIVEN, "models load from a local HF folder, the local Hub cache or the embedded short name") for key in (
        "base_model_config", "cls_model_config", "revision_of_model", "device_map", "max_memory",
        "gpu_memory_limit", "device", "experts_implementation")},
    "trust_remote_code": (_truthy, "puretune runs its own model code (pure/models), never a checkpoint's"),
    "tokenizer_legacy": (GIVEN, "the tokenizer's own legacy setting is used"),
    "tokenizer_save_jinja_files": (GIVEN, "the chat template is saved as the tokenizer saves it"),
    "shrink_embeddings": (_truthy, ""),
    "embeddings_skip_upcast": (_truthy, ""),
    "fix_untrained_tokens": (GIVEN, ""),
    "reinit_weights": (_truthy, ""),
    "overrides_of_model_config": (GIVEN, ""),
    "overrides_of_model_kwargs": (GIVEN, ""),
    "rope_scaling": (GIVEN, "the rope scaling comes from the model's config.json"),
    "model_quantization_config_kwargs": (GIVEN, "quantised models"),
    # adapters
    "lora_fan_in_fan_out": (_truthy, "Llama-family linears are never transposed (GPT-2 Conv1D layouts are)"),
    "peft_layers_to_transform": (GIVEN, "use lora_target_modules"),
    "peft_layers_pattern": (GIVEN, "use lora_target_modules"),
    "peft_init_lora_weights": (_not_in((True,)), "LoRA starts as PEFT's default (Kaiming-uniform A, zero B)"),
    "peft_trainable_token_indices": (GIVEN, ""),
    "peft_ensure_weight_tying": (GIVEN, ""),
    "peft_autocast_adapter_dtype": (_one_of(False), "the adapter trains in float32"),
    "lora_on_cpu": (_truthy, ""),
    "merge_lora": (_truthy, "merge with python -m programs.merge_lora --config x.yaml"),
    **{key: (GIVEN, "ReLoRA / jagged restarts / LISA") for key in (
        "relora_prune_ratio", "relora_cpu_offload", "jagged_restart_warmup_steps", "jagged_restart_anneal_steps",
        "lisa_step_interval", "lisa_layers_attribute")},
    # data and packing
    "num_dataset_shards_to_save": (GIVEN, ""),
    "multipack_real_batches": (_truthy, ""),
    **{key: (GIVEN, "PoSE") for key in ("pose_split_on_token_ids", "pose_max_context_len", "pose_num_chunks")},
    "pretraining_sample_concatenation": (GIVEN, ""),
    "max_packed_sequence_len": (GIVEN, "use sequence_len"),
    # optimisation
    "optim_target_modules": (GIVEN, "GaLore / APOLLO optimizers"),
    "torchdistx_path": (GIVEN, "the anyprecision optimizer"),
    "adam_epsilon2": (GIVEN, "CAME's second epsilon"),
    "adam_beta3": (GIVEN, "CAME / AdEMAMix's third beta"),
    **{key: (GIVEN, "the Dion optimizer") for key in ("dion_lr", "dion_momentum", "dion_rank_fraction",
                                                       "dion_rank_multiple_of")},
    **{key: (GIVEN, "EAFT") for key in ("use_eaft", "eaft_alpha", "eaft_k")},
    "tiled_mlp_num_shards": (GIVEN, "tiled MLP"),
    "tiled_mlp_use_original_mlp": (GIVEN, "tiled MLP"),
    "scaling_softmax_factor": (GIVEN, "scaled softmax"),
    "scaling_softmax_bias": (GIVEN, "scaled softmax"),
    "liger_use_token_scaling": (GIVEN, "Liger kernels"),
    # distributed (issue 17)
    **{key: (GIVEN, "multi-process training") for key in (
        "heads_k_stride", "ring_attn_func", "accelerator_config", "ray_run_name",
        "ray_num_workers", "resources_per_worker")},
    # evaluation, saving, logging
    **{key: (GIVEN, "generation-based evaluation") for key in (
        "eval_max_new_tokens", "eval_table_size", "eval_causal_lm_metrics", "bench_dataset", "bench_split",
        "generate_samples", "num_generation_samples", "generation_max_new_tokens", "generation_temperature",
        "generation_top_p", "generation_top_k", "generation_prompt_ratio", "generation_do_sample")},
    **{key: (GIVEN, "best-model tracking and early stopping") for key in (
        "metric_for_best_model", "greater_is_better", "early_stopping_patience", "load_best_model_at_end")},
    "save_only_model": (_truthy, "checkpoints always hold the whole train state, so that they resume"),
    "save_safetensors": (_one_of(False), "puretune writes safetensors only"),
    "hub_strategy": (GIVEN, "pushing to the Hub"),
    "hub_revision": (GIVEN, "pushing to the Hub"),
    "dynamic_checkpoint": (lambda v: bool(v.get("enabled")), ""),
    "wandb_watch": (_not_in(("false", "False", False, "")), "gradient / parameter histograms"),
    "wandb_log_model": (_not_in(("false", "False", False, "")), "uploading checkpoints as W&B artifacts"),
    "hf_mlflow_log_artifacts": (_truthy, "uploading artifacts to MLflow"),
    **{key: (GIVEN, "Comet / Trackio / OpenTelemetry logging") for key in (
        "comet_api_key", "comet_workspace", "comet_project_name", "comet_experiment_key", "comet_mode",
        "comet_online", "comet_experiment_config", "trackio_project_name", "trackio_run_name", "trackio_space_id",
        "otel_metrics_host", "otel_metrics_port")},
    "profiler_steps": (GIVEN, "the torch profiler"),
    "profiler_steps_start": (GIVEN, "the torch profiler"),
    **{key: (GIVEN, "the Gradio UI; use python -m programs.inference") for key in (
        "gradio_title", "gradio_share", "gradio_server_name", "gradio_server_port", "gradio_max_new_tokens",
        "gradio_temperature")},
    "image_resize_algorithm": (GIVEN, "multimodal models"),
    # dataset entries (every entry of datasets: and test_datasets:)
    "datasets.trust_remote_code": (_truthy, "dataset loading scripts"),
    "datasets.preprocess_shards": (GIVEN, "use shards / shards_idx"),
    "datasets.logprobs_field": (GIVEN, "knowledge distillation"),
    **{f"datasets.{key}": (GIVEN, "a user-defined prompt format key puretune does not read; see the "
                                  "catalogue's dataset types") for key in (
        "input_format", "input_transform", "field_human", "field_model", "prompt_format", "chosen_format",
        "rejected_format", "completion_format")},
    **{f"datasets.{key}": (GIVEN, "synthetic datasets") for key in ("sequence_length", "min_input_id",
                                                                    "max_input_id")},
}

# key -> why it has no effect in puretune. Only keys whose effect puretune has by construction, or
# that configure machinery puretune does not have, belong here; a key that would change a result
# belongs in NOT_SUPPORTED_YET.
IGNORED_KEYS: dict[str, str] = {
    "type_of_model": "the architecture comes from the checkpoint's config.json and the head from "
                     "reward_model / process_reward_model; a value that disagrees with them is refused",
    "model_type": "as type_of_model (its other spelling)",
    "axolotl_config_path": "set by axolotl's CLI to the config file's own path; puretune's programs take "
                           "--config",
    "test_value": "not an axolotl option: a stray key in axolotl's own example "
                  "examples/llama-3/lora-1b-sample-packing-sequentially.yml, which axolotl's schema drops as it "
                  "drops every unknown key (puretune refuses other unknown keys, to catch typos)",
    "is_falcon_derived_model": "the architecture comes from the checkpoint's config.json",
    "is_llama_derived_model": "the architecture comes from the checkpoint's config.json",
    "is_mistral_derived_model": "the architecture comes from the checkpoint's config.json",
    "is_qwen_derived_model": "the architecture comes from the checkpoint's config.json",
    "tokenizer_type": "the tokenizer class comes from the tokenizer's own files (AutoTokenizer); the slow and "
                      "fast classes of one tokenizer give the same token ids",
    "tokenizer_use_fast": "as tokenizer_type",
    "low_cpu_mem_usage": "weights are read straight from safetensors into the params pytree",
    "experimental_skip_move_to_device": "params are created on their device; nothing is moved afterwards",
    "merge_method": "both methods give the same merged weights; programs.merge_lora merges in float32",
    "dataset_keep_in_memory": "prepared datasets are small tensors held in memory by every program",
    "dataloader_pin_memory": "batches are built in-process from tokenised tensors; there is no DataLoader",
    "dataloader_num_workers": "batches are built in-process from tokenised tensors; there is no DataLoader",
    "dataloader_prefetch_factor": "batches are built in-process from tokenised tensors; there is no DataLoader",
    "remove_unused_columns": "rows are tokenised into input_ids / labels (and the strategy's fields); other "
                             "columns never reach a batch",
    "hf_use_auth_token": "nothing is downloaded at run time: Hub ids resolve from the local cache only",
    "is_preprocess": "set by axolotl's preprocess command; here that is python -m programs.preprocess",
    "total_num_tokens": "a statistic axolotl writes back into its config; puretune logs its own counts",
    "total_supervised_tokens": "a statistic axolotl writes back into its config; puretune logs its own counts",
    "sample_packing_mp_start_method": "packing runs in-process (pure/data/packing.py), with no worker processes",
    "sample_packing_eff_est": "puretune packs before it counts steps, so it needs no efficiency estimate",
    "batch_flattening": "every batch already runs padding-free: padding is dropped before the first layer "
                        "and attention is per document (kernels/attention.py)",
    "chunked_cross_entropy": "the loss head is always chunked: no [tokens, vocab] logits (kernels/linear_ce.py)",
    "chunked_cross_entropy_num_chunks": "the head's chunk size is chosen per device by kernels/linear_ce.py",
    "flash_attention": "kernels/ picks the attention per device; every choice is exact causal attention per "
                       "document",
    "sdp_attention": "as flash_attention",
    "flex_attention": "as flash_attention",
    "flex_attn_compile_kwargs": "as flash_attention",
    "eager_attention": "as flash_attention",
    "attn_implementation": "as flash_attention",
    "gradient_checkpointing_kwargs": "use_reentrant and its kin configure torch.utils.checkpoint; puretune's "
                                     "remat (pure/remat.py) has no such switches and the gradients are the same",
    "dpo_padding_free": "preference batches already run with the padding dropped before the first layer",
    "dpo_use_logits_to_keep": "log-probabilities are computed at the completion tokens only, always",
    "ddp_bucket_cap_mb": "gradients are reduced per tensor by DTensor (a reduce-scatter or all-reduce each), with "
                         "no buckets to size",
    "ddp_broadcast_buffers": "puretune's models have no buffers to broadcast: every tensor of the train state is a "
                             "param or optimizer state, placed by backends.distributed",
    "ddp_find_unused_parameters": "the step takes the gradient of the whole params pytree (unused params get zero "
                                  "gradients), so there is no search for unused parameters",
    "ddp": "ddp: true means DDP, the default; axolotl also sets it for FSDP and DeepSpeed runs, so it chooses "
           "nothing (sharding_plan reads fsdp_config / deepspeed)",
    "world_size": "set by the launcher: torchrun's WORLD_SIZE environment variable is read, not this key",
    "local_rank": "set by the launcher: torchrun's LOCAL_RANK environment variable is read, not this key",
}

def refuses_every_value(key: str) -> bool:
    """Whether NOT_SUPPORTED_YET refuses every value of `key` but its default (`--help` says so)."""
    return NOT_SUPPORTED_YET[key][0] in (GIVEN, _truthy)


# Keys axolotl still reads under an old name: old -> new.
LEGACY_ALIASES = {
    "dpo_beta": "rl_beta",
    "evaluation_strategy": "eval_strategy",
    "noisy_embedding_alpha": "neftune_noise_alpha",
    "dataset_processes": "dataset_num_proc",
}

PREFERENCE_RL = ("dpo", "ipo", "kto", "orpo", "simpo")

