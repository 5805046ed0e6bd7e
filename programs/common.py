"""Wiring shared by the training programs: config -> model, trainable subtree, optimizer, batches.

No math here: each function reads a few config keys and calls `pure/` and `backends/`.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from backends.hf import load_pretrained
from kernels.quantized import dequantize, is_quantized
from pure import rng
from pure.data.packing import collate_packed, collate_padded, pack_first_fit_decreasing
from pure.lora import LoraConfig, init_lora, loftq_factors
from programs.optimizers import build_optimizer
from pure.models import resize_embeddings
from pure.optim import make_param_groups
from pure.schedules import build_schedule


def fail(message: str, code: int = 2):
    """One clear line on stderr and a non-zero exit, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def load_model(config, quantize: bool = True):
    """(params, model config, tokenizer) with the tokenizer's added tokens reflected in the embeddings,
    the base quantised as the config asks (unless `quantize` is false)."""
    from backends.tokenizer import prepare_tokenizer
    from programs.data import tokenizer_edits

    from backends.precision import cast_params
    from programs.config.derived import precision_plan

    params, model_config, tokenizer = load_pretrained(config.base_model)
    params = cast_params(params, precision_plan(config))  # bfloat16: true stores params in bf16
    if tokenizer is None:
        from backends.hf import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer_config or config.base_model)
    prepare_tokenizer(tokenizer, **tokenizer_edits(config))
    vocab = len(tokenizer)
    if config.resize_token_embeddings_to_32x:
        vocab = math.ceil(vocab / 32) * 32
    if vocab > model_config.vocab_size:
        # axolotl's default: new rows drawn like transformers' init; mean_resizing_embeddings: mean rows
        key = None if config.mean_resizing_embeddings else rng.fold_in(rng.key(config.seed), RESIZE_STREAM)
        params, model_config = resize_embeddings(params, model_config, vocab, key=key)
    if model_config.tie_word_embeddings and saves_lm_head(config):
        params, model_config = untie_lm_head(params, model_config)
    return (quantize_base(config, params) if quantize else params), model_config, tokenizer


def saves_lm_head(config) -> bool:
    """Whether a LoRA run trains the output head whole (`lora_modules_to_save` names `lm_head`, by
    build_trainable's suffix match)."""
    return config.adapter in ("lora", "qlora") and any("lm_head".endswith(m) for m in config.lora_modules_to_save or [])


def untie_lm_head(params: dict, model_config):
    """(params, config) with `lm_head.weight` a copy of the tied embedding and the tie off.

    PEFT's `modules_to_save: [lm_head]` on a tied model wraps `lm_head` in its own trainable copy of
    the shared matrix (and `embed_tokens`, if listed too, in another), so training unties them;
    axolotl's configs list `[embed_tokens, lm_head]` for Llama-3.2-1B and SmolLM2, whose heads are
    tied. The exported adapter holds both copies and reloads onto the tied base in PEFT the same way."""
    params = dict(params)
    params["lm_head.weight"] = params["model.embed_tokens.weight"].clone()
    return params, model_config.replace(tie_word_embeddings=False)


def quantize_base(config, params: dict) -> dict:
    """The params with the decoder's linear weights in the bitsandbytes format the config asks for
    (`load_in_4bit`, `load_in_8bit`, LoftQ), after any resize: embeddings and lm_head stay dense.
    Deterministic, so every program that loads this config (train, resume, merge, inference) sees the
    same quantised base."""
    from kernels.quantized import params_nbytes, quantize_params
    from programs.config.derived import quantization_spec

    spec = quantization_spec(config)
    if spec is None:
        return params
    before = params_nbytes(params)
    params = quantize_params(params, spec)
    print(f"base quantised: {spec.describe()} by bitsandbytes; weights {before / 2**20:.1f} MiB -> "
          f"{params_nbytes(params) / 2**20:.1f} MiB", file=sys.stderr, flush=True)  # stdout may be evaluate's JSON
    return params


# fold_in data for the key of new embedding rows (split keys of the seed draw the LoRA init)
RESIZE_STREAM = 0x7E51


def lora_config_of(config) -> LoraConfig:
    return LoraConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                      use_rslora=bool(config.peft_use_rslora), use_dora=bool(config.peft_use_dora))


