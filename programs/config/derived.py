"""What the rest of the project takes from the config: plain values, not the config object."""
from __future__ import annotations

import dataclasses

from programs.config.schema import Config, ConfigError
from pure.data.settings import DataSettings


def training_kind(config: Config) -> str:
    """"sft", an `rl:` value, "rm" (reward_model) or "prm" (process_reward_model)."""
    if config.reward_model:
        return "rm"
    if config.process_reward_model:
        return "prm"
    return config.rl or "sft"


def _read_jinja(value: str | None) -> str | None:
    """`chat_template_jinja`: a template string or a path to a .jinja file (`backends.templates`)."""
    from backends.templates import read_jinja

    if not value:
        return value
    try:
        return read_jinja(value, "chat_template_jinja")
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
        excess_length_strategy=config.excess_length_strategy,
        min_sample_len=config.min_sample_len,
        seed=config.seed,
    )
    known = {f.name for f in dataclasses.fields(DataSettings)}
    return DataSettings(**{k: v for k, v in kwargs.items() if k in known})


# config key -> the option of `pure.schedules.build_schedule` it sets (None / false: not set)
SCHEDULE_KEYS = {
    "lr_quadratic_warmup": "quadratic_warmup",
    "lr_div_factor": "lr_div_factor",
    "cosine_min_lr_ratio": "min_lr_ratio",
    "cosine_constant_lr_ratio": "constant_lr_ratio",
}


def schedule_settings(config: Config) -> dict:
    """`build_schedule`'s arguments but `total_steps` (known once the data is): the scheduler, the
    peak lr, the warmup, and the options set by the config keys and `lr_scheduler_kwargs`.
    A key the schedule does not take is a ConfigError naming it (checked at validation)."""
    from pure.schedules import schedule_options

    accepted = schedule_options(config.lr_scheduler)
    options = {}
    for key, option in SCHEDULE_KEYS.items():
        value = getattr(config, key)
        if value is None or value is False:
            continue
        if option not in accepted:
            raise ConfigError(f"{key} has no effect with lr_scheduler: {config.lr_scheduler}; "
                              f"it applies to {', '.join(_schedules_taking(option))}")
        options[option] = value
    for option, value in (config.lr_scheduler_kwargs or {}).items():
        if option not in accepted:
            raise ConfigError(f"lr_scheduler_kwargs.{option}: lr_scheduler {config.lr_scheduler} takes "
                              f"{', '.join(accepted) or 'no options'}")
        if option in options:
            raise ConfigError(f"lr_scheduler_kwargs.{option} repeats a config key; set it once")
        options[option] = value
    return dict(name=config.lr_scheduler, learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                warmup_ratio=config.warmup_ratio, **options)


def _schedules_taking(option: str) -> list[str]:
    from pure.schedules import SCHEDULES, schedule_options

    return [name for name in SCHEDULES if option in schedule_options(name)]


def optimizer_options(config: Config) -> dict:
    """`optim_args` as the keyword arguments of the optimizer the config names; an option that
    optimizer does not take is a ConfigError naming it (checked at validation)."""
    from programs import optimizers

    try:
        return optimizers.optimizer_options(config.optimizer, config.optim_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def precision_plan(config: Config, device="cpu"):
    """`backends.precision.resolve_precision` over the config's precision keys, for `device`."""
    from backends.precision import resolve_precision

    return resolve_precision(bf16=config.bf16, fp16=config.fp16, tf32=config.tf32, bfloat16=config.bfloat16,
                             float16=config.float16, float32=config.float32, device=device)


# bnb_config_kwargs (transformers' BitsAndBytesConfig arguments) -> what puretune does with each
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "float32": "float32", "fp32": "float32"}


