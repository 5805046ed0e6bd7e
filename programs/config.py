"""The one config schema: axolotl's YAML keys, their documented defaults, validation and CLI overrides.

    config = load_config("x.yaml", ["--learning-rate", "1e-4", "--trl.beta=0.1"])

Everything a program needs from a YAML file goes through here, once, at the edge: unknown keys get
the closest valid key, wrong types and out-of-range values name the key and what was expected, and
features axolotl has but puretune has not built yet fail early with one line (`NOT_SUPPORTED_YET`).
Inside the project, functions take the few plain values they need (`data_settings(config)`), not
the whole config.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pure.data.settings import DataSettings


class ConfigError(ValueError):
    """A config that cannot be used: the message names the key and what was expected."""


# ---------------------------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------------------------

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Ratio = Annotated[float, Field(ge=0, le=1)]
Prob = Annotated[float, Field(ge=0, lt=1)]
StrList = Union[str, list[str]]

_COMMON = dict(coerce_numbers_to_str=True, protected_namespaces=(), populate_by_name=True)


class _Strict(BaseModel):
    """A nested block whose keys are all known (typos get a suggestion)."""

    model_config = ConfigDict(extra="forbid", **_COMMON)


# ---------------------------------------------------------------------------------------------
# Nested blocks
# ---------------------------------------------------------------------------------------------


class SpecialTokens(_Strict):
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    additional_special_tokens: list[str] | None = None


class LrGroup(_Strict):
    name: str
    modules: list[str]
    lr: PosFloat


class LoftQConfig(_Strict):
    loftq_bits: int = 4


class PeftConfig(_Strict):
    loftq_config: LoftQConfig | None = None


class DynamicCheckpoint(_Strict):
    enabled: bool = False
    check_interval: PosInt = 10
    trigger_file_path: str = ""


class TRLConfig(_Strict):
    beta: NonNegFloat | None = None
    max_completion_length: PosInt | None = None
    use_vllm: bool = False
    vllm_mode: Literal["server", "colocate"] | None = None
    vllm_server_host: str | None = "0.0.0.0"
    vllm_server_port: int | None = 8000
    vllm_server_timeout: int | None = None
    vllm_guided_decoding_regex: str | None = None
    reward_funcs: list[str] | None = None
    reward_weights: list[float] | None = None
    generation_batch_size: PosInt | None = None
    num_generations: PosInt | None = None
    log_completions: bool | None = False
    num_completions_to_print: int | None = None
    importance_sampling_level: Literal["sequence", "token"] | None = None
    sync_ref_model: bool | None = False
    ref_model_mixup_alpha: Ratio | None = 0.9
    ref_model_sync_steps: PosInt | None = 64
    scale_rewards: bool = True
    temperature: NonNegFloat | None = None
    top_p: Ratio | None = None
    top_k: int | None = None
    min_p: Ratio | None = None
    repetition_penalty: PosFloat | None = None
    generation_kwargs: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    num_iterations: PosInt | None = None
    epsilon: NonNegFloat | None = None
    epsilon_high: NonNegFloat | None = None
    use_liger_loss: bool | None = None
    # GRPO: grpo | bnpo | dr_grpo | dapo; DPO (rl: dpo): one pair loss type or a list, weighted by loss_weights
    loss_type: str | list[str] | None = None
    loss_weights: list[float] | None = None
    mask_truncated_completions: bool = False
    vllm_enable_sleep_mode: bool | None = None
    rollout_func: str | None = None
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] | None = None
    use_data_producer: bool = False
    async_prefetch: bool = False
    prefetch_depth: PosInt | None = None
    vllm_sync_interval: PosInt | None = None
    streaming_partial_batch: bool | None = None
    streaming_min_groups: PosInt | None = None
    vllm_importance_sampling_correction: bool | None = None
    vllm_importance_sampling_mode: Literal[
        "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
    ] | None = None
    vllm_importance_sampling_cap: PosFloat | None = None
    off_policy_mask_threshold: NonNegFloat | None = None
    use_bias_correction_kl: bool | None = None
    reward_num_workers: PosInt = 1
    replay_buffer_size: NonNegInt = 0
    replay_recompute_logps: bool = True
    reroll_start_fraction: Ratio = 1.0
    reroll_max_groups: NonNegInt = 1
    skip_zero_advantage_batches: bool = True
    vllm_lora_sync: bool = False


class VllmConfig(_Strict):
    device: str | None = "auto"
    tensor_parallel_size: PosInt | None = None
    data_parallel_size: PosInt | None = None
    gpu_memory_utilization: Ratio | None = 0.9
    dtype: str | None = "auto"
    max_model_len: PosInt | None = None
    enable_prefix_caching: bool | None = None
    host: str | None = "0.0.0.0"
    port: int | None = 8000
    enable_reasoning: bool | None = None
    reasoning_parser: str | None = None
    enforce_eager: bool | None = None
    serve_module: str | None = None
    worker_extension_cls: str | None = None


class EBFTConfig(_Strict):
    feature_layers: list[Ratio] = Field(default_factory=lambda: [0.25, 0.5, 0.75])
    embed_method: Literal["last_token", "mean_pooling", "completion_mean", "concat"] = "last_token"
    use_whitening: bool = False
    alignment_coef: float = 1.0
    diversity_coef: float = 1.0
    ce_coef: float = 0.0
    adaptive_max_tokens: bool = True
    gt_length_multiplier: PosFloat = 1.5
    mode: Literal["structured", "strided"] = "structured"
    stride: PosInt = 8
    context_length: PosInt = 8
    generate_max_len: PosInt = 8
    n_samples_per_prompt: PosInt = 4
    temperature: NonNegFloat = 0.6
    top_p: Ratio = 1.0
    rl_coef: float = 1.0
    advantage_estimator: Literal["rloo", "group_norm", "reinforce"] = "rloo"
    min_completion_prefix: NonNegInt = 0


class QuantConfig(_Strict):
    weight_dtype: str = "int8"
    activation_dtype: str | None = None
    quantize_embedding: bool | None = False
    group_size: PosInt | None = 32
    fake_quant_after_n_steps: int | None = None


class DatasetConfig(BaseModel):
    """One `datasets:`/`test_datasets:` entry: the keys of `load_dataset` plus the prompt strategy's.

    Permissive: keys not listed here are kept and handed to the strategy (user transforms and
    strategy-specific options), except a key that looks like a typo of a known one.
    """

    model_config = ConfigDict(extra="allow", **_COMMON)

    # loading
    path: str | None = None
    name: str | None = None
    split: str | None = None
    data_files: StrList | None = None
    ds_type: str | None = None
    revision: str | None = None
    trust_remote_code: bool | None = False
    shards: PosInt | None = None
    shards_idx: NonNegInt | None = None
    preprocess_shards: PosInt | None = None
    # prompt strategy
    type: str | dict[str, Any] | None = None
    conversation: str | None = None
    input_format: str | None = None
    input_transform: str | None = None
    system_prompt: str | None = None
    system_format: str | None = None
    field: str | None = None
    field_system: str | None = None
    field_instruction: str | None = None
    field_input: str | None = None
    field_output: str | None = None
    field_human: str | None = None
    field_model: str | None = None
    field_prompt: str | None = None
    field_chosen: str | None = None
    field_rejected: str | None = None
    field_completion: str | None = None
    field_label: str | bool | None = None
    format: str | None = None
    no_input_format: str | None = None
    prompt_format: str | None = None
    chosen_format: str | None = None
    rejected_format: str | None = None
    completion_format: str | None = None
    # chat_template strategy
    chat_template: str | None = None
    chat_template_jinja: str | None = None
    field_messages: str | None = None
    field_tools: str | None = None
    field_thinking: str | None = None
    template_thinking_key: str | None = None
    message_field_role: str | None = None
    message_field_content: str | None = None
    message_property_mappings: dict[str, str] | None = None
    message_field_training: str | None = None
    message_field_training_detail: str | None = None
    split_thinking: bool | None = None
    logprobs_field: str | None = None
    temperature: float | None = None
    roles_to_train: list[str] | None = None
    train_on_eos: Literal["all", "turn", "last", "none"] | None = None
    train_on_eot: Literal["all", "turn", "last", "none"] | None = None
    roles: dict[str, list[str]] | None = None
    drop_system_message: bool | None = None
    # stepwise supervised (PRM)
    step_separator: str | None = None
    max_completion_length: PosInt | None = None
    train_on_last_step_only: bool | None = None
    # synthetic
    length: PosInt | None = None
    sequence_length: PosInt | None = None
    min_input_id: NonNegInt | None = None
    max_input_id: PosInt | None = None
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The entry as the user wrote it (keys not given are left out), extras included."""
        return self.model_dump(exclude_unset=True)


