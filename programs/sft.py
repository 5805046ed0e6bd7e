"""Supervised fine-tuning: `python -m programs.sft --config x.yaml [--key value ...] [--overwrite]`.

Reads top to bottom: config -> model -> data -> trainable params and optimizer -> state (fresh or
resumed) -> loop of pure train steps with eval, logging and checkpoints -> export.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

from backends import checkpoint as ckpt
from backends.metrics import MetricsLogger
from programs import common
from pure import rng
from pure.losses import sft
from pure.train import init_train_state, make_apply, make_eval_step, make_train_step

DESCRIPTION = "Supervised fine-tuning (full or LoRA) of a causal LM with axolotl's config keys."


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop saves a resumable checkpoint and exits cleanly."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def check_output_dir(config, overwrite: bool, resuming: bool) -> None:
    """Refuse to train into an output_dir written by a different config, unless resuming or --overwrite."""
    from programs.config import ConfigError

    previous = Path(config.output_dir) / "config.yaml"
    if not previous.is_file() or overwrite or resuming:
        return
    import yaml

    old = yaml.safe_load(previous.read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(config.to_dict())) or {}
    ignored = {"resume_from_checkpoint", "auto_resume_from_checkpoints", "max_steps", "num_epochs"}
    changed = sorted(k for k in set(old) | set(new) if k not in ignored and old.get(k) != new.get(k))
    if changed:
        raise ConfigError(
            f"output_dir {config.output_dir} holds a run with a different config (keys {changed[:6]} differ); "
            "pass --overwrite to replace it, or choose another output_dir"
        )


def find_resume_checkpoint(config) -> Path | None:
    if config.resume_from_checkpoint:
        path = Path(config.resume_from_checkpoint)
        if not path.is_dir():
            raise ckpt.CheckpointError(f"resume_from_checkpoint: {path} does not exist")
        return path
    if config.auto_resume_from_checkpoints:
        return ckpt.latest_checkpoint(config.output_dir)
    return None


def every(value, per_epoch: int) -> int | None:
    """`eval_steps` / `save_steps` given as a count or a fraction of an epoch."""
    if value is None:
        return None
    return max(1, round(value * per_epoch)) if isinstance(value, float) and value < 1 else int(value)


def run(config, overwrite: bool = False, stop_after_step: int | None = None) -> dict:
    """Train as the config says. `stop_after_step` stops like a signal would (checkpoint, clean
    exit) once that step is done: the resume tests use it."""
    out = Path(config.output_dir)
    resume_from = find_resume_checkpoint(config)
    check_output_dir(config, overwrite, resume_from is not None)
    from programs.config import write_resolved_config

    write_resolved_config(config, out)

    # ---- model and data
    params, model_config, tokenizer = common.load_model(config)
    from backends.datasets import prepare_datasets

    data = prepare_datasets(config, tokenizer)
    train_examples = [dict(input_ids=r["input_ids"], labels=r["labels"]) for r in data.train]
    eval_examples = [dict(input_ids=r["input_ids"], labels=r["labels"]) for r in data.eval] if data.eval else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    accumulation = config.gradient_accumulation_steps or 1
    first_epoch = common.epoch_micro_batches(train_examples, config, pad_id, epoch=0)
    if len(first_epoch) < accumulation:
        raise ValueError(
            f"the training data makes {len(first_epoch)} micro-batch(es) of micro_batch_size "
            f"{config.micro_batch_size}, fewer than one batch of gradient_accumulation_steps {accumulation}; "
            "add data or lower micro_batch_size / gradient_accumulation_steps"
        )
    per_epoch = common.steps_per_epoch(len(first_epoch), accumulation)
    total = common.total_steps(config, per_epoch)
    eval_batches = common.eval_micro_batches(eval_examples, config, pad_id) if eval_examples else []

    # ---- trainable params, optimizer, step
    seed = config.seed if config.seed is not None else 42
    init_key, lora_key = rng.split(rng.key(seed), 2)
    trainable, frozen, lora_config = common.build_trainable(config, params, lora_key)
    optimizer, schedule = common.build_optimizer_from_config(config, total)
    bind = make_apply(model_config, frozen, lora_config=lora_config,
                      checkpoint_layers=bool(config.gradient_checkpointing),
                      neftune_alpha=config.neftune_noise_alpha)
    train_step = make_train_step(sft, optimizer, bind)
    eval_step = make_eval_step(sft, bind)
    state = init_train_state(trainable, optimizer, init_key)
    if resume_from is not None:
        state, _ = ckpt.load_checkpoint(resume_from, state)
        print(f"resumed from {resume_from} at step {state.step}", flush=True)

    logger = MetricsLogger(out, use_tensorboard=bool(config.use_tensorboard), wandb_project=config.wandb_project,
                           wandb_name=config.wandb_name, wandb_mode=config.wandb_mode,
                           config_dict=config.to_dict(), resume=resume_from is not None)
    if resume_from is not None:
        logger.truncate_after(state.step)
    eval_every = every(config.eval_steps, per_epoch) or (
        max(1, per_epoch // config.evals_per_epoch) if config.evals_per_epoch else None)
    save_every = every(config.save_steps, per_epoch) or (
        max(1, per_epoch // config.saves_per_epoch) if config.saves_per_epoch else None)
    if config.save_strategy == "no":
        save_every = None
    elif config.save_strategy == "epoch":
        save_every = per_epoch
    log_every = config.logging_steps or 1
    stop = StopRequested()
    n_params = sum(t.numel() for t in torch.utils._pytree.tree_leaves(state.trainable))
    print(f"training {n_params:,} params for {total} steps ({per_epoch} per epoch, {len(train_examples)} examples, "
          f"{len(eval_examples)} eval)", flush=True)

    def evaluate() -> dict:
        return {k: v for k, v in eval_step(state.trainable, [common.tensors_only(b) for b in eval_batches]).items()}

    def save(reason: str) -> Path:
        path = ckpt.save_checkpoint(state, out, extra={"reason": reason}, total_limit=config.save_total_limit)
        print(f"saved {path}", flush=True)
        return path

    # ---- loop
    epoch_batches, epoch_of_batches = first_epoch, 0
    last_saved = resume_from
    window_tokens, window_start = 0, time.perf_counter()
    if eval_batches and state.step == 0:
        logger.log(0, evaluate())
    while state.step < total:
        epoch, index = state.data_cursor["epoch"], state.data_cursor["batch"]
        if index + accumulation > len(epoch_batches) or epoch != epoch_of_batches:
            if index + accumulation > len(epoch_batches) and epoch == epoch_of_batches:
                epoch, index = epoch + 1, 0
            epoch_batches, epoch_of_batches = common.epoch_micro_batches(train_examples, config, pad_id, epoch), epoch
        micro = epoch_batches[index:index + accumulation]
        new_state, metrics = train_step(state, [common.tensors_only(b) for b in micro])
        if not math.isfinite(metrics["train/loss"].item()):
            where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
            raise FloatingPointError(f"train/loss is {metrics['train/loss'].item()} at step {state.step + 1}; {where}")
        state = new_state.replace(data_cursor={"epoch": epoch, "batch": index + accumulation})
        window_tokens += sum(b["num_tokens"] for b in micro)
        if state.step % log_every == 0 or state.step == total:
            elapsed = time.perf_counter() - window_start
            metrics["train/learning_rate"] = schedule(state.step - 1)
            metrics["train/tokens_per_second"] = window_tokens / max(elapsed, 1e-9)
            metrics["train/epoch"] = epoch + (index + accumulation) / len(epoch_batches)
            metrics["memory/max_rss_mb"] = _max_rss_mb()
            logger.log(state.step, {k: v for k, v in metrics.items() if k not in ("num_trained_tokens", "token_accuracy")})
            window_tokens, window_start = 0, time.perf_counter()
        if eval_batches and eval_every and state.step % eval_every == 0:
            logger.log(state.step, evaluate())
        if save_every and state.step % save_every == 0:
            last_saved = save("scheduled")
        if stop_after_step is not None and state.step >= stop_after_step:
            stop.signal = "stop_after_step"
        if stop.signal:
            last_saved = save(stop.signal)
            print(f"stopped by {stop.signal} at step {state.step}; resume with "
                  f"--resume_from_checkpoint {last_saved}", flush=True)
            logger.close()
            return {"stopped": True, "step": state.step, "checkpoint": str(last_saved)}

    # ---- final eval, export
    final = {}
    if eval_batches:
        final = logger.log(state.step, evaluate()) if not (eval_every and state.step % eval_every == 0) \
            else logger.records[-1]
        before = next((r for r in logger.records if r["step"] == 0 and "eval/loss" in r), None)
        if before is not None:
            print(f"held-out ({len(eval_examples)} rows): eval/loss {before['eval/loss']:.4f} -> "
                  f"{final['eval/loss']:.4f}, next-token accuracy on trained tokens "
                  f"{before['eval/token_accuracy']:.3f} -> {final['eval/token_accuracy']:.3f}", flush=True)
    if config.save_strategy != "no" and (last_saved is None or last_saved.name != f"checkpoint-{state.step}"):
        save("final")
    export(config, state, frozen, params, model_config, tokenizer, lora_config)
    logger.plot_losses()
    logger.close()
    return {"stopped": False, "step": state.step, "eval": final, "records": logger.records}


def export(config, state, frozen, params, model_config, tokenizer, lora_config) -> Path:
    """LoRA: a PEFT adapter folder in output_dir; full: an HF model folder in output_dir."""
    out = Path(config.output_dir)
    if lora_config is not None:
        from backends.export import save_peft_adapter

        save_peft_adapter(out / "adapter", state.trainable["lora"], lora_config,
                          modules_to_save=state.trainable.get("params") or None,
                          base_model_name_or_path=str(config.base_model), tokenizer=tokenizer)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (out / name).write_bytes((out / "adapter" / name).read_bytes())
        tokenizer.save_pretrained(out)
        return out
    from backends.hf import save_pretrained

    full = {**frozen, **state.trainable["params"]}
    save_pretrained(full, model_config, tokenizer, out / "model")
    return out / "model"


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    from backends.checkpoint import CheckpointError
    from backends.export import AdapterError
    from backends.hf import ModelLoadError
    from programs.config import ConfigError, parse_cli
    from pure.data.settings import DataError

    try:
        config, extra = parse_cli(argv, DESCRIPTION, program_flags={"--overwrite": False})
        run(config, overwrite="--overwrite" in extra)
    except (ConfigError, DataError, ModelLoadError, CheckpointError, AdapterError, FloatingPointError, ValueError) as e:
        common.fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