def quantization_spec(config: Config):
    """The `kernels.quantized.QuantizationSpec` of the frozen base, or None for a dense base.

    `load_in_4bit` (QLoRA: NF4 with double-quantised absmax by default, as axolotl's qlora loader
    sets), `load_in_8bit` (LLM.int8's weight format), or `peft.loftq_config` alone (LoftQ quantises
    the base itself: PEFT's NF4 without double quantisation, or int8), with `bnb_config_kwargs`
    overriding the 4-bit settings. Each key of `bnb_config_kwargs` takes effect or is a ConfigError."""
    import torch

    from kernels.quantized import QuantizationSpec

    loftq = config.peft.loftq_config if config.peft is not None else None
    kwargs = dict(config.bnb_config_kwargs or {})
    if config.load_in_4bit and config.load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit cannot both be true; choose one")
    if config.adapter == "qlora" and not config.load_in_4bit:
        raise ConfigError("adapter: qlora needs load_in_4bit: true (for an 8-bit base use adapter: lora with load_in_8bit: true)")
    if (config.load_in_4bit or config.load_in_8bit) and config.adapter not in ("lora", "qlora"):
        which = "load_in_4bit" if config.load_in_4bit else "load_in_8bit"
        raise ConfigError(f"{which} quantises the frozen base, so it needs an adapter to train "
                          "(adapter: qlora for 4-bit, adapter: lora for 8-bit)")
    if loftq is not None:
        if config.adapter not in ("lora", "qlora"):
            raise ConfigError("peft.loftq_config initialises LoRA factors; it needs adapter: lora or qlora")
        if loftq.loftq_bits not in (4, 8):
            raise ConfigError(f"peft.loftq_config.loftq_bits: expected 4 or 8, got {loftq.loftq_bits}")
        base_bits = 4 if config.load_in_4bit else 8 if config.load_in_8bit else None
        if base_bits is not None and loftq.loftq_bits != base_bits:
            raise ConfigError(f"peft.loftq_config.loftq_bits: {loftq.loftq_bits} but the base is loaded in "
                              f"{base_bits} bits; LoftQ fits the residual of the base's own quantisation")
    if kwargs and not config.load_in_4bit:
        raise ConfigError("bnb_config_kwargs sets the 4-bit quantisation; it needs load_in_4bit: true")
    if config.load_in_4bit:
        bits, quant_type, double_quant = 4, "nf4", True
    elif config.load_in_8bit:
        bits, quant_type, double_quant = 8, "nf4", False
    elif loftq is not None:
        bits, quant_type, double_quant = loftq.loftq_bits, "nf4", False
    else:
        return None
    quant_type = kwargs.pop("bnb_4bit_quant_type", quant_type)
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"bnb_config_kwargs.bnb_4bit_quant_type: expected 'nf4' or 'fp4', got {quant_type!r}")
    double_quant = kwargs.pop("bnb_4bit_use_double_quant", double_quant)
    if not isinstance(double_quant, bool):
        raise ConfigError(f"bnb_config_kwargs.bnb_4bit_use_double_quant: expected true or false, got {double_quant!r}")
    compute_dtype = None
    if "bnb_4bit_compute_dtype" in kwargs:
        name = str(kwargs.pop("bnb_4bit_compute_dtype")).removeprefix("torch.")
        if name not in _DTYPES:
            raise ConfigError(f"bnb_config_kwargs.bnb_4bit_compute_dtype: expected one of bfloat16, float16, "
                              f"float32, got {name!r}")
        compute_dtype = getattr(torch, _DTYPES[name])
    storage = str(kwargs.pop("bnb_4bit_quant_storage", "uint8")).removeprefix("torch.")
    if storage != "uint8":
        raise ConfigError(f"bnb_config_kwargs.bnb_4bit_quant_storage: {storage} is not supported yet: the "
                          "storage dtype matters only to FSDP's flattening of packed weights; puretune keeps uint8")
    skip = kwargs.pop("llm_int8_skip_modules", None) or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ConfigError(f"bnb_config_kwargs.llm_int8_skip_modules: expected a list of module names, got {skip!r}")
    if kwargs.pop("llm_int8_has_fp16_weight", False):
        raise ConfigError("bnb_config_kwargs.llm_int8_has_fp16_weight: true is not supported: the quantised "
                          "base is frozen here (train an adapter on it)")
    threshold = kwargs.pop("llm_int8_threshold", 6.0)
    if threshold != 6.0:
        raise ConfigError("bnb_config_kwargs.llm_int8_threshold has no effect in puretune: the base is "
                          "multiplied dequantised, with no int8 activations and so no outlier threshold")
    for key in ("load_in_4bit", "load_in_8bit"):
        if key in kwargs:
            raise ConfigError(f"bnb_config_kwargs.{key}: set {key} at the top level of the config")
    if kwargs:
        raise ConfigError(f"bnb_config_kwargs: unknown option {sorted(kwargs)[0]!r}; accepted: bnb_4bit_quant_type, "
                          "bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, bnb_4bit_quant_storage, "
                          "llm_int8_skip_modules, llm_int8_threshold, llm_int8_has_fp16_weight")
    keep_dense = tuple(skip) + tuple(config.lora_modules_to_save or ())
    return QuantizationSpec(bits=bits, quant_type=quant_type, double_quant=double_quant,
                            compute_dtype=compute_dtype, skip=keep_dense)