# ---------------------------------------------------------------------------------------------
# The schema, by section (the sections only group `--help`)
# ---------------------------------------------------------------------------------------------


class ModelKeys(BaseModel):
    base_model: str
    base_model_config: str | None = None
    cls_model_config: str | None = None
    revision_of_model: str | None = None
    type_of_model: str | None = None
    model_type: str | None = None
    tokenizer_config: str | None = None
    tokenizer_type: str | None = None
    tokenizer_use_fast: bool | None = None
    tokenizer_legacy: bool | None = None
    tokenizer_use_mistral_common: bool | None = None
    tokenizer_save_jinja_files: bool | None = True
    processor_type: str | None = None
    trust_remote_code: bool | None = None
    special_tokens: SpecialTokens | None = None
    tokens: list[str] | None = None
    added_tokens_overrides: dict[int, str] | None = None
    chat_template: str | None = None
    chat_template_jinja: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    eot_tokens: list[str] | None = None
    default_system_message: str | None = None
    resize_token_embeddings_to_32x: bool | None = None
    mean_resizing_embeddings: bool | None = False
    shrink_embeddings: bool | None = None
    embeddings_skip_upcast: bool | None = None
    fix_untrained_tokens: int | list[int] | None = None
    reinit_weights: bool | None = None
    overrides_of_model_config: dict[str, Any] | None = None
    overrides_of_model_kwargs: dict[str, Any] | None = None
    rope_scaling: Any | None = None
    device_map: Any | None = None
    max_memory: Any | None = None
    gpu_memory_limit: int | str | None = None
    low_cpu_mem_usage: bool | None = None
    model_quantization_config: str | None = None
    model_quantization_config_kwargs: dict[str, Any] | None = None
    quantize_moe_experts: bool = False
    experts_implementation: str | None = None
    num_labels: PosInt | None = None
    unfrozen_parameters: list[str] | None = None
    trainer_cls: str | None = None
    plugins: list[str] | None = None
    experimental_skip_move_to_device: bool | None = True
    use_kernels: bool | None = None
    llama4_linearized_experts: bool | None = None
    is_falcon_derived_model: bool | None = None
    is_llama_derived_model: bool | None = None
    is_mistral_derived_model: bool | None = None
    is_qwen_derived_model: bool | None = None
    strict: bool | None = False
    axolotl_config_path: str | None = None


