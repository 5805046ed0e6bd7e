"""Preference training: the DPO family (`rl: dpo`, `rl: ipo`, RPO, WPO), `rl: simpo` (and CPO),
`rl: orpo` and `rl: kto`. `python -m programs.dpo|kto|orpo --config x.yaml`, or `programs.train`.

Reads top to bottom: config -> model -> preference data -> policy (LoRA or full) and reference ->
objective from the config -> the shared loop (checkpoints, resume, eval) -> export of the policy.
The reference policy is the base weights with the adapter disabled (LoRA: no copy), a frozen copy
for full fine-tunes or `rl_adapter_ref_model: true`, or log-probs computed once before training
(`precompute_ref_log_probs`).
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from programs import common, launch, loop
from programs.config.derived import training_kind
from pure import rng
from pure.train import init_train_state

DESCRIPTION = "Preference training (DPO, IPO, SimPO/CPO, ORPO, KTO) with axolotl's config keys."
PAIRED = ("dpo", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def objective(config, kind: str):
    """The `Loss` of the config's `rl:` and its keys (it carries its own normaliser)."""
    from pure import losses

    beta = config.rl_beta if config.rl_beta is not None else (config.trl.beta if config.trl else None)
    trl = config.trl
    if kind in ("dpo", "ipo"):
        loss = losses.build_dpo_loss(
            trl.loss_type if trl else None, 0.1 if beta is None else beta, rl=kind,
            loss_weights=trl.loss_weights if trl else None, label_smoothing=config.dpo_label_smoothing or 0.0,
            use_weighting=bool(config.dpo_use_weighting), rpo_alpha=config.rpo_alpha)
        return loss
    if kind == "simpo":
        kwargs = {k: v for k, v in (("beta", beta), ("simpo_gamma", config.simpo_gamma),
                                    ("cpo_alpha", config.cpo_alpha),
                                    ("label_smoothing", config.dpo_label_smoothing)) if v is not None}
        return losses.make_simpo(**kwargs)
    if kind == "orpo":
        alpha = config.orpo_alpha if config.orpo_alpha is not None else beta
        return losses.make_orpo(0.1 if alpha is None else alpha)
    if kind == "kto":
        return losses.make_kto(0.1 if beta is None else beta,
                               desirable_weight=1.0 if config.kto_desirable_weight is None else config.kto_desirable_weight,
                               undesirable_weight=1.0 if config.kto_undesirable_weight is None
                               else config.kto_undesirable_weight)
    raise ValueError(f"programs.preference trains rl: {', '.join((*PAIRED, 'kto'))}; got {kind!r}")


def micro_batches(examples, config, kind: str, pad_id: int, epoch: int, shuffle: bool = True) -> list[dict]:
    """One epoch of micro-batches: pairs (chosen rows then rejected rows) or KTO rows with their
    mismatched KL rows; a pure function of (examples, seed, epoch)."""
    size = config.micro_batch_size
    if kind == "kto":
        from pure.data.kto_batch import collate_kto, kto_micro_batches

        if not shuffle:
            return collate_kto(examples, list(range(len(examples))), size, pad_id)
        return kto_micro_batches(examples, size, pad_id, common.data_seed_of(config), epoch)
    from pure.data.pair_batch import pair_micro_batches

    return pair_micro_batches(examples, size, pad_id, common.data_seed_of(config), epoch, shuffle=shuffle)


def precompute_reference(examples, bind, config, pad_id: int, cache: Path | None) -> list[dict]:
    """`precompute_ref_log_probs`: the reference log-probs of every pair, computed once (no grad) and
    kept next to the prepared data (`cache`), so training runs no reference forward."""
    from backends.reference_cache import load_reference_logps, save_reference_logps
    from pure.data.pair_batch import collate_pairs
    from pure.losses import pair_reference_logps

    values = load_reference_logps(cache, len(examples)) if cache is not None else None
    if values is None:
        size = config.eval_batch_size
        values = pair_reference_logps(bind({}), collate_pairs(examples, list(range(len(examples))), size, pad_id))
        if cache is not None:
            save_reference_logps(cache, values)
        print(f"precomputed reference log-probs of {len(examples)} pairs", flush=True)
    return [{**ex, "ref_chosen_logps": float(v[0]), "ref_rejected_logps": float(v[1])}
            for ex, v in zip(examples, values)]


