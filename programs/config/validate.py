"""Validation: unknown keys with the closest valid one, types and bounds named, the refusals of
`unsupported.py`, the cross-key rules, and the derived values axolotl's normalize_config fills."""
from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError

from programs.config.schema import (
    OPTIMIZER_NAMES, SUPPORTED_OPTIMIZERS, Config, ConfigError, DatasetConfig, TRLConfig,
)
from programs.config.unsupported import GIVEN, LEGACY_ALIASES, NOT_SUPPORTED_YET, PREFERENCE_RL


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


def _schema_default(model: type[BaseModel], key: str) -> Any:
    field = model.model_fields[key]
    return None if field.is_required() else field.get_default(call_default_factory=True)


def _values_at(raw: dict, dotted: str):
    """(shown key, value, block model) for each place a NOT_SUPPORTED_YET key names: `key`,
    `block.key` inside a block, `datasets.key` in every dataset entry."""
    if "." not in dotted:
        yield dotted, raw.get(dotted), Config
        return
    block, key = dotted.split(".", 1)
    if block == "datasets":
        for list_key in ("datasets", "test_datasets"):
            for i, entry in enumerate(raw.get(list_key) or []):
                if isinstance(entry, dict):
                    yield f"{list_key}[{i}].{key}", entry.get(key), DatasetConfig
        return
    value = raw.get(block)
    if isinstance(value, dict):
        yield dotted, value.get(key), _model_of(Config.model_fields[block].annotation)


def _check_not_supported(raw: dict) -> None:
    for dotted, (unsupported, hint) in NOT_SUPPORTED_YET.items():
        for key, value, model in _values_at(raw, dotted):
            if value is None:
                continue
            try:
                bad = value != _schema_default(model, key.rsplit(".", 1)[-1]) if unsupported == GIVEN \
                    else unsupported(value)
            except Exception:  # a wrongly typed value: the schema reports it
                bad = False
            if bad:
                shown = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) else ""
                raise ConfigError(f"{key} is not supported yet by puretune{shown}" + (f"; {hint}" if hint else ""))
    for list_key in ("datasets", "test_datasets"):
        for i, entry in enumerate(raw.get(list_key) or []):
            if isinstance(entry, dict) and (entry.get("type") == "_synthetic" or entry.get("path") == "synthetic"):
                raise ConfigError(f"{list_key}[{i}].type: synthetic datasets are not supported yet by puretune")


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
        from pure.losses.grpo import LOSS_TYPES

        known, what = LOSS_TYPES, "GRPO loss types"
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
    if isinstance(raw.get("plugins"), list):  # a plugin's own keys are unknown here: name the plugin first
        from programs.kernel_keys import check_plugins

        check_plugins(raw["plugins"])
    _check_unknown_keys(raw, Config)
    raw = _nulls_to_defaults(raw, Config)
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise _translate(err) from None
    _check_not_supported(config.model_dump())
    _check_rules(config)
    return _normalise(config)


def _nulls_to_defaults(raw: dict, model: type[BaseModel]) -> dict:
    """`key: null` (or an empty `key:`) in YAML means the key's default, as in axolotl: drop it
    where the schema has a default that is not None, so fields with a default are never None."""
    out = {}
    for key, value in raw.items():
        field = model.model_fields.get(key)
        if field is None:
            out[key] = value
            continue
        if value is None and not field.is_required() and field.get_default(call_default_factory=True) is not None:
            continue
        sub = _model_of(field.annotation)
        if isinstance(value, dict) and sub is not None and sub is not DatasetConfig:
            value = _nulls_to_defaults(value, sub)
        out[key] = value
    return out


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
    from programs.config.derived import optimizer_options, quantization_spec, schedule_settings, sharding_plan

    # an option the scheduler / optimizer / sharding does not take fails here, before anything loads
    schedule_settings(c)
    optimizer_options(c)
    quantization_spec(c)
    sharding_plan(c)
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
    _check_model_type(c)
    _check_grpo(c)
    from programs.kernel_keys import check_kernel_keys

    check_kernel_keys(c)
    if c.curriculum_sampling and c.sample_packing and not c.sample_packing_sequentially:
        raise ConfigError("curriculum_sampling with sample_packing needs sample_packing_sequentially: true "
                          "(first-fit-decreasing packing reorders the rows)")
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


# The trl: keys only rl: grpo / gdpo read (trl.beta, loss_type and loss_weights serve the DPO family too).
GRPO_ONLY_TRL_KEYS = (
    "max_completion_length", "reward_funcs", "reward_weights", "generation_batch_size", "num_generations",
    "log_completions", "num_completions_to_print", "importance_sampling_level", "sync_ref_model",
    "ref_model_mixup_alpha", "ref_model_sync_steps", "scale_rewards", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "generation_kwargs", "chat_template_kwargs", "num_iterations", "epsilon", "epsilon_high",
    "delta", "sapo_temperature_pos", "sapo_temperature_neg", "steps_per_generation", "mask_truncated_completions",
    "rollout_func", "multi_objective_aggregation", "reward_num_workers", "skip_zero_advantage_batches",
    "use_vllm", "vllm_mode", "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_sync_interval",
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_cap",
    "off_policy_mask_threshold", "use_bias_correction_kl", "use_data_producer", "async_prefetch", "prefetch_depth",
    "streaming_partial_batch", "streaming_min_groups", "replay_buffer_size",
    "reroll_start_fraction", "reroll_max_groups")

