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
