"""`python -m programs.merge_sharded_fsdp_weights --config x.yaml [--checkpoint DIR] [--output DIR]`:
a sharded checkpoint of a multi-process run consolidated into `{output_dir}/merged`.

axolotl's `merge-sharded-fsdp-weights`. A run at world size > 1 saves `output_dir/checkpoint-<step>/`
with `backends.distributed.save_sharded` (DCP's `.metadata` and `__<rank>_0.distcp` shards plus a
`state.json`). This program, in one process with no process group, reads the trainable params of
the latest such checkpoint (or `--checkpoint DIR`) into the structure `common.build_trainable` gives
for the config, the optimizer state left on disk, and writes what the run's export would have:
a LoRA run's PEFT adapter folder, a full fine-tune's HF model folder (config, tokenizer,
`model.safetensors`). A schedule-free optimizer's exported weights are x, not the trained y, so
for it the optimizer's `z` and `x_weight` are read too (`pure.optim.schedule_free_eval_params`).
"""
from __future__ import annotations

import sys
from pathlib import Path

PROGRAM_FLAGS = {"--checkpoint": True, "--output": True}


def find_sharded_checkpoint(output_dir: str | Path, explicit: str | Path | None = None) -> Path:
    """`explicit` when it is a sharded checkpoint, else the `checkpoint-<step>` of `output_dir` with
    the highest step among the sharded ones. Raises CheckpointError naming the folder otherwise."""
    from backends.checkpoint import STATE_TENSORS, CheckpointError, is_sharded_checkpoint, list_checkpoints

    if explicit is not None:
        folder = Path(explicit)
        if is_sharded_checkpoint(folder):
            return folder
        what = ("a one-process checkpoint (state.safetensors), not a sharded one"
                if (folder / STATE_TENSORS).is_file() else "not a sharded checkpoint (no .metadata and state.json)")
        raise CheckpointError(f"--checkpoint {folder} is {what}")
    found = list_checkpoints(output_dir, sharded_only=True)
    if not found:
        raise CheckpointError(f"no sharded checkpoint (checkpoint-<step>/ with .metadata and state.json, written by "
                              f"a multi-process run) in output_dir {output_dir}; pass --checkpoint DIR")
    return found[-1]


def schedule_free_part(opt_state):
    """The part of a schedule-free optimizer's state that its exported weights need (`x_weight` and
    `z`, at their path in `opt_state`), or None for any other optimizer's state."""
    from pure.optim.schedule_free import STATE_KEY

    if not isinstance(opt_state, dict):
        return None
    if STATE_KEY in opt_state:
        s = opt_state[STATE_KEY]
        return {STATE_KEY: {"x_weight": s["x_weight"], "z": s["z"]}}
    for key, value in opt_state.items():
        part = schedule_free_part(value)
        if part is not None:
            return {key: part}
    return None


def read_trainable(config, folder: Path, params: dict) -> tuple[dict, dict, object, int]:
    """(trainable params as exported, frozen params, LoraConfig or None, step) of the sharded
    checkpoint `folder` of the run `config` describes over the base `params`."""
    import json

    from backends.checkpoint import STATE_JSON
    from backends.distributed import load_sharded_fields
    from programs import common
    from pure import rng
    from pure.optim import schedule_free_eval_params

    _, lora_key = rng.split(rng.key(config.seed), 2)  # the program's key: the same template it trained
    like, frozen, lora_config = common.build_trainable(config, params, lora_key)
    trainable = load_sharded_fields({"trainable": like}, folder)["trainable"]
    if config.optimizer.startswith("schedule_free"):
        optimizer, _ = common.build_optimizer_from_config(config, config.max_steps or 1)
        part = load_sharded_fields({"opt_state": schedule_free_part(optimizer.init(like))}, folder, exact=False)
        trainable = schedule_free_eval_params(trainable, part["opt_state"])
    step = json.loads((folder / STATE_JSON).read_text())["step"]
    return trainable, frozen, lora_config, step


def write_merged(config, target: Path, trainable: dict, frozen: dict, model_config, tokenizer, lora_config) -> str:
    """Write the run's export into the folder `target`, whole or not at all; returns what it wrote.
    A LoRA run: the PEFT adapter (with its modules_to_save and the tokenizer), as `export_policy`
    writes it. A full fine-tune: the HF model folder of the frozen and trained params."""
    from backends.atomic import atomic_folder
    from backends.export import save_peft_adapter
    from backends.hf import save_pretrained

    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / "config.json").is_file()
                                                     or (target / "adapter_config.json").is_file())):
        raise FileExistsError(f"refusing to replace {target}: it exists and is not a model or adapter folder")
    if lora_config is not None:
        with atomic_folder(target) as tmp:
            save_peft_adapter(tmp, trainable["lora"], lora_config, modules_to_save=trainable.get("params") or None,
                              base_model_name_or_path=str(config.base_model), tokenizer=tokenizer)
        return "PEFT adapter"
    save_pretrained({**frozen, **trainable["params"]}, model_config, tokenizer, target)  # atomic itself
    return "HF model"


def run(config, checkpoint: str | Path | None = None, output: str | Path | None = None) -> Path:
    """Consolidate the sharded checkpoint (`checkpoint`, or the latest in output_dir) into `output`
    (default `{output_dir}/merged`); prints one line and returns the folder."""
    from programs import common
    from pure.tree import tree_leaves

    folder = find_sharded_checkpoint(config.output_dir, checkpoint)
    params, model_config, tokenizer = common.load_model(config)
    trainable, frozen, lora_config, step = read_trainable(config, folder, params)
    target = Path(output) if output is not None else Path(config.output_dir) / "merged"
    what = write_merged(config, target, trainable, frozen, model_config, tokenizer, lora_config)
    leaves = tree_leaves(trainable)
    print(f"read the trainable params of step {step} ({sum(t.numel() for t in leaves):,} values in {len(leaves)} "
          f"tensors; optimizer state skipped) from {folder}; wrote the {what} to {target}", flush=True)
    return target


def _options(extra: list[str]) -> dict:
    """`--checkpoint DIR` / `--output DIR` (or `--flag=DIR`) from parse_cli's program arguments."""
    options, i = {}, 0
    while i < len(extra):
        name, _, value = extra[i].partition("=")
        if not value:
            value, i = extra[i + 1], i + 1
        options[name.lstrip("-")] = value
        i += 1
    return options


def main(argv=None) -> int:
    from backends.checkpoint import CheckpointError
    from backends.export import AdapterError
    from backends.hf import ModelLoadError
    from programs import common
    from programs.config import ConfigError, parse_cli

    try:
        config, extra = parse_cli(argv, __doc__.splitlines()[0], program_flags=PROGRAM_FLAGS)
        options = _options(extra)
        run(config, options.get("checkpoint"), options.get("output"))
    except (ConfigError, ModelLoadError, CheckpointError, AdapterError, ValueError, FileExistsError) as e:
        common.fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
