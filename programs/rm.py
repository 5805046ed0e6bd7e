"""Reward models: `reward_model: true` (Bradley-Terry, a scalar `score` head read at the last token)
and `process_reward_model: true` (a token-classification `score` head on step ends).
`python -m programs.rm --config x.yaml [--key value ...] [--overwrite]`, or `programs.train`.

Reads top to bottom: config -> model + a fresh score head -> pairs (or token-labelled rows) ->
trainable params (LoRA + head, or everything) -> the shared loop -> an HF `...ForSequenceClassification`
/ `...ForTokenClassification` folder, or a PEFT adapter with the head in `modules_to_save`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from programs import common, launch, loop
from programs.config.derived import training_kind
from pure import rng
from pure.train import init_train_state

DESCRIPTION = "Reward-model training (Bradley-Terry outcome RM, process RM) with axolotl's config keys."


def run(config, overwrite: bool = False, stop_after_step: int | None = None) -> dict:
    from pure.data.reward_batch import collate_reward_pairs, collate_token_labels, epoch_order
    from pure.losses import make_bradley_terry, make_prm
    from pure.models.heads import init_score_head

    kind = training_kind(config)
    if kind not in ("rm", "prm"):
        from programs.config import ConfigError

        raise ConfigError("programs.rm needs reward_model: true or process_reward_model: true "
                          "(use python -m programs.train to dispatch on the config)")
    head_kind = "sequence" if kind == "rm" else "token"
    num_labels = config.num_labels or (1 if kind == "rm" else 2)
    layout = launch.layout_of(config)
    out, resume_from = loop.start(config, overwrite, layout)

    # ---- model and data
    params, model_config, tokenizer = common.load_model(config)
    from backends.datasets import prepare_datasets
    from programs.data import data_spec

    with layout.main_first():  # rank 0 writes the prepared-data cache, the others read it
        data = prepare_datasets(data_spec(config), tokenizer)
    keep = ("chosen_input_ids", "rejected_input_ids") if kind == "rm" else ("input_ids", "labels")
    train_examples = [{k: r[k] for k in keep} for r in data.train]
    eval_examples = [{k: r[k] for k in keep} for r in data.eval] if data.eval else []
    pad_id = common.pad_id(tokenizer)

    def collate(examples, order, size):
        if kind == "rm":
            return collate_reward_pairs(examples, order, size, pad_id)
        return collate_token_labels(examples, order, size, pad_id, num_labels=num_labels)

    def epoch_batches(epoch: int) -> list[dict]:
        order = epoch_order(len(train_examples), common.data_seed_of(config), epoch)
        return collate(train_examples, order, config.micro_batch_size)

    # ---- trainable params (with the new head), objective, step
    init_key, lora_key, head_key = rng.split(rng.key(config.seed), 3)
    trainable, frozen, lora_config = common.build_trainable(config, params, lora_key)
    head = init_score_head(model_config, num_labels, head_key, kind=head_kind)
    trainable = {**trainable, "params": {**trainable.get("params", {}), **head}}
    loss = make_bradley_terry(config.center_rewards_coefficient) if kind == "rm" else make_prm(num_labels)
    bind = common.make_bind(config, model_config, frozen, lora_config, neftune_alpha=None)
    total = common.total_steps(config, common.steps_per_epoch(len(epoch_batches(0)),
                                                              config.gradient_accumulation_steps))
    optimizer, schedule = common.build_optimizer_from_config(config, total)
    train_step, eval_step = layout.steps(loss, optimizer, bind, paired=kind == "rm")

    def export(state) -> Path:
        from backends.export import save_peft_reward_adapter, save_reward_model

        trained = state.trainable["params"]
        score = {k: v for k, v in trained.items() if k.startswith("score.")}
        if lora_config is not None:
            save_peft_reward_adapter(out, state.trainable["lora"], lora_config, score, num_labels, head_kind,
                                     base_model_name_or_path=str(config.base_model), tokenizer=tokenizer)
            return out
        body = {**frozen, **{k: v for k, v in trained.items() if not k.startswith("score.")}}
        return save_reward_model(out / "model", body, score, model_config, tokenizer, num_labels, head_kind,
                                 pad_token_id=pad_id)

    def summary(before: dict, after: dict) -> str:
        parts = [f"eval/loss {before['eval/loss']:.4f} -> {after['eval/loss']:.4f}",
                 f"accuracy {before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f}"]
        if "eval/rewards/margins" in after:
            parts.append(f"rewards/margins {before['eval/rewards/margins']:.3f} -> {after['eval/rewards/margins']:.3f}")
        return f"held-out ({len(eval_examples)} rows): " + ", ".join(parts)

    eval_size = config.eval_batch_size
    return loop.fit(config, loop.Run(
        state=init_train_state(trainable, optimizer, init_key),
        train_step=train_step,
        epoch_batches=epoch_batches,
        schedule=schedule,
        export=export,
        eval_step=eval_step,
        eval_batches=collate(eval_examples, list(range(len(eval_examples))), eval_size) if eval_examples else [],
        num_examples=(len(train_examples), len(eval_examples)),
        summary=summary,
        layout=layout,
    ), resume_from=resume_from, stop_after_step=stop_after_step)


def main(argv=None) -> int:
    return loop.main_for(run, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