@dataclasses.dataclass(frozen=True)
class GrpoBatching:
    """How GRPO's rollouts and optimizer steps line up, as TRL's GRPOConfig derives them. Sizes count
    completions: `micro_batch_size` completions per micro-batch, `generation_batch_size` =
    micro_batch_size x steps_per_generation per generation (`prompts_per_generation` x num_generations),
    reused for `num_iterations` passes; old log-probs are stored when the policy moves in between."""

    num_generations: int
    steps_per_generation: int
    generation_batch_size: int
    num_iterations: int
    gradient_accumulation_steps: int

    @property
    def prompts_per_generation(self) -> int:
        return self.generation_batch_size // self.num_generations

    @property
    def slots_per_generation(self) -> int:
        """Micro-batches drawn from one generation: each of its slices, once per iteration."""
        return self.steps_per_generation * self.num_iterations

    @property
    def stores_old_logps(self) -> bool:
        """TRL's rule: unless a generation is used up within one optimizer step, the policy that
        sampled it is gone by the time later slices train, so its log-probs are stored."""
        return self.gradient_accumulation_steps % self.slots_per_generation != 0


def grpo_batching(config: Config) -> GrpoBatching:
    """GRPO's batch sizes from `micro_batch_size`, `gradient_accumulation_steps` and `trl.*`, with
    TRL's checks made up front (one process)."""
    trl = config.trl
    num_generations = trl.num_generations or 8
    if num_generations < 2:
        raise ConfigError(f"trl.num_generations: GRPO needs at least 2 completions per prompt to compare "
                          f"them, got {num_generations}")
    mbs, accumulation = config.micro_batch_size, config.gradient_accumulation_steps
    if trl.generation_batch_size is not None and trl.steps_per_generation is not None:
        raise ConfigError("trl.generation_batch_size and trl.steps_per_generation cannot both be set; use one of them")
    if trl.generation_batch_size is not None:
        if trl.generation_batch_size % mbs:
            raise ConfigError(f"trl.generation_batch_size ({trl.generation_batch_size}) must be a multiple of "
                              f"micro_batch_size ({mbs}): it is split into micro-batches of completions")
        steps = trl.generation_batch_size // mbs
    else:
        steps = trl.steps_per_generation or accumulation
    size = mbs * steps
    if size % num_generations:
        where = ("trl.generation_batch_size" if trl.generation_batch_size is not None else
                 f"micro_batch_size ({mbs}) x {'trl.steps_per_generation' if trl.steps_per_generation else 'gradient_accumulation_steps'} ({steps})")
        raise ConfigError(f"the generation batch of {size} completions ({where}) must be divisible by "
                          f"trl.num_generations ({num_generations}), so that it holds whole prompt groups")
    return GrpoBatching(num_generations, steps, size, trl.num_iterations or 1, accumulation)


def grpo_beta(config: Config) -> float:
    """GRPO's KL coefficient: `trl.beta` (or `rl_beta`); TRL's default 0 runs no reference model."""
    if config.rl_beta is not None:
        return float(config.rl_beta)
    return float(config.trl.beta) if config.trl.beta is not None else 0.0


def stale_rollouts(config: Config) -> bool:
    """Whether GRPO's rollouts may come from another policy than the step's: sampled by vLLM
    (`trl.use_vllm`) or ahead of time by the async producer (`trl.async_prefetch`)."""
    return bool(config.trl.use_vllm) or bool(config.trl.async_prefetch)


# ---- distributed: axolotl's DDP / FSDP / DeepSpeed keys as one plan ---------------------------------

STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT")


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """How a multi-process run (torchrun) shards the train state, read from axolotl's keys.

    `strategy` is "ddp" (every rank holds the whole state; the default), "fsdp2" or "deepspeed"
    (ZeRO, run as the same DTensor sharding: stage 1 shards the optimizer state, 2 also the gradients,
    3 also the params). Sizes are the config's (None: unset); whether they divide the world size is
    `backends.distributed.mesh_sizes`'s check at launch. `lines` say how the keys were read, one line
    each, for the run to print."""

    strategy: str
    dp_shard: int | None = None
    dp_replicate: int | None = None
    tp: int | None = None
    cp: int | None = None
    shard_params: bool = False
    shard_grads: bool = False
    shard_optimizer: bool = False
    reshard_after_forward: bool = False
    offload_params: bool = False
    offload_optimizer: bool = False
    offload_pin_memory: bool = True
    activation_checkpointing: bool = False
    cpu_ram_efficient_loading: bool = False
    state_dict_type: str = "FULL_STATE_DICT"
    final_state_dict_type: str = "FULL_STATE_DICT"
    timeout_s: int | None = None
    lines: tuple[str, ...] = ()


# ZeRO stage -> (shard_params, shard_grads, shard_optimizer); FSDP is stage 3, or 2 without resharding
_ZERO_STAGES = {0: (False, False, False), 1: (False, False, True), 2: (False, True, True), 3: (True, True, True)}

# FSDP1's fsdp_sharding_strategy -> reshard_after_forward (None: nothing is sharded, i.e. DDP)
_SHARDING_STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "HYBRID_SHARD": True, "NO_SHARD": None}

# fsdp_config keys under their FSDP2 names -> the type they take
_FSDP2_KEYS = {
    "offload_params": bool, "reshard_after_forward": bool, "state_dict_type": str, "final_state_dict_type": str,
    "cpu_ram_efficient_loading": bool, "activation_checkpointing": bool, "transformer_layer_cls_to_wrap": str,
    "auto_wrap_policy": str, "cpu_offload_pin_memory": bool, "mixed_precision_policy": (str, dict),
    "min_num_params": int, "version": int,
}
# FSDP1 keys FSDP2 dropped (multi-gpu.md's mapping table: REMOVED)
_FSDP1_REMOVED = ("backward_prefetch_policy", "backward_prefetch", "forward_prefetch", "sync_module_states",
                  "use_orig_params")
_WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP")

# the legacy `fsdp:` list -> (fsdp_config key, value) it stands for
_FSDP_LIST = {"full_shard": ("sharding_strategy", "FULL_SHARD"), "shard_grad_op": ("sharding_strategy", "SHARD_GRAD_OP"),
              "hybrid_shard": ("sharding_strategy", "HYBRID_SHARD"), "no_shard": ("sharding_strategy", "NO_SHARD"),
              "offload": ("offload_params", True), "auto_wrap": ("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")}

# DeepSpeed keys the config's own keys set: deepspeed key -> the config key that rules ("auto" is silent)
_DEEPSPEED_FROM_CONFIG = {"train_batch_size": "micro_batch_size x gradient_accumulation_steps x world size",
                          "train_micro_batch_size_per_gpu": "micro_batch_size",
                          "gradient_accumulation_steps": "gradient_accumulation_steps",
                          "gradient_clipping": "max_grad_norm"}
_DEEPSPEED_PRECISION = ("bf16", "bfloat16", "fp16", "amp")
_ZERO_READ = ("stage", "offload_param", "offload_optimizer", "gather_16bit_weights_on_model_save",
              "stage3_gather_16bit_weights_on_model_save")


