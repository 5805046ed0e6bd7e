"""The schema: axolotl's YAML keys with their types and documented defaults, by section.

The sections only group `--help`; `Config` is all of them in one flat model. Validation and the
cross-key rules are in `validate.py`, what is refused or deliberately ignored in `unsupported.py`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from programs.optimizers import OPTIMIZERS
from pure.schedules import SCHEDULES


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
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = 8000
    vllm_server_timeout: int | None = None
    vllm_guided_decoding_regex: str | None = None
    reward_funcs: list[str] | None = None
    reward_weights: list[float] | None = None
    generation_batch_size: PosInt | None = None
    num_generations: PosInt | None = None
    log_completions: bool = False
    num_completions_to_print: int | None = None
    importance_sampling_level: Literal["sequence", "token"] | None = None
    sync_ref_model: bool = False
    ref_model_mixup_alpha: Ratio = 0.9
    ref_model_sync_steps: PosInt = 64
    # TRL: true = "group", false = "none"; or "batch"
    scale_rewards: bool | Literal["group", "batch", "none"] = True
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
    # TRL's GRPOConfig keys axolotl passes through: two-sided clip, SAPO temperatures, rollout reuse
    delta: PosFloat | None = None
    sapo_temperature_pos: PosFloat = 1.0
    sapo_temperature_neg: PosFloat = 1.05
    steps_per_generation: PosInt | None = None
    use_liger_loss: bool | None = None
    # GRPO: grpo | bnpo | dr_grpo | dapo | cispo | sapo; DPO (rl: dpo): one pair loss type or a list, weighted by loss_weights
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
    device: str = "auto"
    tensor_parallel_size: PosInt | None = None
    data_parallel_size: PosInt | None = None
    gpu_memory_utilization: Ratio = 0.9
    dtype: str = "auto"
    max_model_len: PosInt | None = None
    enable_prefix_caching: bool | None = None
    host: str = "0.0.0.0"
    port: int = 8000
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
    quantize_embedding: bool = False
    group_size: PosInt = 32
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
    tokenizer_save_jinja_files: bool = True
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
    mean_resizing_embeddings: bool = False
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
    experimental_skip_move_to_device: bool = True
    use_kernels: bool | None = None
    use_scattermoe: bool | None = None
    use_sonicmoe: bool | None = None
    llama4_linearized_experts: bool | None = None
    is_falcon_derived_model: bool | None = None
    is_llama_derived_model: bool | None = None
    is_mistral_derived_model: bool | None = None
    is_qwen_derived_model: bool | None = None
    strict: bool = False
    axolotl_config_path: str | None = None
    test_value: Any = None  # a stray key of one axolotl example (see IGNORED_KEYS)


class AdapterKeys(BaseModel):
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    bnb_config_kwargs: dict[str, Any] | None = None
    gptq: bool | None = None
    adapter: Literal["lora", "qlora", "llama-adapter"] | None = None
    lora_model_dir: str | None = None
    lora_r: PosInt = 8
    lora_alpha: PosFloat = 16
    lora_dropout: Prob = 0.0
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
    qlora_sharded_model_loading: bool = False
    lora_on_cpu: bool | None = None
    merge_lora: bool | None = None
    merge_method: Literal["legacy", "memory_efficient"] = "memory_efficient"
    loraplus_lr_ratio: PosFloat | None = None
    loraplus_lr_embedding: NonNegFloat = 1e-6
    relora: bool | None = None
    relora_prune_ratio: Ratio | None = None
    relora_cpu_offload: bool | None = None
    jagged_restart_steps: PosInt | None = None
    jagged_restart_warmup_steps: NonNegInt | None = None
    jagged_restart_anneal_steps: NonNegInt | None = None
    lisa_n_layers: PosInt | None = None
    lisa_step_interval: PosInt | None = None
    lisa_layers_attribute: str = "model.layers"


class DataKeys(BaseModel):
    datasets: Annotated[list[DatasetConfig], Field(min_length=1)] | None = None
    test_datasets: Annotated[list[DatasetConfig], Field(min_length=1)] | None = None
    val_set_size: Annotated[int, Field(ge=0)] | NonNegFloat = 0.0
    dataset_prepared_path: str | None = None
    dataset_shard_num: PosInt | None = None
    dataset_shard_idx: NonNegInt | None = None
    skip_prepare_dataset: bool = False
    num_dataset_shards_to_save: PosInt | None = None
    pretraining_dataset: list[dict[str, Any]] | None = None
    shuffle_merged_datasets: bool = True
    shuffle_before_merging_datasets: bool = False
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
    streaming_multipack_buffer_size: PosInt = 10000
    sequence_len: Annotated[int, Field(ge=2)] = 512
    excess_length_strategy: Literal["drop", "truncate", "raise"] = "drop"
    min_sample_len: NonNegInt = 2
    eval_sequence_len: Annotated[int, Field(ge=2)] | None = None
    max_prompt_len: PosInt | None = None
    train_on_inputs: bool = False
    is_preprocess: bool | None = None
    preprocess_iterable: bool | None = None
    total_num_tokens: int | None = None
    total_supervised_tokens: int | None = None


class PackingKeys(BaseModel):
    sample_packing: bool | None = None
    sample_packing_group_size: PosInt = 100000
    sample_packing_bin_size: PosInt = 200
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
    pretrain_multipack_attn: bool = True
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
# the names puretune runs: those `programs.optimizers` builds
SUPPORTED_OPTIMIZERS = tuple(name for name in OPTIMIZER_NAMES if name in OPTIMIZERS)
# Every scheduler name axolotl accepts (so a typo gets the closest one); puretune runs those of
# `pure.schedules.SCHEDULES` and refuses the others at validation.
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "one_cycle", "rex",
)


SUPPORTED_SCHEDULERS = tuple(name for name in LR_SCHEDULERS if name in SCHEDULES)


class OptimKeys(BaseModel):
    micro_batch_size: PosInt = 1
    gradient_accumulation_steps: PosInt = 1
    batch_size: PosInt | None = None
    eval_batch_size: PosInt | None = None
    auto_find_batch_size: bool | None = None
    num_epochs: PosFloat = 1.0
    max_steps: PosInt | None = None
    learning_rate: PosFloat
    embedding_lr: PosFloat | None = None
    embedding_lr_scale: PosFloat | None = None
    weight_decay: NonNegFloat = 0.0
    optimizer: Literal[OPTIMIZER_NAMES] = "adamw_torch_fused"  # type: ignore[valid-type]
    optim_args: str | dict[str, Any] | None = None
    optim_target_modules: list[str] | Literal["all_linear"] | None = None
    torchdistx_path: str | None = None
    lr_scheduler: Literal[LR_SCHEDULERS] = "cosine"  # type: ignore[valid-type]
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
    dion_rank_fraction: float = 1.0
    dion_rank_multiple_of: int = 1
    max_grad_norm: NonNegFloat | None = None
    gc_steps: int | None = None
    loss_watchdog_threshold: PosFloat | None = None
    loss_watchdog_patience: PosInt = 3
    neftune_noise_alpha: NonNegFloat | None = None
    noisy_embedding_alpha: NonNegFloat | None = None
    use_eaft: bool | None = None
    eaft_alpha: float = 1.0
    eaft_k: PosInt = 20
    chunked_cross_entropy: bool | None = None
    chunked_cross_entropy_num_chunks: PosInt | None = None
    tiled_mlp: bool | None = None
    tiled_mlp_num_shards: PosInt | None = None
    tiled_mlp_use_original_mlp: bool = True


class PrecisionKeys(BaseModel):
    bf16: Literal["auto", "full"] | bool = "auto"
    fp16: bool | None = None
    fp8: bool | None = None
    fp8_enable_fsdp_float8_all_gather: bool | None = None
    bfloat16: bool | None = None
    float16: bool | None = None
    tf32: Literal["auto"] | bool = "auto"
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
    gradient_checkpointing: Literal["offload", "offload_disk"] | bool = False
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    activation_offloading: Literal["legacy", "disk"] | bool = False
    layer_offloading: bool = False


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
    load_best_model_at_end: bool = False
    generate_samples: bool = False
    num_generation_samples: PosInt = 3
    generation_max_new_tokens: PosInt = 50
    generation_temperature: NonNegFloat = 0.7
    generation_top_p: Ratio | None = None
    generation_top_k: PosInt | None = None
    generation_prompt_ratio: Ratio = 0.5
    generation_do_sample: bool = True


class SaveKeys(BaseModel):
    output_dir: str = "./model-out"
    save_steps: PosInt | PosFloat | None = None
    saves_per_epoch: NonNegInt | None = None
    save_strategy: Literal["no", "epoch", "best", "steps"] | None = None
    save_total_limit: PosInt | None = None
    save_first_step: bool | None = None
    save_only_model: bool = False
    save_safetensors: bool = True
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
    use_otel_metrics: bool = False
    otel_metrics_host: str = "localhost"
    otel_metrics_port: int = 8000
    profiler_steps: PosInt | None = None
    profiler_steps_start: NonNegInt = 0
    include_tokens_per_second: bool | None = None
    include_tkps: bool = True
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
    seed: int = 42
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
        from programs.config.validate import validate

        return validate(raw)

    def to_dict(self) -> dict[str, Any]:
        """Every key with its resolved value (defaults filled), as plain YAML-friendly data."""
        return self.model_dump(mode="json")