def build_trainable(config, params, key):
    """Split params into (trainable subtree, frozen params, LoraConfig or None).

    LoRA: the delta (fresh, or read from `lora_model_dir`) plus `lora_modules_to_save` params.
    Full fine-tune: every param, or those matching `unfrozen_parameters` regexes.
    """
    if config.adapter in ("lora", "qlora"):
        if config.lora_model_dir:
            from backends.export import load_peft_adapter

            delta, lora_config, saved = load_peft_adapter(config.lora_model_dir, params)
        else:
            lora_config = lora_config_of(config)
            delta = init_lora(params, lora_config, key, target_modules=config.lora_target_modules,
                              target_linear=bool(config.lora_target_linear), dense=dequantize)
            if config.peft is not None and config.peft.loftq_config is not None:
                delta = loftq_delta(config, params, delta, lora_config)
            saved = {}
        to_save = {}
        for module in config.lora_modules_to_save or []:
            names = [n for n in params if n.rsplit(".", 1)[0].endswith(module)]
            if not names:
                raise ValueError(f"lora_modules_to_save: {module!r} matches no parameter of the model")
            to_save.update({n: saved.get(n, params[n]) for n in names})
        frozen = {k: v for k, v in params.items() if k not in to_save}
        return {"lora": delta, "params": to_save}, frozen, lora_config
    if config.unfrozen_parameters:
        patterns = [re.compile(p) for p in config.unfrozen_parameters]
        trained = {k: v for k, v in params.items() if any(p.search(k) for p in patterns)}
        if not trained:
            raise ValueError(f"unfrozen_parameters {config.unfrozen_parameters} match no parameter")
        return {"params": trained}, {k: v for k, v in params.items() if k not in trained}, None
    return {"params": dict(params)}, {}, None


def loftq_delta(config, params: dict, delta: dict, lora_config: LoraConfig) -> dict:
    """`peft.loftq_config`: every adapted module's A, B from the residual of its quantisation,
    W - dequantize(Q), with W the base's full-precision weight (loaded again, as the params hold Q)."""
    dense, _, _ = load_model(config, quantize=False)
    out = dict(delta)
    for path, entry in delta.items():
        name = path + ".weight"
        if not is_quantized({name: params[name]}):  # a dense module (lm_head, a skipped one): no residual
            continue
        base = dequantize(params[name], torch.float32)
        factors = {k: v.to(entry[k].dtype) for k, v in loftq_factors(dense[name].float() - base, lora_config).items()}
        if "m" in entry:  # DoRA's magnitude of the adapted weight it starts from
            w = base + lora_config.scale * (factors["B"].float() @ factors["A"].float())
            factors["m"] = torch.linalg.norm(w, dim=1).to(entry["m"].dtype)
        out[path] = {**entry, **factors}
    return out


def build_optimizer_from_config(config, total_steps: int):
    from programs.config.derived import optimizer_options, schedule_settings

    schedule = build_schedule(total_steps=total_steps, **schedule_settings(config))
    groups = make_param_groups(
        config.learning_rate, loraplus_lr_ratio=config.loraplus_lr_ratio,
        loraplus_lr_embedding=config.loraplus_lr_embedding,
        lr_groups=[g.model_dump() if hasattr(g, "model_dump") else g for g in (config.lr_groups or [])] or None,
        embedding_lr=config.embedding_lr, embedding_lr_scale=config.embedding_lr_scale,
    )
    optimizer = build_optimizer(
        config.optimizer, schedule, weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm, param_groups=groups, optim_args=optimizer_options(config),
    )
    return optimizer, schedule


def epoch_micro_batches(examples, config, pad_id: int, epoch: int, packing: bool | None = None) -> list[dict]:
    """The micro-batches of one epoch, a pure function of (examples, config, epoch): packed bins
    shuffled by (data_seed or seed, epoch), or padded rows in such a permutation; in dataset order
    with `curriculum_sampling`. `dataloader_drop_last` drops a last micro-batch with fewer rows."""
    packing = config.sample_packing if packing is None else packing
    seed = data_seed_of(config)
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    if packing:
        bins = pack_first_fit_decreasing(
            lengths, config.sequence_len, max_per_bin=config.sample_packing_bin_size,
            group_size=config.sample_packing_group_size,
            sequential=bool(config.sample_packing_sequentially), seed=seed, epoch=epoch)
        batches = collate_packed(examples, bins, config.micro_batch_size, config.sequence_len, pad_id,
                                 pad_to_sequence_len=config.pad_to_sequence_len is not False)
    else:
        order = np.arange(len(examples)) if config.curriculum_sampling else \
            rng.permutation(rng.fold_in(rng.key(seed), epoch), len(examples)).numpy()
        pad_to = config.sequence_len if config.pad_to_sequence_len else None
        batches = collate_padded(examples, order, config.micro_batch_size, pad_id, pad_to=pad_to,
                                 bucket_by_length=bool(config.group_by_length))
    if config.dataloader_drop_last and batches and batches[-1]["input_ids"].shape[0] < config.micro_batch_size:
        batches = batches[:-1]
    return batches


def data_seed_of(config) -> int:
    """The seed of the data order: `data_seed` when given, else `seed` (as transformers)."""
    return config.data_seed if config.data_seed is not None else config.seed


def eval_micro_batches(examples, config, pad_id: int) -> list[dict]:
    """Eval batches in dataset order (packed only with `eval_sample_packing`)."""
    packing = bool(config.sample_packing) and config.eval_sample_packing is not False
    if packing:
        lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
        bins = pack_first_fit_decreasing(lengths, config.sequence_len, sequential=True)
        return collate_packed(examples, bins, config.eval_batch_size,
                              config.sequence_len, pad_id)
    return collate_padded(examples, range(len(examples)), config.eval_batch_size, pad_id)