def sharding_plan(config: Config) -> ShardingPlan:
    """The `ShardingPlan` of the config's distributed keys (multi-gpu.md, nd_parallelism.md): DDP
    unless `fsdp_config` / `fsdp` or `deepspeed` is set, which exclude each other. A key or value
    with no meaning here is a ConfigError naming it; one with no effect here gets a line saying so."""
    sizes = dict(dp_shard=_positive(config.dp_shard_size, "dp_shard_size"),
                 dp_replicate=_positive(config.dp_replicate_size, "dp_replicate_size"),
                 tp=_positive(config.tensor_parallel_size, "tensor_parallel_size"),
                 cp=_positive(config.context_parallel_size, "context_parallel_size"))
    timeout_s = _positive(config.ddp_timeout, "ddp_timeout")
    fsdp_set = [key for key in ("fsdp_config", "fsdp") if getattr(config, key) not in (None, [])]  # {}: FSDP, defaults
    if config.deepspeed and fsdp_set:
        raise ConfigError(f"deepspeed and {fsdp_set[0]} cannot both be set: DeepSpeed and FSDP are exclusive "
                          "sharding strategies; choose one")
    if config.fsdp_version is not None and not fsdp_set:
        raise ConfigError(f"fsdp_version: {config.fsdp_version} is set but FSDP is not: add fsdp_config")
    if config.fsdp_final_state_dict_type is not None and not fsdp_set:
        raise ConfigError("fsdp_final_state_dict_type applies to FSDP; this config sets no fsdp_config")
    if fsdp_set:
        plan = _fsdp_plan(config)
    elif config.deepspeed:
        plan = _deepspeed_plan(config.deepspeed)
    else:
        plan = ShardingPlan("ddp")
    if plan.strategy != "fsdp2" and (sizes["dp_shard"] or 1) > 1:
        raise ConfigError(f"dp_shard_size: {sizes['dp_shard']} shards the model with FSDP, but this config runs "
                          f"{plan.strategy}; set fsdp_version: 2 and fsdp_config")
    if plan.strategy == "ddp" and max(sizes["tp"] or 1, sizes["cp"] or 1) > 1:
        raise ConfigError("tensor_parallel_size / context_parallel_size need FSDP (dp_shard_size), not DDP "
                          "(nd_parallelism.md: DDP + TP/CP is not supported)")
    return dataclasses.replace(plan, **sizes, timeout_s=timeout_s)