class AdapterKeys(BaseModel):
    load_in_8bit: bool | None = False
    load_in_4bit: bool | None = False
    bnb_config_kwargs: dict[str, Any] | None = None
    gptq: bool | None = None
    adapter: Literal["lora", "qlora", "llama-adapter"] | None = None
    lora_model_dir: str | None = None
    lora_r: PosInt | None = None
    lora_alpha: PosFloat | None = None
    lora_dropout: Prob | None = 0.0
    lora_target_modules: StrList | None = None
    lora_target_parameters: StrList | None = None
    lora_target_linear: bool | None = None
    lora_modules_to_save: list[str] | None = None
    lora_fan_in_fan_out: bool | None = None
    peft_layers_to_transform: list[int] | None = None
    peft_layers_pattern: list[str] | None = None
    peft: PeftConfig | None = None
    peft_use_dora: bool | None = None
    peft_use_rslora: bool | None = None
    peft_layer_replication: list[tuple[int, int]] | None = None
    peft_init_lora_weights: bool | str | None = None
    peft_trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    peft_ensure_weight_tying: bool | None = None
    peft_autocast_adapter_dtype: bool | None = None
    qlora_sharded_model_loading: bool | None = False
    lora_on_cpu: bool | None = None
    merge_lora: bool | None = None
    merge_method: Literal["legacy", "memory_efficient"] | None = "memory_efficient"
    loraplus_lr_ratio: PosFloat | None = None
    loraplus_lr_embedding: NonNegFloat | None = 1e-6
    relora: bool | None = None
    relora_prune_ratio: Ratio | None = None
    relora_cpu_offload: bool | None = None
    jagged_restart_steps: PosInt | None = None
    jagged_restart_warmup_steps: NonNegInt | None = None
    jagged_restart_anneal_steps: NonNegInt | None = None
    lisa_n_layers: PosInt | None = None
    lisa_step_interval: PosInt | None = None
    lisa_layers_attribute: str | None = "model.layers"


class DataKeys(BaseModel):
    datasets: Annotated[list[DatasetConfig], Field(min_length=1)] | None = None
    test_datasets: Annotated[list[DatasetConfig], Field(min_length=1)] | None = None
    val_set_size: Annotated[int, Field(ge=0)] | NonNegFloat | None = 0.0
    dataset_prepared_path: str | None = None
    dataset_shard_num: PosInt | None = None
    dataset_shard_idx: NonNegInt | None = None
    skip_prepare_dataset: bool | None = False
    num_dataset_shards_to_save: PosInt | None = None
    pretraining_dataset: list[dict[str, Any]] | None = None
    shuffle_merged_datasets: bool | None = True
    shuffle_before_merging_datasets: bool | None = False
    dataset_processes: PosInt | None = None
    dataset_num_proc: PosInt | None = None
    dataset_exact_deduplication: bool | None = None
    dataset_keep_in_memory: bool | None = None
    dataloader_pin_memory: bool | None = None
    dataloader_num_workers: NonNegInt | None = None
    dataloader_prefetch_factor: PosInt | None = None
    dataloader_drop_last: bool | None = None
    remove_unused_columns: bool | None = None
    push_dataset_to_hub: str | None = None
    hf_use_auth_token: bool | None = None
    streaming: bool | None = None
    streaming_multipack_buffer_size: PosInt | None = 10000
    sequence_len: Annotated[int, Field(ge=2)] = 512
    excess_length_strategy: Literal["drop", "truncate", "raise"] | None = None
    min_sample_len: NonNegInt | None = None
    eval_sequence_len: Annotated[int, Field(ge=2)] | None = None
    max_prompt_len: PosInt | None = None
    train_on_inputs: bool | None = False
    is_preprocess: bool | None = None
    preprocess_iterable: bool | None = None
    total_num_tokens: int | None = None
    total_supervised_tokens: int | None = None


class PackingKeys(BaseModel):
    sample_packing: bool | None = None
    sample_packing_group_size: PosInt | None = 100000
    sample_packing_bin_size: PosInt | None = 200
    sample_packing_sequentially: bool | None = None
    sample_packing_mp_start_method: Literal["fork", "spawn", "forkserver"] | None = None
    sample_packing_eff_est: float | None = None
    eval_sample_packing: bool | None = None
    pad_to_sequence_len: bool | None = None
    curriculum_sampling: bool | None = None
    multipack_real_batches: bool | None = None
    batch_flattening: Literal["auto"] | bool | None = None
    group_by_length: bool | None = None
    use_pose: bool | None = None
    pose_split_on_token_ids: list[int] | None = None
    pose_max_context_len: int | None = None
    pose_num_chunks: int | None = None
    pretrain_multipack_buffer_size: int | None = None
    pretrain_multipack_attn: bool | None = True
    pretraining_sample_concatenation: bool | None = None
    max_packed_sequence_len: int | None = None


OPTIMIZER_NAMES = (
    # transformers' OptimizerNames
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adamw_apex_fused",
    "adafactor", "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd",
    "adagrad", "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit",
    "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit",
    "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor",
    "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo",
    "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
    "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw",
    # axolotl's own
    "optimi_adamw", "ao_adamw_4bit", "ao_adamw_8bit", "ao_adamw_fp8", "adopt_adamw", "came_pytorch",
    "muon", "dion",
)
SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "lion_32bit")
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "one_cycle", "rex",
)


class OptimKeys(BaseModel):
    micro_batch_size: PosInt | None = 1
    gradient_accumulation_steps: PosInt | None = 1
    batch_size: PosInt | None = None
    eval_batch_size: PosInt | None = None
    auto_find_batch_size: bool | None = None
    num_epochs: PosFloat = 1.0
    max_steps: PosInt | None = None
    learning_rate: PosFloat
    embedding_lr: PosFloat | None = None
    embedding_lr_scale: PosFloat | None = None
    weight_decay: NonNegFloat | None = 0.0
    optimizer: Literal[OPTIMIZER_NAMES] | None = "adamw_torch_fused"  # type: ignore[valid-type]
    optim_args: str | dict[str, Any] | None = None
    optim_target_modules: list[str] | Literal["all_linear"] | None = None
    torchdistx_path: str | None = None
    lr_scheduler: Literal[LR_SCHEDULERS] | None = "cosine"  # type: ignore[valid-type]
    lr_scheduler_kwargs: dict[str, Any] | None = None
    lr_quadratic_warmup: bool | None = None
    cosine_min_lr_ratio: Ratio | None = None
    cosine_constant_lr_ratio: Ratio | None = None
    lr_div_factor: PosFloat | None = None
    lr_groups: list[LrGroup] | None = None
    warmup_steps: NonNegInt | None = None
    warmup_ratio: Ratio | None = None
    adam_epsilon: PosFloat | None = None
    adam_epsilon2: PosFloat | None = None
    adam_beta1: Prob | None = None
    adam_beta2: Prob | None = None
    adam_beta3: Prob | None = None
    dion_lr: PosFloat | None = None
    dion_momentum: float | None = None
    dion_rank_fraction: float | None = 1.0
    dion_rank_multiple_of: int | None = 1
    max_grad_norm: NonNegFloat | None = None
    gc_steps: int | None = None
    loss_watchdog_threshold: PosFloat | None = None
    loss_watchdog_patience: PosInt | None = None
    neftune_noise_alpha: NonNegFloat | None = None
    noisy_embedding_alpha: NonNegFloat | None = None
    use_eaft: bool | None = None
    eaft_alpha: float | None = 1.0
    eaft_k: PosInt | None = 20
    chunked_cross_entropy: bool | None = None
    chunked_cross_entropy_num_chunks: PosInt | None = None
    tiled_mlp: bool | None = None
    tiled_mlp_num_shards: PosInt | None = None
    tiled_mlp_use_original_mlp: bool | None = True