def steps_per_epoch(num_micro_batches: int, accumulation: int) -> int:
    return max(1, num_micro_batches // accumulation)


def total_steps(config, per_epoch: int) -> int:
    return config.max_steps or max(1, math.ceil(per_epoch * config.num_epochs))


def tensors_only(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def is_resumable_dir(path: Path) -> bool:
    return path.is_dir() and any(p.name.startswith("checkpoint-") for p in path.iterdir())


def adapter_dir(config, explicit: str | None = None) -> Path | None:
    """The LoRA folder to apply: --lora_model_dir, then the config's, then the run's own output."""
    for candidate in (explicit, config.lora_model_dir, config.output_dir):
        if candidate and (Path(candidate) / "adapter_config.json").is_file():
            return Path(candidate)
    if explicit or config.lora_model_dir:
        raise ValueError(f"no LoRA adapter (adapter_config.json) in {explicit or config.lora_model_dir}")
    return None


def load_model_with_adapter(config, explicit_lora_dir: str | None = None):
    """(params, model config, tokenizer, lora delta or None, LoraConfig or None) for inference/eval/merge."""
    from backends.export import load_peft_adapter

    params, model_config, tokenizer = load_model(config)
    folder = adapter_dir(config, explicit_lora_dir) if config.adapter in ("lora", "qlora") or explicit_lora_dir else None
    if folder is None:
        return params, model_config, tokenizer, None, None
    delta, lora_config, saved = load_peft_adapter(folder, params)
    return {**params, **saved}, model_config, tokenizer, delta, lora_config


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def export_policy(config, state, frozen, model_config, tokenizer, lora_config) -> Path:
    """LoRA: the PEFT adapter (and tokenizer) in output_dir; full: an HF model folder output_dir/model."""
    out = Path(config.output_dir)
    if lora_config is not None:
        from backends.export import save_peft_adapter

        return save_peft_adapter(out, state.trainable["lora"], lora_config,
                                 modules_to_save=state.trainable.get("params") or None,
                                 base_model_name_or_path=str(config.base_model), tokenizer=tokenizer)
    from backends.hf import save_pretrained

    save_pretrained({**frozen, **state.trainable["params"]}, model_config, tokenizer, out / "model")
    return out / "model"


def quantized_ops(params: dict) -> dict:
    """The forward's linear ops for a quantised base (`kernels.quantized`), else none."""
    from kernels import quantized_model_ops

    return quantized_model_ops() if is_quantized(params) else {}


def make_bind(config, model_config, frozen: dict, lora_config, layout=None, **kwargs):
    """`pure.train.make_apply` with the config's switches and the fastest kernels for the params'
    device and dtype (chunked linear + cross-entropy head, attention), as the kernel keys and plugins
    select them (`programs.kernel_keys`; one line says what serves each requested key). A keyword of
    `kwargs` replaces the served op of that name. `bind.with_attention(attention_fn)` is the same bind
    with another attention (the context-parallel one, which `programs.launch.Layout.steps` puts in).
    With a tensor-parallel `layout` (`programs.launch`): the rank's forward over its shards of `frozen`
    (`backends.tensor_parallel.make_tp_apply`, the same kernels inside the TP linears)."""
    from programs.kernel_keys import served_ops
    from pure.train import make_apply

    some = next((v for v in frozen.values() if isinstance(v, torch.Tensor)), torch.zeros(()))
    kwargs.setdefault("neftune_alpha", config.neftune_noise_alpha)
    ops, served = served_ops(config, some.device, some.dtype, model_config.sliding_window,
                             quantized=is_quantized(frozen))
    if served:
        print(served, flush=True)
    from programs.config.derived import sharding_plan

    remat = bool(config.gradient_checkpointing) or sharding_plan(config).activation_checkpointing  # fsdp_config's
    if layout is not None and layout.tensor_parallel:
        from backends.tensor_parallel import make_tp_apply, shard_params_for_tp

        rank, size = layout.mesh["tp"].get_local_rank(), layout.mesh["tp"].size()
        local, _ = shard_params_for_tp(frozen, None, model_config, rank, size)
        return make_tp_apply(model_config, local, layout.mesh, lora_config=lora_config, checkpoint_layers=remat,
                             **{**ops, **kwargs})

    def bind_with(**override):  # a keyword of kwargs (e.g. attention_fn) replaces the served kernel's
        return make_apply(model_config, frozen, lora_config=lora_config, checkpoint_layers=remat,
                          **{**ops, **kwargs, **override})

    bind = bind_with()

    def with_attention(attention_fn):
        # The same bind with another attention (`programs.launch.Layout.steps`: the context-parallel one);
        # a sliding window would need it in that attention's mask, which it does not build.
        if model_config.sliding_window is not None:
            from programs.config import ConfigError

            raise ConfigError(f"context_parallel_size > 1: sliding-window attention (sliding_window: "
                              f"{model_config.sliding_window}) is not supported with context parallelism yet")
        return bind_with(attention_fn=attention_fn)

    bind.with_attention = with_attention
    return bind