def _positive(value, key: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _fsdp_plan(config: Config) -> ShardingPlan:
    """FSDP2 from `fsdp_config` (FSDP2 names, or FSDP1's `fsdp_`-prefixed ones translated) and the
    legacy `fsdp:` list."""
    version = config.fsdp_version
    options, renamed, removed = {}, [], []

    def put(key: str, value, given_as: str) -> None:
        if key in options and options[key][0] != value:
            raise ConfigError(f"{given_as} repeats {options[key][1]} with another value; set it once")
        options[key] = (value, given_as)

    for key, value in (config.fsdp_config or {}).items():
        name = key.removeprefix("fsdp_")
        where = f"fsdp_config.{key}"
        if name in _FSDP1_REMOVED:
            removed.append(key)
            continue
        if name == "sharding_strategy":
            if value not in _SHARDING_STRATEGIES:
                raise ConfigError(f"{where}: expected one of {', '.join(_SHARDING_STRATEGIES)}, got {value!r}")
            put("sharding_strategy", value, where)
            continue
        if name not in _FSDP2_KEYS:
            raise ConfigError(f"{where}: unknown FSDP option; accepted (FSDP2 names, or FSDP1's with the fsdp_ "
                              f"prefix): {', '.join(sorted(_FSDP2_KEYS))}, sharding_strategy")
        if not isinstance(value, _FSDP2_KEYS[name]) or (_FSDP2_KEYS[name] is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {_type_words(_FSDP2_KEYS[name])}, got {value!r}")
        if name != key:
            renamed.append(f"{key} -> {name}")
        put(name, value, where)
    for i, item in enumerate(config.fsdp or []):
        if item not in _FSDP_LIST:
            raise ConfigError(f"fsdp[{i}]: expected one of {', '.join(_FSDP_LIST)}, got {item!r}")
        put(*_FSDP_LIST[item], f"fsdp[{i}] ({item})")
    if config.fsdp_final_state_dict_type is not None:
        put("final_state_dict_type", config.fsdp_final_state_dict_type, "fsdp_final_state_dict_type")
    value = {key: given[0] for key, given in options.items()}

    if "version" in value:
        if version is not None and value["version"] != version:
            raise ConfigError(f"fsdp_config.version: {value['version']} but fsdp_version: {version}; set it once")
        version = value.pop("version")
    if version not in (None, 1, 2):
        raise ConfigError(f"fsdp_version: expected 1 or 2, got {version!r}")
    lines = []
    if version != 2:
        lines.append(f"fsdp_version {version or 'unset'}: FSDP1's keys are read as FSDP2's (multi-gpu.md's mapping); "
                     "puretune shards FSDP2-style, with DTensors")
    if config.fsdp:
        lines.append(f"fsdp: {list(config.fsdp)} (the deprecated list) read as fsdp_config options")
    if renamed:
        lines.append(f"fsdp_config: FSDP1 names read as FSDP2's: {', '.join(renamed)}")
    lines += [f"fsdp_config.{key}: removed in FSDP2; no effect" for key in removed]

    strategy = value.pop("sharding_strategy", None)
    if strategy is not None and "reshard_after_forward" in value:
        raise ConfigError(f"{options['sharding_strategy'][1]} and {options['reshard_after_forward'][1]} both set "
                          "the resharding; keep reshard_after_forward (FSDP2's name)")
    reshard = value.get("reshard_after_forward", _SHARDING_STRATEGIES.get(strategy, True))
    if strategy is not None:
        lines.append(f"{options['sharding_strategy'][1]}: {strategy} read as " + (
            "no sharding: run as DDP" if reshard is None else f"reshard_after_forward: {str(reshard).lower()}"))
    if strategy == "HYBRID_SHARD":
        lines.append("HYBRID_SHARD is HSDP: set dp_shard_size (within a node) and dp_replicate_size (across nodes); "
                     "unset, the whole world shards")
    for key in ("state_dict_type", "final_state_dict_type"):
        if value.get(key, "FULL_STATE_DICT") not in STATE_DICT_TYPES:
            raise ConfigError(f"{options[key][1]}: expected one of {', '.join(STATE_DICT_TYPES)}, got {value[key]!r}")
        if value.get(key) == "LOCAL_STATE_DICT":
            value[key] = "SHARDED_STATE_DICT"
            lines.append(f"{options[key][1]}: LOCAL_STATE_DICT written as SHARDED_STATE_DICT (each rank its shards, "
                         "readable at any world size)")
    if value.get("auto_wrap_policy", _WRAP_POLICIES[0]) not in _WRAP_POLICIES:
        raise ConfigError(f"{options['auto_wrap_policy'][1]}: expected one of {', '.join(_WRAP_POLICIES)}, "
                          f"got {value['auto_wrap_policy']!r}")
    wrap = [options[key][1] for key in ("auto_wrap_policy", "transformer_layer_cls_to_wrap", "min_num_params")
            if key in options]
    if wrap:
        lines.append(f"{', '.join(wrap)}: no effect; every parameter tensor is sharded on its own (DTensor "
                     "Shard(0)), so there are no wrapped units to choose")
    if "mixed_precision_policy" in value:
        lines.append(f"{options['mixed_precision_policy'][1]}: no effect; the precision comes from the config's "
                     "bf16 / fp16 keys")
    offload = bool(value.get("offload_params", False))
    if "cpu_offload_pin_memory" in value and not offload:
        lines.append(f"{options['cpu_offload_pin_memory'][1]}: no effect without offload_params: true")
    if reshard is None:
        return ShardingPlan("ddp", lines=tuple(lines))
    lines.insert(0, f"{'fsdp_config' if config.fsdp_config is not None else 'fsdp'}: run as DTensor sharding of params, gradients and optimizer state (FSDP2, "
                    f"reshard_after_forward: {str(reshard).lower()})")
    return ShardingPlan(
        "fsdp2", shard_params=True, shard_grads=True, shard_optimizer=True, reshard_after_forward=reshard,
        offload_params=offload, offload_optimizer=offload,  # FSDP2's CPU offload moves the optimizer step too
        offload_pin_memory=value.get("cpu_offload_pin_memory", True),
        activation_checkpointing=value.get("activation_checkpointing", False),
        cpu_ram_efficient_loading=value.get("cpu_ram_efficient_loading", False),
        state_dict_type=value.get("state_dict_type", "FULL_STATE_DICT"),
        final_state_dict_type=value.get("final_state_dict_type", "FULL_STATE_DICT"), lines=tuple(lines))


def _type_words(kind) -> str:
    names = {bool: "true or false", str: "a string", int: "an integer", dict: "a mapping"}
    return " or ".join(names[k] for k in (kind if isinstance(kind, tuple) else (kind,)))


def _read_deepspeed(value) -> tuple[str, dict]:
    """(how to name it, the DeepSpeed config): `deepspeed:` is a JSON file's path (relative to the
    working directory) or the config itself as a mapping."""
    import json
    from pathlib import Path

    if isinstance(value, dict):
        return "deepspeed", value
    path = Path(value)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"deepspeed: {value} not found (a relative path is read from the working directory "
                          f"{Path.cwd()})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"deepspeed: {value} is not a readable JSON file ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {value} must hold a JSON object, got {type(ds).__name__}")
    return f"deepspeed {path.name}", ds


def _offloaded(zero: dict, key: str, where: str) -> tuple[bool, bool | None]:
    """(whether zero_optimization.`key` offloads to the CPU, its pin_memory). NVMe offload is refused:
    nothing here swaps to disk, and dropping it would lose the memory it was meant to free."""
    block = zero.get(key) or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: zero_optimization.{key}: expected a mapping, got {block!r}")
    device = block.get("device", "none")
    if device == "nvme":
        raise ConfigError(f"{where}: zero_optimization.{key}.device: nvme is not supported by puretune "
                          "(no disk offload); use cpu or none")
    if device not in ("cpu", "none", None):
        raise ConfigError(f"{where}: zero_optimization.{key}.device: expected cpu, nvme or none, got {device!r}")
    return device == "cpu", block.get("pin_memory")


def _deepspeed_plan(value) -> ShardingPlan:
    """ZeRO stage 0-3 as DTensor sharding, with its CPU offload and final export."""
    where, ds = _read_deepspeed(value)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{where}: its {key} block would replace the config's; set optimizer / learning_rate / "
                              "lr_scheduler in the config instead")
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization: expected a mapping, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in _ZERO_STAGES or isinstance(stage, bool):
        raise ConfigError(f"{where}: zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}")
    shard_params, shard_grads, shard_optimizer = _ZERO_STAGES[stage]
    offload_params, pin_params = _offloaded(zero, "offload_param", where)
    offload_optimizer, pin_optimizer = _offloaded(zero, "offload_optimizer", where)
    sharded = [name for name, on in (("params", shard_params), ("gradients", shard_grads),
                                     ("optimizer state", shard_optimizer)) if on]
    lines = [f"{where}: run as " + (f"DTensor sharding of {_and(sharded)} (ZeRO-{stage})" if sharded else
                                    "DDP (ZeRO-0 shards nothing)")]
    if offload_params and stage < 3:
        lines.append(f"{where}: zero_optimization.offload_param: no effect below ZeRO-3 (the params are not "
                     "sharded), as in DeepSpeed")
        offload_params = False
    if offload_optimizer and stage < 1:
        lines.append(f"{where}: zero_optimization.offload_optimizer: no effect at ZeRO-0, as in DeepSpeed")
        offload_optimizer = False
    gather = zero.get("stage3_gather_16bit_weights_on_model_save", zero.get("gather_16bit_weights_on_model_save"))
    final = "SHARDED_STATE_DICT" if gather is False and stage == 3 else "FULL_STATE_DICT"
    if final == "SHARDED_STATE_DICT":
        lines.append(f"{where}: gather_16bit_weights_on_model_save: false, so the final model is saved sharded")
    tuning = [key for key in zero if key not in _ZERO_READ]
    if tuning:
        lines.append(f"{where}: zero_optimization.{', '.join(tuning)}: DeepSpeed's bucket and communication "
                     "tuning; no effect (DTensor collectives run per tensor)")
    precision = [key for key in _DEEPSPEED_PRECISION if key in ds]
    if precision:
        lines.append(f"{where}: {' / '.join(precision)}: no effect; the precision comes from the config's "
                     "bf16 / fp16 keys")
    lines += [f"{where}: {key}: {ds[key]!r} is not read; {rule} sets it" for key, rule in _DEEPSPEED_FROM_CONFIG.items()
              if key in ds and ds[key] != "auto"]
    other = [key for key in ds if key not in ("zero_optimization", *_DEEPSPEED_PRECISION, *_DEEPSPEED_FROM_CONFIG)]
    if other:
        lines.append(f"{where}: {', '.join(other)}: DeepSpeed engine options; no effect here")
    pin = [p for p in (pin_params if offload_params else None, pin_optimizer if offload_optimizer else None)
           if p is not None]
    return ShardingPlan(
        "deepspeed", shard_params=shard_params, shard_grads=shard_grads, shard_optimizer=shard_optimizer,
        reshard_after_forward=stage == 3, offload_params=offload_params, offload_optimizer=offload_optimizer,
        offload_pin_memory=all(pin), state_dict_type="SHARDED_STATE_DICT" if sharded else "FULL_STATE_DICT",
        final_state_dict_type=final, lines=tuple(lines))


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