class PrecisionKeys(BaseModel):
    bf16: Literal["auto", "full"] | bool | None = "auto"
    fp16: bool | None = None
    fp8: bool | None = None
    fp8_enable_fsdp_float8_all_gather: bool | None = None
    bfloat16: bool | None = None
    float16: bool | None = None
    tf32: Literal["auto"] | bool | None = "auto"
    float32: bool | None = None


class KernelKeys(BaseModel):
    flash_attention: bool | None = None
    sdp_attention: bool | None = None
    flex_attention: bool | None = None
    flex_attn_compile_kwargs: dict[str, Any] | None = None
    xformers_attention: bool | None = None
    sage_attention: bool | None = None
    s2_attention: bool | None = None
    eager_attention: bool | None = None
    attn_implementation: str | None = None
    flash_attn_cross_entropy: bool | None = None
    flash_attn_rms_norm: bool | None = None
    flash_attn_fuse_mlp: bool | None = None
    flash_optimum: bool | None = None
    fused_attn_kernel: bool | None = None
    scaling_softmax: bool | None = None
    scaling_softmax_factor: float | None = None
    scaling_softmax_bias: float | None = None
    lora_mlp_kernel: bool | None = None
    lora_qkv_kernel: bool | None = None
    lora_o_kernel: bool | None = None
    lora_embedding_kernel: bool | None = None
    unsloth_cross_entropy_loss: bool | None = None
    unsloth_lora_mlp: bool | None = None
    unsloth_lora_qkv: bool | None = None
    unsloth_lora_o: bool | None = None
    unsloth_rms_norm: bool | None = None
    unsloth_rope: bool | None = None
    liger_rope: bool | None = None
    liger_rms_norm: bool | None = None
    liger_glu_activation: bool | None = None
    liger_layer_norm: bool | None = None
    liger_cross_entropy: bool | None = None
    liger_fused_linear_cross_entropy: bool | None = None
    liger_use_token_scaling: bool | None = None
    cut_cross_entropy: bool | None = None
    torch_compile: Literal["auto"] | bool | None = None
    torch_compile_backend: str | None = None
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = None
    gradient_checkpointing: Literal["offload", "offload_disk"] | bool | None = False
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    activation_offloading: Literal["legacy", "disk"] | bool | None = False
    layer_offloading: bool | None = False


class DistributedKeys(BaseModel):
    deepspeed: str | dict[str, Any] | None = None
    deepcompile: bool | None = None
    fsdp: list[str] | None = None
    fsdp_config: dict[str, Any] | None = None
    fsdp_version: int | None = None
    fsdp_final_state_dict_type: str | None = None
    dp_shard_size: int | None = None
    dp_replicate_size: int | None = None
    sequence_parallel_degree: int | None = None
    context_parallel_size: int | None = None
    heads_k_stride: int | None = None
    ring_attn_func: str | None = None
    tensor_parallel_size: int | None = None
    ddp_timeout: int | None = None
    ddp_bucket_cap_mb: int | None = None
    ddp_broadcast_buffers: bool | None = None
    ddp_find_unused_parameters: bool | None = None
    device: Any | None = None
    world_size: int | None = None
    local_rank: int | None = None
    ddp: bool | None = None
    accelerator_config: dict[str, Any] | None = None
    use_ray: bool = False
    ray_run_name: str | None = None
    ray_num_workers: int = 1
    resources_per_worker: dict[str, Any] | None = None


class EvalKeys(BaseModel):
    eval_steps: PosInt | PosFloat | None = None
    evals_per_epoch: NonNegInt | None = None
    eval_strategy: Literal["no", "epoch", "steps"] | None = None
    evaluation_strategy: Literal["no", "epoch", "steps"] | None = None
    eval_max_new_tokens: PosInt | None = None
    eval_table_size: int | None = None
    do_causal_lm_eval: bool | None = None
    eval_causal_lm_metrics: list[str] | None = None
    do_bench_eval: bool | None = None
    bench_dataset: str | None = None
    bench_split: str | None = None
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    early_stopping_patience: PosInt | None = None
    load_best_model_at_end: bool | None = False
    generate_samples: bool | None = False
    num_generation_samples: PosInt | None = 3
    generation_max_new_tokens: PosInt | None = 50
    generation_temperature: NonNegFloat | None = 0.7
    generation_top_p: Ratio | None = None
    generation_top_k: PosInt | None = None
    generation_prompt_ratio: Ratio | None = 0.5
    generation_do_sample: bool | None = True


