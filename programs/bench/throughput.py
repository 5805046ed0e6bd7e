"""Throughput of the SFT step against transformers `Trainer` + PEFT: each variant measured in a
fresh process, alternating, and the measured steps pooled.

Our step is the one `programs.sft` builds (`common.load_model`, `prepare_datasets`,
`common.epoch_micro_batches`, `build_trainable`, `build_optimizer_from_config`, `make_bind` /
`make_train_step(sft, ...)`) on the config's real data. Per variant the report has trained (non-pad)
tokens/s, supervised tokens/s (loss terms), the median and IQR of the step time, peak memory (max
RSS on CPU, the CUDA allocator's peak on CUDA), the share of batch slots holding real tokens,
achieved model FLOP/s (formula in `backends/flops.py`) and that as a fraction of the machine's
measured matmul peak.

The baseline (`programs.bench.baselines`) trains the same weights, rank, targets, optimizer,
schedule, batch and sequence length, fed the same tokenised rows (`programs.bench.batches`):
  hf-padded  rows padded per batch by `DataCollatorForSeq2Seq` (axolotl without packing), in the
             permutation our own unpacked batching uses;
  hf-packed  exactly our packed micro-batches, each row rebuilt by `DataCollatorWithFlattening` from
             its documents (position_ids restarting per document, no attention_mask): transformers
             (5.24: masking_utils.find_packed_sequence_indices) turns those position_ids into a
             block-diagonal mask for sdpa, but only when no KV cache is built, so the model runs with
             use_cache=False (as axolotl trains). The first step's loss must equal ours (LoRA's B
             starts at zero, so dropout cannot change it); the report checks that.
Every measured run is a fresh subprocess (peak RSS belongs to one variant), the parent alternates
variants (ours, hf-padded, hf-packed, ours, ...) so machine drift hits all alike, and pools the
measured steps of all repeats. Warm-up steps are run and discarded. HF steps are timed by a
`TrainerCallback` from `on_step_begin` to `on_step_end` (model loading and data preparation are not
counted, for either side).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backends.flops import FlopCounter, flop_counter, measure_matmul_peak
from kernels.measure import peak_memory_mb, synchronize
from programs import common
from programs.bench import BenchError
from programs.bench.baselines import hf_model_of_config, hf_training_arguments
from programs.bench.batches import (PaddedCollator, collate_packed_rows, hf_packed_rows, hf_padded_rows,
                                    load_train_examples, ours_counts, plan_micro_batches)

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("ours", "hf-padded", "hf-packed")
HF_VARIANTS = ("hf-padded", "hf-packed")
# ours vs hf-packed see identical batches and LoRA B = 0 at step 1, so the first losses are the same
# function of the same weights; fp32 with different op order (fused sdpa, cross-entropy) agrees to ~1e-5.
FIRST_LOSS_TOLERANCE = 1e-3


def _step_record(seconds: float, loss: float, counts: list[dict]) -> dict:
    return {"seconds": seconds, "loss": loss, **{k: sum(c[k] for c in counts) for k in counts[0]}}


def measure_ours(config, steps: int, warmup: int, device: str = "cpu") -> dict:
    """Run `warmup + steps` optimizer steps of our SFT step; per-step time, counts and loss."""
    from pure import rng
    from pure.losses import sft
    from pure.train import init_train_state, make_train_step
    from kernels.quantized import params_nbytes
    from pure.tree import leaves_with_paths, tree_map

    device = torch.device(device)
    params, model_config, tokenizer = common.load_model(config)
    examples = load_train_examples(config, tokenizer)
    accumulation = config.gradient_accumulation_steps
    total = warmup + steps
    batches = plan_micro_batches(examples, config, common.pad_id(tokenizer), total * accumulation)
    init_key, lora_key = rng.split(rng.key(config.seed), 2)
    trainable, frozen, lora_config = common.build_trainable(config, params, lora_key)
    del params
    weights_mb = (params_nbytes(frozen) + params_nbytes(dict(leaves_with_paths(trainable)))) / 2**20
    move = (lambda tree: tree_map(lambda t: t.to(device), tree)) if device.type != "cpu" else (lambda tree: tree)
    trainable, frozen = move(trainable), move(frozen)
    optimizer, _ = common.build_optimizer_from_config(config, total)
    bind = common.make_bind(config, model_config, frozen, lora_config)  # the kernels programs.sft uses
    train_step = make_train_step(sft, optimizer, bind)
    state = init_train_state(trainable, optimizer, init_key)
    counter = flop_counter(model_config, trainable)

    records = []
    for s in range(total):
        micro = batches[s * accumulation:(s + 1) * accumulation]
        inputs = [move(common.tensors_only(b)) for b in micro]
        synchronize(device)
        start = time.perf_counter()
        state, metrics = train_step(state, inputs)
        loss = metrics["train/loss"].item()
        synchronize(device)
        records.append(_step_record(time.perf_counter() - start, loss, [ours_counts(b) for b in micro]))
    return {"variant": "ours", "steps": records[warmup:], "warmup_steps": records[:warmup],
            "first_loss": records[0]["loss"], **peak_memory_mb(device), "weights_mb": weights_mb,
            "flop_formula": counter.formula(),
            "flop_counter": counter.__dict__, "threads": torch.get_num_threads(), "device": str(device)}


def measure_hf(config, variant: str, steps: int, warmup: int, device: str = "cpu") -> dict:
    """Run `warmup + steps` optimizer steps of transformers `Trainer` on the `variant` batches."""
    from transformers import Trainer, TrainerCallback

    from backends.hf import load_tokenizer
    from backends.tokenizer import prepare_tokenizer
    from programs.data import tokenizer_edits

    if variant not in HF_VARIANTS:
        raise BenchError(f"unknown baseline variant {variant!r}; expected one of {HF_VARIANTS}")
    device = torch.device(device)
    tokenizer = load_tokenizer(config.tokenizer_config or config.base_model)
    prepare_tokenizer(tokenizer, **tokenizer_edits(config))
    tokenizer.padding_side = "right"  # training pads on the right, as axolotl does
    examples = load_train_examples(config, tokenizer)
    accumulation = config.gradient_accumulation_steps
    total = warmup + steps
    pad_id = common.pad_id(tokenizer)
    if variant == "hf-packed":
        rows = hf_packed_rows(plan_micro_batches(examples, config, pad_id, total * accumulation, packing=True), pad_id)
        collate = collate_packed_rows
    else:
        rows = hf_padded_rows(examples, config, total * accumulation * config.micro_batch_size)
        collate = PaddedCollator(tokenizer)
    model = hf_model_of_config(config, tokenizer, device)

    class StepRecorder(TrainerCallback):
        """Times each optimizer step from on_step_begin to on_step_end; counts come from training_step."""

        def __init__(self):
            self.pending, self.records, self.losses, self.start = [], [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            seconds = time.perf_counter() - self.start
            self.records.append(_step_record(seconds, float(sum(self.losses)), self.pending))
            self.pending, self.losses = [], []

    recorder = StepRecorder()

    class CountingTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            # Our batches in our order (transformers 5 has train_sampling_strategy="sequential" for
            # this; 4.x has no such argument, and this works in both).
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            inputs = dict(inputs)
            recorder.pending.append(inputs.pop("bench_counts"))
            loss = super().training_step(model, inputs, num_items_in_batch)
            recorder.losses.append(loss.item())
            return loss

    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        trainer = CountingTrainer(model=model, args=hf_training_arguments(config, total, tmp, device),
                                  train_dataset=rows, data_collator=collate, callbacks=[recorder])
        trainer.train()
    records = recorder.records
    if len(records) != total:
        raise BenchError(f"{variant}: Trainer ran {len(records)} steps, expected {total}")
    return {"variant": variant, "steps": records[warmup:], "warmup_steps": records[:warmup],
            "first_loss": records[0]["loss"], **peak_memory_mb(device), "threads": torch.get_num_threads(),
            "device": str(device)}


def measure(config, variant: str, steps: int, warmup: int, device: str) -> dict:
    if variant == "ours":
        return measure_ours(config, steps, warmup, device)
    return measure_hf(config, variant, steps, warmup, device)


def run_child(config_path: Path, variant: str, steps: int, warmup: int, device: str, workdir: Path) -> dict:
    """One measured run in a fresh `python -m programs.bench --child VARIANT` process."""
    result = workdir / f"{variant}-{time.monotonic_ns()}.json"
    command = [sys.executable, "-m", "programs.bench", "--config", str(config_path), "--child", variant,
               "--steps", str(steps), "--warmup", str(warmup), "--device", device, "--result", str(result)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        how = f"exit {proc.returncode}"
        if proc.returncode < 0:
            import signal

            how = f"killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode == -signal.SIGKILL:
                how += ", most likely out of memory: try a smaller micro_batch_size or sequence_len"
        raise BenchError(f"the {variant} run failed ({how}):\n{tail}")
    return json.loads(result.read_text())


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


def aggregate(runs: list[dict], counter, peak_flops: float) -> dict:
    """Pool the measured steps of every run of one variant."""
    steps = [s for run in runs for s in run["steps"]]
    seconds = sum(s["seconds"] for s in steps)
    times = [s["seconds"] for s in steps]
    totals = {k: sum(s[k] for s in steps) for k in ("tokens", "supervised", "slots", "pairs")}
    flops = sum(counter.step_flops(s["tokens"], s["pairs"], s["supervised"]) for s in steps)
    return {
        "trained_tokens_per_s": totals["tokens"] / seconds,
        "supervised_tokens_per_s": totals["supervised"] / seconds,
        "step_time_median_s": _quantile(times, 0.5),
        "step_time_iqr_s": _quantile(times, 0.75) - _quantile(times, 0.25),
        "step_time_min_s": min(times), "step_time_max_s": max(times),
        "peak_memory_mb": max(run["peak_mb"] for run in runs),
        "max_rss_mb": max(run["rss_mb"] for run in runs),
        # resident params (quantised weights with their state); ours only
        **({"weights_mb": runs[0]["weights_mb"]} if "weights_mb" in runs[0] else {}),
        "slot_efficiency": totals["tokens"] / totals["slots"],
        "flops_per_step_mean": flops / len(steps),
        "flops_per_s": flops / seconds,
        "fraction_of_peak": flops / seconds / peak_flops,
        "first_step_loss": runs[0]["first_loss"],
        "measured_steps": len(steps), **{f"total_{k}": v for k, v in totals.items()},
        "runs": runs,
    }


def run_bench(config, config_path: Path | None, *, steps: int = 10, warmup: int = 2, baseline: str | None = None,
              repeats: int = 2, device: str = "cpu", isolate: bool = True, peak_size: int = 2048,
              baseline_steps: int | None = None, log=print) -> dict:
    """Measure ours (and the baseline variants) `repeats` times each, alternating, and aggregate.

    `config_path`: the YAML the child processes load (None: the resolved `config` written to a temporary
    folder). `isolate=False` runs every variant in this process (tests): faster, but peak memory is then
    the process's, shared by all variants, and the report says so. `baseline_steps` (default `steps`)
    shortens the baseline runs (tests).
    """
    from backends.hf import load_config as load_model_config, load_tokenizer, resolve_model_path
    from backends.tokenizer import prepare_tokenizer
    from programs.data import tokenizer_edits

    baseline_steps = steps if baseline_steps is None else baseline_steps
    if min(steps, baseline_steps) < 1 or warmup < 0 or repeats < 1:
        raise BenchError(f"need --steps >= 1, --warmup >= 0, --repeats >= 1; got {steps}, {warmup}, {repeats}")
    if baseline not in (None, "hf"):
        raise BenchError(f"--baseline {baseline!r} is not known; the one baseline is 'hf'")
    variants = ["ours"] + (list(HF_VARIANTS) if baseline == "hf" else [])

    # Prepare the data once here (the runs then read the cache) and measure the packing of one epoch.
    tokenizer = load_tokenizer(config.tokenizer_config or config.base_model)
    prepare_tokenizer(tokenizer, **tokenizer_edits(config))
    examples = load_train_examples(config, tokenizer)
    epoch = common.epoch_micro_batches(examples, config, common.pad_id(tokenizer), 0)
    real = sum(b["num_tokens"] for b in epoch)
    rows = sum(b["input_ids"].shape[0] for b in epoch)
    packing_efficiency = real / (rows * config.sequence_len)
    model_config = load_model_config(resolve_model_path(config.base_model))
    peak = measure_matmul_peak(device, size=peak_size)
    log(f"matmul peak on {device}: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['size']}^3 fp32, best of "
        f"{peak['repeats']}, {peak['threads']} threads); load average {os.getloadavg()[0]:.2f}")

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    order = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if isolate and config_path is None:
            from programs.config import write_resolved_config

            config_path = write_resolved_config(config, tmp)
        for r in range(repeats):
            for v in variants:
                n = steps if v == "ours" else baseline_steps
                log(f"run {r + 1}/{repeats}: {v} ({warmup} warm-up + {n} measured steps)")
                started = time.perf_counter()
                result = (run_child(Path(config_path), v, n, warmup, device, Path(tmp)) if isolate
                          else measure(config, v, n, warmup, device))
                result["wall_s"] = time.perf_counter() - started
                runs[v].append(result)
                order.append(v)

    counter = FlopCounter(**runs["ours"][0]["flop_counter"])
    results = {v: aggregate(runs[v], counter, peak["flops_per_s"]) for v in variants}
    for v in variants:
        results[v]["ours_over_this_tokens_per_s"] = (results["ours"]["trained_tokens_per_s"]
                                                     / results[v]["trained_tokens_per_s"])
        results[v]["ours_over_this_peak_memory"] = results["ours"]["peak_memory_mb"] / results[v]["peak_memory_mb"]
    notes = []
    if "hf-packed" in results and config.sample_packing:
        gap = abs(results["hf-packed"]["first_step_loss"] - results["ours"]["first_step_loss"])
        agree = gap <= FIRST_LOSS_TOLERANCE
        notes.append(f"first-step loss on identical packed batches: ours {results['ours']['first_step_loss']:.6f}, "
                     f"hf-packed {results['hf-packed']['first_step_loss']:.6f} (|diff| {gap:.2e}"
                     + (")" if agree else f" > {FIRST_LOSS_TOLERANCE}: transformers did not keep the packed documents "
                                          "apart; the hf-packed row is not a valid comparison)"))
    if not isolate:
        notes.append("runs shared one process (isolate=False): peak memory is the process's, not per variant")
    return {
        "config": json.loads(json.dumps(config.to_dict(), default=str)), "base_model": str(config.base_model),
        "device": device, "threads": torch.get_num_threads(), "steps": steps, "baseline_steps": baseline_steps,
        "warmup": warmup, "repeats": repeats,
        "order": order, "sequence_len": config.sequence_len, "micro_batch_size": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "sample_packing": bool(config.sample_packing), "packing_efficiency": packing_efficiency,
        "packing_rows": rows, "examples": len(examples), "model": model_config.__dict__ | {"extra": None},
        "peak": peak, "flop_formula": counter.formula(), "load_average": os.getloadavg(),
        "isolated": isolate, "notes": notes, "variants": results,
    }
