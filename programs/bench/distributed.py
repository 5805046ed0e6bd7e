"""`python -m programs.bench --suite distributed --config x.yaml [--world 2] [--steps 4] [--warmup 1]
[--repeats 2] [--out F.json] [--key value ...]`: the SFT step in one process and at `--world`
processes under torchrun (gloo on CPU, nccl on CUDA), on the same global batches.

Each run is its own process (or torchrun world), alternating the sides `--repeats` times. Every
rank reports what it holds of the train state as placed by the config's sharding plan
(`programs.launch`): the bytes of its trained params, its gradients (as the optimizer receives
them, after the reduce-scatter or all-reduce) and its optimizer state, their sum, its peak RSS,
and the step time (the slowest rank's, measured between barriers). The table shows rank 0's bytes
and the median step time over the runs; `per_rank` in the JSON has every rank's numbers.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from programs.bench import BenchError

OPTIONS = {"--suite": (str, None), "--config": (str, None), "--world": (int, 2), "--steps": (int, 4), "--warmup": (int, 1),
           "--repeats": (int, 2), "--out": (str, "distributed_bench.json")}


def local_bytes(tree) -> int:
    """The bytes of the tensors of `tree` this process holds (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    from pure.tree import tree_leaves

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tree_leaves(tree)
               if isinstance(t, torch.Tensor))


def measure_rank(config, steps: int, warmup: int) -> dict:
    """Run `warmup + steps` SFT steps in this process's layout; this rank's bytes and step times."""
    from kernels.measure import max_rss_mb
    from programs import common, launch
    from programs.bench.batches import load_train_examples, plan_micro_batches
    from pure import rng
    from pure.losses import sft
    from pure.optim.base import GradientTransformation
    from pure.train import init_train_state

    layout = launch.layout_of(config)
    params, model_config, tokenizer = common.load_model(config)
    with layout.main_first():
        examples = load_train_examples(config, tokenizer)
    accumulation, total = config.gradient_accumulation_steps, warmup + steps
    batches = plan_micro_batches(examples, config, common.pad_id(tokenizer), total * accumulation)
    init_key, lora_key = rng.split(rng.key(config.seed), 2)
    trainable, frozen, lora_config = common.build_trainable(config, params, lora_key)
    del params
    optimizer, _ = common.build_optimizer_from_config(config, total)
    grad_bytes = []

    def update(grads, state, params=None, step=0):  # the gradients as the optimizer gets them
        grad_bytes.append(local_bytes(grads))
        return optimizer.update(grads, state, params, step)

    measured = GradientTransformation(optimizer.init, update)
    train_step, _ = layout.steps(sft, measured, common.make_bind(config, model_config, frozen, lora_config, layout))
    state = layout.place(init_train_state(trainable, measured, init_key))
    del trainable
    seconds = []
    for s in range(total):
        micro = [common.tensors_only(b) for b in batches[s * accumulation:(s + 1) * accumulation]]
        if layout.distributed:
            torch.distributed.barrier()
        start = time.perf_counter()
        state, metrics = train_step(state, micro)
        metrics["train/loss"].item()
        if layout.distributed:
            torch.distributed.barrier()  # the step ends when the slowest rank is done
        seconds.append(time.perf_counter() - start)
    params_b, opt_b = local_bytes(state.trainable), local_bytes(state.opt_state)
    strategy = "one process" if not layout.distributed else "tp" if layout.tensor_parallel else layout.plan.strategy
    return {"rank": layout.rank, "world": layout.world, "strategy": strategy,
            "params_bytes": params_b, "grads_bytes": grad_bytes[-1], "optimizer_bytes": opt_b,
            "state_bytes": params_b + grad_bytes[-1] + opt_b, "frozen_bytes": local_bytes(frozen),
            "peak_rss_mb": max_rss_mb(), "step_seconds": seconds[warmup:], "loss": float(metrics["train/loss"]),
            "threads": torch.get_num_threads()}


def child_main(argv: list[str]) -> int:
    """One measured run: `python -m programs.bench.distributed RESULT_PREFIX STEPS WARMUP --config x.yaml ...`
    (under torchrun for a world); each rank writes RESULT_PREFIX.rank<r>.json."""
    from programs.config import parse_cli

    prefix, steps, warmup, rest = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    config, _ = parse_cli(rest, "distributed bench child", program_flags={})
    result = measure_rank(config, steps, warmup)
    Path(f"{prefix}.rank{result['rank']}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def launch_run(world: int, prefix: Path, options: dict, overrides: list[str]) -> list[dict]:
    """Start one measured run at `world` processes and read every rank's result."""
    child = ["-m", "programs.bench.distributed", str(prefix), str(options["steps"]), str(options["warmup"]),
             "--config", options["config"], *overrides]
    command = [sys.executable, *child] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--standalone", *child]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"the run at world size {world} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(world)]


def run_suite(options: dict, overrides: list[str]) -> int:
    if not options["config"]:
        raise BenchError("--suite distributed needs --config (an SFT config; its sharding keys set the layout)")
    worlds = (1, options["world"])
    runs = {world: [] for world in worlds}
    order = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(options["repeats"]):
            for world in worlds if repeat % 2 == 0 else worlds[::-1]:  # alternate the sides
                order.append(world)
                print(f"run {len(order)}: world size {world}", file=sys.stderr, flush=True)
                runs[world].append(launch_run(world, Path(tmp) / f"r{len(order)}", options,
                                              [*overrides, "--output_dir", str(Path(tmp) / f"out{len(order)}")]))
    report = {"config": options["config"], "overrides": overrides, "order": order, "load_average": os.getloadavg(),
              "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(), "worlds": {}}
    for world, results in runs.items():
        ranks = results[0]
        step = [max(r["step_seconds"][i] for r in run) for run in results for i in range(len(run[0]["step_seconds"]))]
        report["worlds"][world] = {
            "strategy": ranks[0]["strategy"], "per_rank": ranks, "step_seconds_median": statistics.median(step),
            "step_seconds_all": step, **{key: ranks[0][key] for key in (
                "params_bytes", "grads_bytes", "optimizer_bytes", "state_bytes", "frozen_bytes", "peak_rss_mb")},
            "losses": [run[0]["loss"] for run in results]}
    Path(options["out"]).write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"JSON: {options['out']}")
    return 0


def table(report: dict) -> str:
    one = report["worlds"][1]
    mib = 2 ** 20
    lines = ["| world | layout | params MiB | grads MiB | optimizer MiB | params+grads+optimizer MiB (of 1 process) "
             "| frozen MiB | peak RSS MiB | step median s |", "|" + "---|" * 9]
    for world, r in report["worlds"].items():
        lines.append(f"| {world} | {r['strategy']} | {r['params_bytes'] / mib:.1f} | {r['grads_bytes'] / mib:.1f} | "
                     f"{r['optimizer_bytes'] / mib:.1f} | {r['state_bytes'] / mib:.1f} "
                     f"({r['state_bytes'] / one['state_bytes']:.2f}x) | {r['frozen_bytes'] / mib:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['step_seconds_median']:.3f} |")
    lines += ["", f"bytes: rank 0's local tensors (per_rank in the JSON has each rank's); frozen: the program's "
                  "frozen params, whole on every rank (under TP the forward holds its shards of them besides); "
                  "step: the slowest rank's, "
                  f"between barriers; runs alternated {' -> '.join(map(str, report['order']))}; "
                  f"{report['cpu_count']} CPUs, load average {report['load_average'][0]:.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