def run(config, overwrite: bool = False, stop_after_step: int | None = None) -> dict:
    kind = training_kind(config)
    layout = launch.layout_of(config)
    out, resume_from = loop.start(config, overwrite, layout)

    # ---- model and data
    params, model_config, tokenizer = common.load_model(config)
    from backends.datasets import prepare_datasets
    from programs.data import data_spec

    with layout.main_first():  # rank 0 writes the prepared-data cache, the others read it
        data = prepare_datasets(data_spec(config), tokenizer)
    keep = ("prompt_ids", "completion_ids", "label") if kind == "kto" else ("prompt_ids", "chosen_ids", "rejected_ids")
    train_examples = [{k: r[k] for k in keep} for r in data.train]
    eval_examples = [{k: r[k] for k in keep} for r in data.eval] if data.eval else []
    pad_id = common.pad_id(tokenizer)

    # ---- policy, reference, objective, step
    init_key, lora_key = rng.split(rng.key(config.seed), 2)
    trainable, frozen, lora_config = common.build_trainable(config, params, lora_key)
    # The reference is the initial weights: with LoRA the frozen tensors themselves (no copy); a full
    # fine-tune updates params functionally, so the loaded dict stays the initial model.
    reference = {k: v.clone() for k, v in params.items()} if config.rl_adapter_ref_model else params
    bind = common.make_bind(config, model_config, frozen, lora_config, reference_params=reference)
    if config.precompute_ref_log_probs:
        if kind not in ("dpo", "ipo"):
            raise ValueError(f"precompute_ref_log_probs applies to rl: dpo / ipo (rl: {kind} "
                             f"{'has no reference model' if kind in REFERENCE_FREE else 'pairs KL rows anew each epoch'})")
        tag = hashlib.sha256(f"{config.base_model}|{model_config}".encode()).hexdigest()[:16]
        where = (lambda name: data.path / f"ref_logps-{name}-{tag}.safetensors") if data.path else (lambda name: None)
        with layout.main_first():  # rank 0 computes and caches them, the others read the cache
            train_examples = precompute_reference(train_examples, bind, config, pad_id, where("train"))
            if eval_examples:
                eval_examples = precompute_reference(eval_examples, bind, config, pad_id, where("eval"))
    loss = objective(config, kind)

    def epoch_batches(epoch: int) -> list[dict]:
        return micro_batches(train_examples, config, kind, pad_id, epoch)

    total = common.total_steps(config, common.steps_per_epoch(len(epoch_batches(0)),
                                                              config.gradient_accumulation_steps))
    optimizer, schedule = common.build_optimizer_from_config(config, total)
    train_step, eval_step = layout.steps(loss, optimizer, bind, paired=kind != "kto")
    eval_batches = []
    if eval_examples:
        eval_config = config.model_copy(update={"micro_batch_size": config.eval_batch_size})
        eval_batches = micro_batches(eval_examples, eval_config, kind, pad_id, epoch=0, shuffle=False)

    return loop.fit(config, loop.Run(
        state=init_train_state(trainable, optimizer, init_key),
        train_step=train_step,
        epoch_batches=epoch_batches,
        schedule=schedule,
        export=lambda state: common.export_policy(config, state, frozen, model_config, tokenizer, lora_config),
        eval_step=eval_step,
        eval_batches=eval_batches,
        num_examples=(len(train_examples), len(eval_examples)),
        summary=lambda before, after: summary(len(eval_examples), before, after),
        layout=layout,
    ), resume_from=resume_from, stop_after_step=stop_after_step)


def summary(rows: int, before: dict, after: dict) -> str:
    parts = [f"eval/loss {before['eval/loss']:.4f} -> {after['eval/loss']:.4f}"]
    for name in ("rewards/accuracies", "rewards/margins", "kl"):
        key = f"eval/{name}"
        if key in after:
            parts.append(f"{name} {before.get(key, float('nan')):.3f} -> {after[key]:.3f}")
    return f"held-out ({rows} rows): " + ", ".join(parts)


def main(argv=None, kinds: tuple[str, ...] = (*PAIRED, "kto"), program: str = "programs.preference") -> int:
    def checked_run(config, overwrite=False):
        kind = training_kind(config)
        if kind not in kinds:
            from programs.config import ConfigError

            raise ConfigError(f"{program} trains rl: {' / '.join(kinds)}; this config has "
                              f"{'rl: ' + kind if kind != 'sft' else 'no rl:'} (use python -m programs.train)")
        return run(config, overwrite)

    return loop.main_for(checked_run, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
