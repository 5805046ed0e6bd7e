"""`--suite grpo`: where the time of a GRPO step goes, measured by running `programs.grpo` itself.

    python -m programs.bench --suite grpo --config configs/grpo-smollm2.yaml [--steps 6] [--warmup 1]
                             [--out grpo_step.json] [--key value ...]

The config trains `--warmup + --steps` steps into a temporary output_dir (no eval, no checkpoints;
`--key value` overrides a key as in every program, e.g. `--trl.beta 0.04` to add the reference
pass, `--trl.use_vllm true` to sample through a running vLLM server). The program times its phases
itself (`time/*` in metrics.jsonl): `sync` (sending the policy to a vLLM engine: LoRA adapter or full
weights; 0 for the native engine), `rollout` (the engine's sampling), `reward` (decoding and the reward functions), `logps` (the old policy's and the
reference's log-probs, when the run needs them) and `train` (the optimizer step: forwards,
backwards, update). The table is their mean over the measured steps that generated (steps that
only replay a stored generation have no rollout), as seconds and as shares of the step, and the
step's wall time (less than the sum where the async producer overlaps sampling with training).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from programs.bench import BenchError

OPTIONS = {"--suite": (str, None), "--config": (str, None), "--steps": (int, 6), "--warmup": (int, 1),
           "--out": (str, "grpo_step.json")}
PHASES = ("sync", "rollout", "reward", "logps", "train")


def split_args(argv: list[str], options: dict | None = None) -> tuple[list[str], list[str]]:
    """(the suite's options, the config overrides): `--flag value` pairs whose flag is not one of
    `options` (this suite's `OPTIONS` by default) are `--key value` config overrides."""
    options = OPTIONS if options is None else options
    own, overrides, i = [], [], 0
    while i < len(argv):
        name, has_value, _ = argv[i].partition("=")
        target = own if name.replace("_", "-") in options else overrides
        target.append(argv[i])
        if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            target.append(argv[i + 1])
            i += 1
        i += 1
    return own, overrides


def split_of(records: list[dict], warmup: int) -> dict:
    """Mean seconds per phase over the generating steps after `warmup`, and the rollout's tokens/s."""
    steps = [r for r in records if "train/loss" in r and r["step"] > warmup and "time/rollout_s" in r]
    if not steps:
        raise BenchError(f"no generating step after the {warmup} warm-up step(s); raise --steps")
    mean = {p: sum(r.get(f"time/{p}_s", 0.0) for r in steps) / len(steps) for p in PHASES}
    total = sum(mean.values())
    tokens = sum(r["completions/mean_length"] for r in steps) / len(steps)
    return {"steps": len(steps), "seconds": mean, "share": {p: mean[p] / total for p in PHASES},
            "step_seconds": total, "wall_seconds": wall_per_step(records, steps), "rollout_tokens_per_second":
                sum(r["rollout/tokens_per_second"] for r in steps) / len(steps),
            "mean_completion_length": tokens}


def wall_per_step(records: list[dict], steps: list[dict]) -> float | None:
    """Mean wall seconds of the measured steps: each step's tokens (the rise of `num_tokens`) over the
    loop's `train/tokens_per_second` for it (logged every step). With async prefetch the phases
    overlap, so this is less than their sum."""
    train = [r for r in records if "train/loss" in r]
    previous = {r["step"]: p for p, r in zip(train, train[1:])}
    walls = [(r["num_tokens"] - previous[r["step"]]["num_tokens"]) / r["train/tokens_per_second"]
             for r in steps if r["step"] in previous and r.get("train/tokens_per_second") and "num_tokens" in r]
    return sum(walls) / len(walls) if walls else None


def table(result: dict) -> str:
    rows = ["| phase | seconds per step | share |", "|---|---|---|"]
    rows += [f"| {p} | {result['seconds'][p]:.2f} | {result['share'][p]:.0%} |" for p in PHASES]
    rows.append(f"| step (sum of the phases) | {result['step_seconds']:.2f} | 100% |")
    if result.get("wall_seconds") is not None:
        rows.append(f"| step (wall) | {result['wall_seconds']:.2f} | |")
    return "\n".join(rows)


def run_suite(options: dict, overrides: list[str]) -> int:
    from programs import grpo
    from programs.config import ConfigError, parse_cli

    if not options["config"]:
        raise BenchError("--suite grpo needs --config (a config with rl: grpo or rl: gdpo)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config, _ = parse_cli(["--config", options["config"], *overrides], "GRPO step bench", program_flags={})
        except ConfigError as err:
            raise BenchError(str(err)) from None
        config = config.model_copy(update={"output_dir": tmp, "max_steps": options["warmup"] + options["steps"],
                                           "save_strategy": "no", "eval_strategy": "no"})
        result = grpo.run(config, overwrite=True)
    split = split_of(result["records"], options["warmup"])
    report = {"config": options["config"], "overrides": overrides, **split}
    Path(options["out"]).write_text(json.dumps(report, indent=1))
    print(table(split))
    print(f"rollout: {split['rollout_tokens_per_second']:.1f} generated tok/s, mean completion "
          f"{split['mean_completion_length']:.1f} tokens; {split['steps']} steps measured; report in {options['out']}")
    return 0