# trl: keys that only mean something with another one (key, needs, why)
_NEEDS = (
    ("vllm_mode", "use_vllm", "it picks the vLLM mode"),
    ("vllm_server_host", "use_vllm", "the native engine has no server"),
    ("vllm_server_port", "use_vllm", "the native engine has no server"),
    ("vllm_server_timeout", "use_vllm", "the native engine has no server"),
    ("vllm_sync_interval", "use_vllm", "the native engine samples from the trained weights themselves"),
    ("async_prefetch", "use_data_producer", "async prefetch is the data producer's (axolotl)"),
    ("prefetch_depth", "async_prefetch", "it is how many generations the background producer samples ahead"),
    ("streaming_partial_batch", "use_data_producer", "streamed scoring is the data producer's (axolotl)"),
    ("streaming_min_groups", "streaming_partial_batch", "it sizes the streamed scoring chunks"),
    ("replay_buffer_size", "use_data_producer", "the replay buffer is the data producer's (axolotl)"),
    ("reroll_start_fraction", "use_data_producer", "re-rolling is the data producer's (axolotl)"),
    ("reroll_max_groups", "reroll_start_fraction", "it caps the re-rolled groups"),
)


# Keys of the prepared-example pipelines and the preference objectives that GRPO has no use for.
NOT_FOR_GRPO = ("rl_adapter_ref_model", "precompute_ref_log_probs", "group_by_length", "curriculum_sampling",
                "pad_to_sequence_len", "eval_sample_packing", "dataset_exact_deduplication", "train_on_inputs",
                "max_prompt_len", "dpo_label_smoothing", "rpo_alpha", "dpo_use_weighting", "simpo_gamma",
                "cpo_alpha", "orpo_alpha", "kto_desirable_weight", "kto_undesirable_weight", "streaming",
                "pretraining_dataset")


def _check_grpo(c: Config) -> None:
    """rl: grpo / gdpo: reward functions, no packing, the generation batch in whole prompt groups; the
    GRPO-only trl keys refused under any other method (they would have no effect)."""
    trl = c.trl
    if c.rl not in ("grpo", "gdpo"):
        if trl is not None:
            given = sorted(k for k in GRPO_ONLY_TRL_KEYS if k in trl.model_fields_set)
            if given:
                raise ConfigError(f"trl.{given[0]} is a GRPO key (rl: grpo / gdpo); this config trains "
                                  f"{'rl: ' + c.rl if c.rl else 'without rl: (SFT)'}")
        return
    if c.sample_packing:
        raise ConfigError(f"rl: {c.rl} needs sample_packing: false (completions are generated, not packed)")
    if trl is None or not trl.reward_funcs:
        raise ConfigError(f"rl: {c.rl} needs trl.reward_funcs: a list of reward functions (module.fn importable "
                          "from the working directory) or reward-model folders")
    if trl.reward_weights is not None and len(trl.reward_weights) != len(trl.reward_funcs or []):
        raise ConfigError(f"trl.reward_weights has {len(trl.reward_weights)} weights for "
                          f"{len(trl.reward_funcs or [])} reward functions; give one weight per function")
    inert = [k for k in NOT_FOR_GRPO if getattr(c, k, None)]
    if inert:
        raise ConfigError(f"{inert[0]} does not apply to rl: {c.rl} (GRPO generates its completions from prompts: "
                          "nothing is packed, masked by role, cached as reference log-probs or copied as a reference)")
    from pure.losses.grpo import CLIP_TYPES

    if trl.delta is not None and (trl.loss_type or "dapo") not in CLIP_TYPES:
        raise ConfigError(f"trl.delta (the two-sided clip) applies to the clipped loss types grpo, bnpo, dr_grpo "
                          f"and dapo, not trl.loss_type: {trl.loss_type}")
    if trl.sync_ref_model and c.adapter:
        raise ConfigError(f"trl.sync_ref_model mixes the reference weights towards the policy's; with adapter: "
                          f"{c.adapter} the reference is the base model with the adapter off, so use it with a "
                          "full fine-tune (no adapter)")
    if c.rl == "gdpo" and trl.multi_objective_aggregation == "sum_then_normalize":
        raise ConfigError("rl: gdpo is GRPO with multi_objective_aggregation: normalize_then_sum; "
                          "trl.multi_objective_aggregation: sum_then_normalize contradicts it (use rl: grpo)")
    _check_grpo_rollouts(c)
    extra = sorted(set(trl.generation_kwargs or {}) - {"stop_token_ids"})
    if extra:
        raise ConfigError(f"trl.generation_kwargs.{extra[0]} is not supported yet by puretune's native rollout "
                          "engine; it reads stop_token_ids (the sampling keys are trl.temperature, top_p, top_k, "
                          "min_p, repetition_penalty, max_completion_length)")
    from programs.config.derived import grpo_batching

    grpo_batching(c)