class SaveKeys(BaseModel):
    output_dir: str = "./model-out"
    save_steps: PosInt | PosFloat | None = None
    saves_per_epoch: NonNegInt | None = None
    save_strategy: Literal["no", "epoch", "best", "steps"] | None = None
    save_total_limit: PosInt | None = None
    save_first_step: bool | None = None
    save_only_model: bool | None = False
    save_safetensors: bool | None = True
    hub_model_id: str | None = None
    hub_strategy: str | None = None
    hub_revision: str | None = None
    resume_from_checkpoint: str | None = None
    auto_resume_from_checkpoints: bool | None = None
    dynamic_checkpoint: DynamicCheckpoint | None = None


class LoggingKeys(BaseModel):
    logging_steps: PosInt | None = None
    use_tensorboard: bool | None = None
    use_wandb: bool | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_run_id: str | None = None
    wandb_mode: str | None = None
    wandb_watch: str | None = None
    wandb_log_model: str | None = None
    use_mlflow: bool | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None
    mlflow_run_name: str | None = None
    hf_mlflow_log_artifacts: bool | None = None
    use_comet: bool | None = None
    comet_api_key: str | None = None
    comet_workspace: str | None = None
    comet_project_name: str | None = None
    comet_experiment_key: str | None = None
    comet_mode: str | None = None
    comet_online: bool | None = None
    comet_experiment_config: dict[str, Any] | None = None
    use_trackio: bool | None = None
    trackio_project_name: str | None = None
    trackio_run_name: str | None = None
    trackio_space_id: str | None = None
    use_otel_metrics: bool | None = False
    otel_metrics_host: str | None = "localhost"
    otel_metrics_port: int | None = 8000
    profiler_steps: PosInt | None = None
    profiler_steps_start: NonNegInt | None = 0
    include_tokens_per_second: bool | None = None
    include_tkps: bool | None = True
    gradio_title: str | None = None
    gradio_share: bool | None = None
    gradio_server_name: str | None = None
    gradio_server_port: int | None = None
    gradio_max_new_tokens: int | None = None
    gradio_temperature: float | None = None
    image_size: int | tuple[int, int] | None = None
    image_resize_algorithm: str | None = None


RL_TYPES = ("dpo", "ipo", "kto", "orpo", "simpo", "grpo", "gdpo", "ebft")


class RLKeys(BaseModel):
    rl: Literal[RL_TYPES] | None = None  # type: ignore[valid-type]
    rl_beta: NonNegFloat | None = None
    trl: TRLConfig | None = None
    vllm: VllmConfig | None = None
    ebft: EBFTConfig | None = None
    orpo_alpha: NonNegFloat | None = None
    simpo_gamma: float | None = None
    cpo_alpha: NonNegFloat | None = None
    kto_desirable_weight: NonNegFloat | None = None
    kto_undesirable_weight: NonNegFloat | None = None
    dpo_beta: NonNegFloat | None = None
    dpo_use_weighting: bool | None = None
    dpo_label_smoothing: Annotated[float, Field(ge=0, le=0.5)] | None = None
    precompute_ref_log_probs: bool | None = None
    dpo_use_liger_kernel: bool | None = None
    dpo_padding_free: bool | None = None
    dpo_use_logits_to_keep: bool | None = None
    dpo_generate_during_eval: bool | None = None
    dpo_norm_loss: bool | None = None
    rpo_alpha: NonNegFloat | None = None
    reward_model: bool | None = None
    process_reward_model: bool | None = None
    center_rewards_coefficient: NonNegFloat | None = None
    rl_adapter_ref_model: bool | None = None
    qat: QuantConfig | None = None
    quantization: QuantConfig | None = None
    seed: int | None = None
    data_seed: int | None = None


SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("model and tokenizer", ModelKeys),
    ("adapters", AdapterKeys),
    ("data", DataKeys),
    ("packing", PackingKeys),
    ("optimisation", OptimKeys),
    ("precision", PrecisionKeys),
    ("attention, kernels and memory", KernelKeys),
    ("distributed", DistributedKeys),
    ("evaluation", EvalKeys),
    ("saving", SaveKeys),
    ("logging", LoggingKeys),
    ("RL and reward models", RLKeys),
)


class Config(
    RLKeys, LoggingKeys, SaveKeys, EvalKeys, DistributedKeys, KernelKeys, PrecisionKeys, OptimKeys,
    PackingKeys, DataKeys, AdapterKeys, ModelKeys,
):
    """The validated config. Build it with `load_config` or `Config.from_dict`, never by hand."""

    model_config = ConfigDict(extra="forbid", **_COMMON)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        """Validate a raw mapping (YAML contents plus overrides) into a normalised Config."""
        return validate(raw)

    def to_dict(self) -> dict[str, Any]:
        """Every key with its resolved value (defaults filled), as plain YAML-friendly data."""
        return self.model_dump(mode="json")

    def data_settings(self) -> DataSettings:
        """`data_settings(self)`; a method so `backends/` can ask without importing `programs/`."""
        return data_settings(self)

    def training_kind(self) -> str:
        """`training_kind(self)`: "sft", an `rl:` value, "rm" or "prm"."""
        return training_kind(self)


# ---------------------------------------------------------------------------------------------
# Features axolotl has that puretune has not built: one table
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside `X | None` / `list[X]` / `Annotated[...]`, if there is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _check_unknown_keys(raw: dict, model: type[BaseModel], prefix: str = "") -> None:
    fields = model.model_fields
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{prefix}{key!r}: config keys must be strings")
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix + key!r}{_closest(key, fields)}")
        sub = _model_of(fields[key].annotation)
        if sub is DatasetConfig and isinstance(value, list):
            for i, entry in enumerate(value):
                if isinstance(entry, dict):
                    _check_dataset_keys(entry, f"{prefix}{key}[{i}].")
        elif sub is not None and isinstance(value, dict):
            _check_unknown_keys(value, sub, f"{prefix}{key}.")
        elif sub is not None and isinstance(value, list):
            for i, entry in enumerate(value):
                if isinstance(entry, dict):
                    _check_unknown_keys(entry, sub, f"{prefix}{key}[{i}].")


