"""The transformers + PEFT baseline both benchmarks measure against, on our weights and our adapter.

`hf_model_of_config` (the CPU benchmark: a training config's base model from the local HF folder
our loader reads) and `hf_model_from_params` (the GPU suite: our in-memory weights in
`LlamaForCausalLM`) build the transformers model, both without a KV cache; `with_peft_lora` adds
PEFT LoRA with our `LoraConfig` on the modules our adapter targets, so both sides start from the
same function (B = 0). `hf_training_arguments` is transformers `Trainer`'s side of a config.
"""
from __future__ import annotations

import torch

from pure.lora import LoraConfig, target_paths


def _without_kv_cache(model):
    # Training builds no KV cache (axolotl sets this too). It matters for packing: transformers 5.24 derives
    # the block-diagonal mask from position_ids only when no cache is passed, so with the config's default
    # use_cache=True a training forward silently attends across packed documents.
    model.config.use_cache = False
    return model


def hf_model_from_params(config, params: dict, device: torch.device, dtype: torch.dtype):
    """(transformers' LlamaForCausalLM of our `ModelConfig` holding our `params` in `dtype`, its
    attention implementation): flash-attn 2 where installed and dtype is half precision, else sdpa."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kernels.attention import flash_attn_available
    from pure.models.config import config_to_hf

    hf_config = LlamaConfig(**{k: v for k, v in config_to_hf(config).items() if k != "architectures"})
    implementation = "flash_attention_2" if flash_attn_available(device) and dtype != torch.float32 else "sdpa"
    hf_config._attn_implementation = implementation
    with torch.device(device):
        model = LlamaForCausalLM(hf_config).to(dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in params.items()}, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"HF model and our params disagree: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return _without_kv_cache(model), implementation


def with_peft_lora(model, lora: LoraConfig, target_modules=None, *, target_linear: bool = False,
                   modules_to_save=None):
    """`model` with PEFT LoRA of `lora` (rank, alpha, dropout, rsLoRA, DoRA) on the modules
    `pure.lora.target_paths` picks for `target_modules` / `target_linear`, the ones our adapter
    adapts; `modules_to_save` are trained in full, as `lora_modules_to_save` are ours."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    paths = target_paths(dict(model.named_parameters()), target_modules, target_linear=target_linear)
    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=paths,
                                 bias="none", task_type="CAUSAL_LM", use_rslora=lora.use_rslora,
                                 use_dora=lora.use_dora, modules_to_save=list(modules_to_save or []) or None)
    return get_peft_model(model, peft_config)


def hf_model_of_config(config, tokenizer, device: torch.device):
    """The baseline of a training config: transformers' model (float32, sdpa) of the local HF folder
    our loader reads, embeddings grown to the tokenizer as ours are, and PEFT LoRA on the same
    modules when the config trains a LoRA adapter."""
    from transformers import AutoModelForCausalLM

    from backends.hf import resolve_model_path
    from programs import common

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.base_model), dtype=torch.float32,
                                                 attn_implementation="sdpa", **hf_quantization_kwargs(config, device))
    model = _without_kv_cache(model)
    if len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)  # ours: new rows = mean of old
    if config.adapter in ("lora", "qlora"):
        model = with_peft_lora(model, common.lora_config_of(config), config.lora_target_modules,
                               target_linear=bool(config.lora_target_linear),
                               modules_to_save=config.lora_modules_to_save)
    return model.to(device)


def hf_quantization_kwargs(config, device: torch.device) -> dict:
    """transformers' `BitsAndBytesConfig` for the quantised base the config asks for (the same
    bitsandbytes formats and settings ours stores), as `from_pretrained` keyword arguments."""
    from transformers import BitsAndBytesConfig

    from programs.config.derived import quantization_spec

    spec = quantization_spec(config)
    if spec is None:
        return {}
    bnb = BitsAndBytesConfig(load_in_4bit=spec.bits == 4, load_in_8bit=spec.bits == 8,
                             bnb_4bit_quant_type=spec.quant_type, bnb_4bit_use_double_quant=spec.double_quant,
                             bnb_4bit_compute_dtype=spec.compute_dtype or torch.float32,
                             llm_int8_skip_modules=list(spec.skip) or None)
    return {"quantization_config": bnb, "device_map": str(device)}


def hf_training_arguments(config, total: int, output_dir: str, device: torch.device):
    """transformers `TrainingArguments` for `total` optimizer steps of `config`'s optimizer, schedule,
    batch and seed, with nothing logged or saved."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=output_dir, max_steps=total, per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        optim=config.optimizer, learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm is not None else 0.0,
        seed=config.seed, data_seed=config.seed,
        dataloader_drop_last=True, dataloader_num_workers=0,
        remove_unused_columns=False, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=device.type == "cpu", bf16=False, fp16=False,
    )
    if config.gradient_checkpointing:
        kwargs["gradient_checkpointing"] = True
    if config.warmup_steps is not None:
        kwargs["warmup_steps"] = config.warmup_steps
    elif config.warmup_ratio is not None:
        kwargs["warmup_steps"] = config.warmup_ratio
    for name in ("adam_beta1", "adam_beta2", "adam_epsilon"):
        if getattr(config, name) is not None:
            kwargs[name] = getattr(config, name)
    return TrainingArguments(**kwargs)