def _check_grpo_rollouts(c: Config) -> None:
    """The vLLM backend's, async producer's and off-policy keys: each only where it takes effect."""
    trl = c.trl
    given = trl.model_fields_set
    for key, needs, why in _NEEDS:
        value = getattr(trl, needs)
        on = value > 0 if needs == "replay_buffer_size" else value < 1.0 if needs == "reroll_start_fraction" \
            else bool(value)
        if key in given and not on:
            raise ConfigError(f"trl.{key} needs trl.{needs} ({why}); this config does not set it")
    from programs.config.derived import grpo_beta, stale_rollouts

    stale = stale_rollouts(c)
    for key in ("vllm_importance_sampling_mode", "vllm_importance_sampling_cap"):
        if key in given and (not stale or trl.vllm_importance_sampling_correction is False):
            raise ConfigError(f"trl.{key} shapes the importance-sampling correction of rollouts from another policy, "
                              "which is on with trl.use_vllm or trl.async_prefetch unless "
                              "vllm_importance_sampling_correction: false; here it is off")
    if trl.vllm_importance_sampling_correction and not stale:
        raise ConfigError("trl.vllm_importance_sampling_correction corrects rollouts sampled by vLLM or by the async "
                          "producer's older policy; this config has neither (trl.use_vllm, trl.async_prefetch)")
    if trl.use_bias_correction_kl and grpo_beta(c) == 0:
        raise ConfigError("trl.use_bias_correction_kl weights the KL term, but trl.beta is 0 (no KL)")
    if trl.streaming_partial_batch and trl.rollout_func:
        raise ConfigError("trl.streaming_partial_batch scores prompt groups as the engine finishes them; a "
                          "trl.rollout_func returns all its rollouts at once")
    # vllm_lora_sync without use_vllm is kept: programs.vllm_serve reads it (LoRA serving) from the same config
    if trl.vllm_lora_sync and c.lora_modules_to_save:
        raise ConfigError("trl.vllm_lora_sync serves the adapter alone, without lora_modules_to_save; "
                          "set vllm_lora_sync: false (merged full weights are synced instead)")


# The model class names axolotl configs give as type_of_model / model_type, by the head each means.
_HEAD_OF_CLASS = {"ForCausalLM": "sft", "ForSequenceClassification": "rm", "ForTokenClassification": "prm"}


def _check_model_type(c: Config) -> None:
    """type_of_model / model_type only name the head; it must agree with the training kind."""
    for key in ("type_of_model", "model_type"):
        name = getattr(c, key)
        if name is None:
            continue
        head = next((h for suffix, h in _HEAD_OF_CLASS.items() if name.endswith(suffix)), None)
        kind = "rm" if c.reward_model else "prm" if c.process_reward_model else "sft"
        if head is None:
            raise ConfigError(f"{key}: expected a class ending in {', '.join(_HEAD_OF_CLASS)}, got {name!r}")
        if head != kind:
            wanted = {"sft": "a ...ForCausalLM class", "rm": "reward_model: true",
                      "prm": "process_reward_model: true"}[head]
            raise ConfigError(f"{key}: {name} needs {wanted}; this config trains "
                              f"{ {'sft': 'a causal LM', 'rm': 'a reward model', 'prm': 'a process reward model'}[kind] }")


# Keys the config package itself turns into behaviour (besides LEGACY_ALIASES): key -> how.
RESOLVED_BY_THE_CONFIG = {
    "batch_size": "sets gradient_accumulation_steps = batch_size / micro_batch_size (_normalise)",
    "strict": "limits CLI overrides to the keys the YAML file sets (cli.load_config)",
}


def _normalise(c: Config) -> Config:
    """Fill derived values the way axolotl's normalize_config does."""
    updates: dict[str, Any] = {}
    fields_set = c.model_fields_set
    micro = c.micro_batch_size
    ga = c.gradient_accumulation_steps
    if c.batch_size is not None and "gradient_accumulation_steps" not in fields_set:
        if c.batch_size % micro:
            raise ConfigError(
                f"batch_size: expected a multiple of micro_batch_size ({micro}), got {c.batch_size}"
            )
        ga = c.batch_size // micro
        updates["gradient_accumulation_steps"] = ga
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
    if c.save_strategy is None and c.save_steps is not None:
        updates["save_strategy"] = "steps"
    if c.eval_strategy is None and c.eval_steps is not None:
        updates["eval_strategy"] = "steps"
    normalised = c.model_copy(update=updates)
    # model_copy skips validation; the fields it set are all of already-valid types
    object.__setattr__(normalised, "__pydantic_fields_set__", set(c.model_fields_set))
    return normalised