def _check_dataset_keys(entry: dict, prefix: str) -> None:
    """Dataset entries are open (strategies take their own options) but typos of known keys fail."""
    known = DatasetConfig.model_fields
    for key in entry:
        if isinstance(key, str) and key not in known:
            match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.85)
            if match:
                raise ConfigError(f"unknown dataset key {prefix + key!r}; did you mean {match[0]!r}?")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        base, *meta = args
        bounds = []
        for m in meta:
            for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                for item in getattr(m, "metadata", [m]):
                    if getattr(item, attr, None) is not None:
                        bounds.append(f"{sym} {getattr(item, attr)}")
        return _type_name(base) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin in (Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(parts)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type):
        return "mapping" if issubclass(annotation, BaseModel) else annotation.__name__
    return str(annotation)


def _field_at(loc: tuple) -> Any:
    """The FieldInfo of the field at a pydantic error location (top-level key first)."""
    model: type[BaseModel] | None = Config
    field = None
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        if part not in model.model_fields:
            return field
        field = model.model_fields[part]
        model = _model_of(field.annotation)
    return field


def _field_type_name(field: Any) -> str:
    """A field's type with its bounds (pydantic moves a top-level Annotated's bounds to metadata)."""
    return _type_name(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"list", "dict", "str", "int", "float", "bool"} or "[" in part or "-" in part:
            continue  # pydantic's union-branch tags
        else:
            out += ("." if out else "") + str(part)
    return out


def _translate(err: ValidationError) -> ConfigError:
    errors = err.errors()
    # With unions pydantic reports one error per branch; the key and its expected type say it all.
    first = errors[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and _format_loc((p,)) == ""))
    key = _format_loc(loc)
    if first["type"] == "missing":
        return ConfigError(f"{key} is required")
    field = _field_at(loc)
    annotation = field.annotation if field is not None else None
    expected = _field_type_name(field) if field is not None else ""
    value = first.get("input")
    hint = ""
    if isinstance(value, str) and annotation is not None:
        hint = _closest(value, [c for c in _literal_values(annotation) if isinstance(c, str)])
    msg = first["msg"]
    expected_part = f"expected {expected}" if expected else msg
    return ConfigError(f"{key}: {expected_part}, got {value!r} ({msg}){hint}")


def _literal_values(annotation: Any) -> list:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    out = []
    for arg in typing.get_args(annotation):
        out.extend(_literal_values(arg))
    return out


def _check_not_supported(raw: dict) -> None:
    for key, (unsupported, hint) in NOT_SUPPORTED_YET.items():
        value = raw.get(key)
        if value is None:
            continue
        try:
            bad = unsupported(value)
        except Exception:  # a wrongly typed value: the schema reports it
            bad = False
        if bad:
            shown = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) else ""
            raise ConfigError(f"{key} is not supported yet by puretune{shown}" + (f"; {hint}" if hint else ""))
    for list_key in ("datasets", "test_datasets"):
        for i, entry in enumerate(raw.get(list_key) or []):
            if isinstance(entry, dict) and (entry.get("type") == "_synthetic" or entry.get("path") == "synthetic"):
                raise ConfigError(f"{list_key}[{i}].type: synthetic datasets are not supported yet by puretune")


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _check_loss_type(c: "Config") -> None:
    """`trl.loss_type`: a GRPO loss for rl: grpo/gdpo, DPO pair losses (name or list) for rl: dpo."""
    trl = c.trl
    if trl is None or (trl.loss_type is None and trl.loss_weights is None):
        return
    names = [trl.loss_type] if isinstance(trl.loss_type, str) else list(trl.loss_type or [])
    if c.rl in ("dpo", "ipo"):
        from pure.losses.dpo import LOSS_TYPES

        known, what = LOSS_TYPES, "DPO loss types"
    elif c.rl in ("grpo", "gdpo"):
        known, what = GRPO_LOSS_TYPES, "GRPO loss types"
        if len(names) > 1 or trl.loss_weights:
            raise ConfigError(f"trl.loss_type: rl: {c.rl} takes one loss type, got {trl.loss_type!r}")
    else:
        raise ConfigError(f"trl.loss_type / trl.loss_weights apply to rl: dpo, ipo, grpo or gdpo, not rl: {c.rl}")
    for name in names:
        if name not in known:
            raise ConfigError(f"trl.loss_type: {name!r} is not one of the {what}: {', '.join(known)}")
    if trl.loss_weights is not None and len(trl.loss_weights) != len(names):
        raise ConfigError(f"trl.loss_weights has {len(trl.loss_weights)} weights for {len(names)} loss types")


