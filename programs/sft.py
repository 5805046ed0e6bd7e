"""Supervised fine-tuning: `python -m programs.sft --config x.yaml [--key value ...] [--overwrite]`.

Reads top to bottom: config -> model -> data -> trainable params and optimizer -> state (fresh or
resumed) -> the shared loop of pure train steps with eval, logging and checkpoints -> export.
"""
from __future__ import annotations

import sys

from programs import common, launch, loop
from pure import rng
from pure.losses import sft
from pure.train import init_train_state

DESCRIPTION = "Supervised fine-tuning (full or LoRA) of a causal LM with axolotl's config keys."


def run(config, overwrite: bool = False, stop_after_step: int | None = None) -> dict:
    """Train as the config says; `stop_after_step` stops like a signal would (the resume tests use it)."""
    layout = launch.layout_of(config)
    out, resume_from = loop.start(config, overwrite, layout)

    # ---- model and data
    params, model_config, tokenizer = common.load_model(config)
    from backends.data_spec import is_streaming
    from backends.datasets import prepare_datasets
    from backends.streaming import prepare_eval_datasets, stream_train_steps
    from programs.data import data_spec

    pad_id = common.pad_id(tokenizer)
    accumulation = config.gradient_accumulation_steps
    spec = data_spec(config)
    streamed = is_streaming(spec)
    if streamed:  # rows are read, tokenised and packed as training consumes them
        if not config.max_steps:
            from programs.config import ConfigError

            raise ConfigError("streaming: a streamed dataset has no known length; set max_steps")
        with layout.main_first():
            train_examples, evals = [], prepare_eval_datasets(spec, tokenizer)
        total = config.max_steps
    else:
        with layout.main_first():  # rank 0 writes the prepared-data cache, the others read it
            data = prepare_datasets(spec, tokenizer)
        train_examples = [dict(input_ids=r["input_ids"], labels=r["labels"]) for r in data.train]
        evals = data.eval
    eval_examples = [dict(input_ids=r["input_ids"], labels=r["labels"]) for r in evals] if evals else []

    def epoch_batches(epoch: int) -> list[dict]:
        return common.epoch_micro_batches(train_examples, config, pad_id, epoch)

    if not streamed:
        total = common.total_steps(config, common.steps_per_epoch(len(epoch_batches(0)), accumulation))

    # ---- trainable params, optimizer, step
    init_key, lora_key = rng.split(rng.key(config.seed), 2)
    trainable, frozen, lora_config = common.build_trainable(config, params, lora_key)
    optimizer, schedule = common.build_optimizer_from_config(config, total)
    bind = common.make_bind(config, model_config, frozen, lora_config, layout)
    train_step, eval_step = layout.steps(sft, optimizer, bind)

    def summary(before: dict, after: dict) -> str:
        return (f"held-out ({len(eval_examples)} rows): eval/loss {before['eval/loss']:.4f} -> "
                f"{after['eval/loss']:.4f}, next-token accuracy on trained tokens "
                f"{before['eval/token_accuracy']:.3f} -> {after['eval/token_accuracy']:.3f}")

    return loop.fit(config, loop.Run(
        state=init_train_state(trainable, optimizer, init_key),
        train_step=train_step,
        epoch_batches=None if streamed else epoch_batches,
        stream=(lambda cursor: stream_train_steps(spec, tokenizer, cursor, accumulation)) if streamed else None,
        schedule=schedule,
        export=lambda state: common.export_policy(config, state, frozen, model_config, tokenizer, lora_config),
        eval_step=eval_step,
        eval_batches=common.eval_micro_batches(eval_examples, config, pad_id) if eval_examples else [],
        num_examples=(len(train_examples), len(eval_examples)),
        summary=summary,
        quiet_metrics=("num_trained_tokens", "token_accuracy"),
        layout=layout,
    ), resume_from=resume_from, stop_after_step=stop_after_step)


def main(argv=None) -> int:
    return loop.main_for(run, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