def validate(raw: dict[str, Any]) -> Config:
    """Check a raw mapping against the schema and the cross-key rules; fill derived values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    raw = dict(raw)
    for old, new in LEGACY_ALIASES.items():
        if raw.get(old) is not None and raw.get(new) is None:
            raw[new] = raw[old]
    if raw.get("rl") == "reward_trainer":  # an older spelling of reward_model: true
        raw["rl"] = None
        raw["reward_model"] = True
    opt = raw.get("optimizer")
    if isinstance(opt, str) and opt not in OPTIMIZER_NAMES:
        raise ConfigError(
            f"optimizer: unknown optimizer {opt!r}{_closest(opt, OPTIMIZER_NAMES)} "
            f"(puretune runs {', '.join(SUPPORTED_OPTIMIZERS)})"
        )
    # Not-built features first: a config written for axolotl should say what is missing, not
    # trip over a key that belongs to that feature.
    _check_not_supported(raw)
    _check_unknown_keys(raw, Config)
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise _translate(err) from None
    _check_not_supported(config.model_dump())
    _check_rules(config)
    return _normalise(config)


def _check_rules(c: Config) -> None:
    def both(a: str, b: str, why: str = "") -> None:
        if getattr(c, a) is not None and getattr(c, b) is not None:
            raise ConfigError(f"{a} and {b} cannot both be set{why}")

    both("warmup_steps", "warmup_ratio", "; use one of them")
    both("eval_steps", "evals_per_epoch", "; use one of them")
    both("save_steps", "saves_per_epoch", "; use one of them")
    if c.test_datasets and c.val_set_size:
        raise ConfigError(
            f"val_set_size ({c.val_set_size}) and test_datasets cannot both be set; "
            "use val_set_size: 0 with test_datasets"
        )
    if isinstance(c.val_set_size, float) and c.val_set_size >= 1 and not c.val_set_size.is_integer():
        raise ConfigError(f"val_set_size: expected a fraction < 1 or a whole number of rows, got {c.val_set_size}")
    if c.fp16 and c.bf16 in (True, "full"):
        raise ConfigError(f"bf16 ({c.bf16!r}) and fp16 cannot both be set; choose one")
    if c.bfloat16 and c.float16:
        raise ConfigError("bfloat16 and float16 cannot both be true; choose one")
    if c.float32 and (c.bf16 in (True, "full") or c.fp16 or c.bfloat16 or c.float16):
        raise ConfigError("float32: true cannot be combined with bf16: true/full, fp16, bfloat16 or float16")
    _check_loss_type(c)
    if c.rl in PREFERENCE_RL and c.sample_packing:
        raise ConfigError(f"rl: {c.rl} needs sample_packing: false (preference pairs are not packed)")
    if c.rl and (c.reward_model or c.process_reward_model):
        raise ConfigError("rl cannot be combined with reward_model/process_reward_model")
    if c.reward_model and c.process_reward_model:
        raise ConfigError("reward_model and process_reward_model cannot both be true")
    if c.dataset_shard_idx is not None and c.dataset_shard_num is not None and c.dataset_shard_idx >= c.dataset_shard_num:
        raise ConfigError(
            f"dataset_shard_idx: expected an index < dataset_shard_num ({c.dataset_shard_num}), got {c.dataset_shard_idx}"
        )
    if c.lora_model_dir and not c.adapter:
        raise ConfigError("lora_model_dir is set but adapter is not; add adapter: lora")
    for list_key in ("datasets", "test_datasets"):
        for i, d in enumerate(getattr(c, list_key) or []):
            where = f"{list_key}[{i}]"
            if not d.path:
                raise ConfigError(f"{where}.path is required (a local file or folder, or a Hub dataset id)")
            if d.shards_idx is not None and d.shards is None:
                raise ConfigError(f"{where}.shards_idx needs {where}.shards")
            if d.shards is not None and d.shards_idx is not None and d.shards_idx >= d.shards:
                raise ConfigError(f"{where}.shards_idx: expected an index < shards ({d.shards}), got {d.shards_idx}")
            if d.shards is not None and d.preprocess_shards is not None:
                raise ConfigError(f"{where}: shards and preprocess_shards cannot both be set")


def _normalise(c: Config) -> Config:
    """Fill derived values the way axolotl's normalize_config does."""
    updates: dict[str, Any] = {}
    fields_set = c.model_fields_set
    micro = c.micro_batch_size or 1
    ga = c.gradient_accumulation_steps or 1
    if c.batch_size is not None and "gradient_accumulation_steps" not in fields_set:
        if c.batch_size % micro:
            raise ConfigError(
                f"batch_size: expected a multiple of micro_batch_size ({micro}), got {c.batch_size}"
            )
        ga = c.batch_size // micro
        updates["gradient_accumulation_steps"] = ga
    updates["micro_batch_size"] = micro
    updates["batch_size"] = micro * ga
    if c.eval_batch_size is None:
        updates["eval_batch_size"] = micro
    if c.pad_to_sequence_len is None and c.sample_packing:
        updates["pad_to_sequence_len"] = True
    if c.eval_sample_packing is None and c.sample_packing is not None:
        updates["eval_sample_packing"] = c.sample_packing
    if c.chat_template is None and c.chat_template_jinja:
        updates["chat_template"] = "jinja"
    beta = c.rl_beta if c.rl_beta is not None else (c.trl.beta if c.trl and c.trl.beta is not None else None)
    if beta is not None:
        updates["rl_beta"] = beta
        updates["trl"] = (c.trl or TRLConfig()).model_copy(update={"beta": beta})
    if c.type_of_model is None and c.model_type is not None:
        updates["type_of_model"] = c.model_type
    elif c.model_type is None and c.type_of_model is not None:
        updates["model_type"] = c.type_of_model
    if c.excess_length_strategy is None:
        updates["excess_length_strategy"] = "drop"
    if c.min_sample_len is None:
        updates["min_sample_len"] = 2
    if c.save_strategy is None and c.save_steps is not None:
        updates["save_strategy"] = "steps"
    if c.eval_strategy is None and c.eval_steps is not None:
        updates["eval_strategy"] = "steps"
    normalised = c.model_copy(update=updates)
    # model_copy skips validation; the fields it set are all of already-valid types
    object.__setattr__(normalised, "__pydantic_fields_set__", set(c.model_fields_set))
    return normalised


# ---------------------------------------------------------------------------------------------
# Loading, overrides, CLI
# ---------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        choices = sorted(p.name for p in path.iterdir() if p.suffix in (".yml", ".yaml"))
        raise ConfigError(f"{path} is a folder; pass one of its config files: {', '.join(choices) or '(none found)'}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    return data


def _flag_key(flag: str) -> str:
    """`--learning-rate` / `--learning_rate` -> `learning_rate`; `--trl.beta` -> `trl.beta`."""
    return flag.lstrip("-").replace("-", "_")


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt_is_index = parts[i + 1].isdigit()
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ConfigError(f"--{dotted}: {'.'.join(parts[:i])} has no entry {idx}")
            node = node[idx]
            continue
        if node.get(part) is None:
            node[part] = [] if nxt_is_index else {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--{dotted}: {'.'.join(parts[: i + 1])} is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx >= len(node):
            raise ConfigError(f"--{dotted}: no entry {idx}")
        node[idx] = value
    else:
        node[last] = value


def _is_bool_key(key: str) -> bool:
    field = Config.model_fields.get(key)
    return field is not None and "bool" in _type_name(field.annotation)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `--key value`, `--key=value`, `--kebab-key value` and `--a.b value` overrides.

    Values are YAML scalars (`1e-4`, `true`, `[a, b]`); a boolean key given alone means true;
    `None`/`null` values are dropped like axolotl does.
    """
    raw = copy.deepcopy(raw)
    items = list(overrides)
    i = 0
    while i < len(items):
        flag = items[i]
        if not flag.startswith("--") or flag == "--":
            raise ConfigError(f"unexpected argument {flag!r}; overrides look like --key value")
        if "=" in flag:
            name, text = flag.split("=", 1)
            i += 1
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            name, text = flag, items[i + 1]
            i += 2
        else:
            name, text = flag, None
            i += 1
        key = _flag_key(name)
        top = key.split(".")[0]
        if top not in Config.model_fields and top not in LEGACY_ALIASES:
            raise ConfigError(f"unknown option {name!r}{_closest(top, Config.model_fields)}")
        if text is None:
            if not _is_bool_key(top):
                raise ConfigError(f"{name} needs a value")
            value: Any = True
        else:
            value = _parse_scalar(text)
        if value is None:
            continue
        _set_dotted(raw, key, value)
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply CLI overrides, validate and normalise it."""
    raw = _read_yaml(Path(path))
    raw = apply_overrides(raw, overrides)
    return validate(raw)


def write_resolved_config(config: Config, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config (every key, defaults filled) to `output_dir/config.yaml`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "config.yaml"
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, target)
    return target


def help_text(description: str = "") -> str:
    """`--help`: every key with its type and default, by section, generated from the schema."""
    lines = [description, "", "usage: python -m programs.<name> --config x.yaml [--key value ...]", ""]
    lines.append("Every config key is also an option: --learning-rate 1e-4, --learning_rate=1e-4, --trl.beta 0.1")
    for title, section in SECTIONS:
        lines.append("")
        lines.append(f"{title}:")
        for name in section.__annotations__:
            field = Config.model_fields.get(name)
            if field is None:
                continue
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = f"default {value!r}"
            flag = "--" + name.replace("_", "-")
            note = "  [not supported yet]" if name in NOT_SUPPORTED_YET and name not in ("optimizer", "adapter", "gradient_checkpointing") else ""
            lines.append(f"  {flag:<40} {_field_type_name(field)}; {default}{note}")
    return "\n".join(lines)


def parse_cli(
    argv: list[str] | None,
    description: str = "",
    program_flags: dict[str, bool] | None = None,
) -> tuple[Config, list[str]]:
    """The config of a program run as `python -m programs.x --config x.yaml [--key value]...`.

    `program_flags` maps the program's own options (`--debug`) to whether they take a value;
    those are returned untouched in `extra_args`. Any other option must be a config key.
    `--help` prints the generated key list and exits. A first positional `x.yaml` is accepted
    too (axolotl's `preprocess config.yml`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    program_flags = dict(program_flags or {})
    if "-h" in argv or "--help" in argv:
        print(help_text(description))
        raise SystemExit(0)
    config_path: str | None = None
    overrides: list[str] = []
    extra: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name == "--config":
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
                i += 1
            elif i + 1 < len(argv):
                config_path = argv[i + 1]
                i += 2
            else:
                raise ConfigError("--config needs a path to a YAML file")
            continue
        if not arg.startswith("-") and config_path is None and i == 0:
            config_path = arg
            i += 1
            continue
        flag = "--" + name.lstrip("-").replace("_", "-")
        if flag in program_flags:
            takes_value = program_flags[flag]
            extra.append(arg)
            if takes_value and "=" not in arg:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value")
                extra.append(argv[i + 1])
                i += 1
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}")
        key = _flag_key(name).split(".")[0]
        if key not in Config.model_fields and key not in LEGACY_ALIASES:
            options = list(Config.model_fields) + [f.lstrip("-").replace("-", "_") for f in program_flags]
            raise ConfigError(f"unknown option {name!r}{_closest(key, options)}")
        overrides.append(arg)
        if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides.append(argv[i + 1])
            i += 1
        i += 1
    if config_path is None:
        raise ConfigError("--config is required: python -m programs.<name> --config x.yaml")
    return load_config(config_path, overrides), extra


# ---------------------------------------------------------------------------------------------
# What the rest of the project takes from the config
# ---------------------------------------------------------------------------------------------


def training_kind(config: Config) -> str:
    """"sft", an `rl:` value, "rm" (reward_model) or "prm" (process_reward_model)."""
    if config.reward_model:
        return "rm"
    if config.process_reward_model:
        return "prm"
    return config.rl or "sft"


def _read_jinja(value: str | None) -> str | None:
    """`chat_template_jinja` is a template string or a path to a .jinja file."""
    if not value:
        return value
    if "{" not in value and len(value) < 4096:
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise ConfigError(f"chat_template_jinja: {value!r} is neither a Jinja template nor an existing file")
    return value


def data_settings(config: Config) -> DataSettings:
    """The global settings prompt strategies and the length policy need."""
    kwargs = dict(
        sequence_len=config.sequence_len,
        train_on_inputs=bool(config.train_on_inputs),
        chat_template=config.chat_template,
        chat_template_jinja=_read_jinja(config.chat_template_jinja),
        chat_template_kwargs=dict(config.chat_template_kwargs or {}),
        default_system_message=config.default_system_message,
        eot_tokens=tuple(config.eot_tokens) if config.eot_tokens is not None else None,
        max_prompt_len=config.max_prompt_len,
        excess_length_strategy=config.excess_length_strategy or "drop",
        min_sample_len=config.min_sample_len if config.min_sample_len is not None else 2,
        seed=config.seed if config.seed is not None else 42,
    )
    known = {f.name for f in dataclasses.fields(DataSettings)}
    return DataSettings(**{k: v for k, v in kwargs.items() if k in known})
