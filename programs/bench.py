"""Throughput benchmark of the SFT step, optionally against transformers `Trainer` + PEFT.

    python -m programs.bench --config x.yaml [--steps N] [--warmup W] [--baseline hf] [--repeats R]
                             [--device cpu|cuda] [--out bench.json] [--key value ...]

Runs the config's training step (the same pieces `programs.sft` builds: `common.load_model`,
`prepare_datasets`, `common.epoch_micro_batches`, `build_trainable`, `build_optimizer_from_config`,
`make_apply` / `make_train_step(sft, ...)`) on the config's real data, and reports per variant:
trained (non-pad) tokens/s, supervised tokens/s (loss terms), the median and IQR of the step time,
peak memory (max RSS on CPU, the CUDA allocator's peak on CUDA), the share of batch slots holding
real tokens, achieved model FLOP/s (formula in `backends/flops.py`, printed with the table) and that
as a fraction of the machine's measured matmul peak.

`--baseline hf` adds transformers `Trainer` + PEFT LoRA on the same weights, rank, targets,
optimizer, schedule, batch and sequence length, fed the same tokenised rows:
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

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backends.flops import FlopCounter, attention_pairs, flop_counter, measure_matmul_peak
from programs import common

DESCRIPTION = "Benchmark the SFT train step (and transformers Trainer + PEFT with --baseline hf)."
REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("ours", "hf-padded", "hf-packed")
HF_VARIANTS = ("hf-padded", "hf-packed")
# ours vs hf-packed see identical batches and LoRA B = 0 at step 1, so the first losses are the same
# function of the same weights; fp32 with different op order (fused sdpa, cross-entropy) agrees to ~1e-5.
FIRST_LOSS_TOLERANCE = 1e-3
BENCH_FLAGS = {"--steps": True, "--warmup": True, "--baseline": True, "--out": True, "--repeats": True,
               "--device": True, "--child": True, "--result": True, "--in-process": False}


class BenchError(RuntimeError):
    """A benchmark run that failed, naming the variant and what went wrong."""


# ---------------------------------------------------------------------------------------------
# The batches every variant trains on
# ---------------------------------------------------------------------------------------------


def plan_micro_batches(examples, config, pad_id: int, count: int, packing: bool | None = None) -> list[dict]:
    """The first `count` full micro-batches (exactly `micro_batch_size` rows) of epochs 0, 1, ..., as
    `common.epoch_micro_batches` makes them; a short last batch of an epoch is skipped so a trainer
    with a fixed batch size can see the very same batches."""
    batches, epoch = [], 0
    while len(batches) < count:
        full = [b for b in common.epoch_micro_batches(examples, config, pad_id, epoch, packing=packing)
                if b["input_ids"].shape[0] == config.micro_batch_size]
        if not full:
            raise BenchError(f"the training data makes no full micro-batch of micro_batch_size "
                             f"{config.micro_batch_size}; lower micro_batch_size or add data")
        batches += full
        epoch += 1
    return batches[:count]


def document_lengths(segment_ids: torch.Tensor) -> list[int]:
    """Lengths of the documents of a [B, T] segment-id batch (0 = padding, 1..n = documents per row)."""
    lengths = []
    for row in segment_ids.numpy():
        counts = np.bincount(row)
        lengths += [int(c) for c in counts[1:] if c]
    return lengths


def batch_counts(lengths: list[int], supervised: int, slots: int) -> dict:
    """What a step credits a micro-batch with: real tokens, loss terms, slots, causal attention pairs."""
    return {"tokens": int(sum(lengths)), "supervised": int(supervised), "slots": int(slots),
            "pairs": attention_pairs(lengths)}


def ours_counts(batch: dict) -> dict:
    return batch_counts(document_lengths(batch["segment_ids"]), batch["num_trained"], batch["input_ids"].numel())


def load_train_examples(config, tokenizer) -> list[dict]:
    from backends.datasets import prepare_datasets
    from programs.data import data_spec

    data = prepare_datasets(data_spec(config), tokenizer)
    return [dict(input_ids=r["input_ids"], labels=r["labels"]) for r in data.train]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> dict:
    """Peak memory of this process: the CUDA allocator's peak on CUDA, max RSS always."""
    import resource

    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else out["rss_mb"]
    return out


def _step_record(seconds: float, loss: float, counts: list[dict]) -> dict:
    return {"seconds": seconds, "loss": loss, **{k: sum(c[k] for c in counts) for k in counts[0]}}


# ---------------------------------------------------------------------------------------------
# Our step
# ---------------------------------------------------------------------------------------------


def measure_ours(config, steps: int, warmup: int, device: str = "cpu") -> dict:
    """Run `warmup + steps` optimizer steps of our SFT step; per-step time, counts and loss."""
    from pure import rng
    from pure.losses import sft
    from pure.train import init_train_state, make_train_step
    from pure.tree import tree_map

    device = torch.device(device)
    params, model_config, tokenizer = common.load_model(config)
    examples = load_train_examples(config, tokenizer)
    accumulation = config.gradient_accumulation_steps or 1
    total = warmup + steps
    batches = plan_micro_batches(examples, config, common.pad_id(tokenizer), total * accumulation)
    init_key, lora_key = rng.split(rng.key(common.seed_of(config)), 2)
    trainable, frozen, lora_config = common.build_trainable(config, params, lora_key)
    del params
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
        _sync(device)
        start = time.perf_counter()
        state, metrics = train_step(state, inputs)
        loss = metrics["train/loss"].item()
        _sync(device)
        records.append(_step_record(time.perf_counter() - start, loss, [ours_counts(b) for b in micro]))
    return {"variant": "ours", "steps": records[warmup:], "warmup_steps": records[:warmup],
            "first_loss": records[0]["loss"], **peak_memory_mb(device), "flop_formula": counter.formula(),
            "flop_counter": counter.__dict__, "threads": torch.get_num_threads(), "device": str(device)}


# ---------------------------------------------------------------------------------------------
# The transformers Trainer + PEFT baseline
# ---------------------------------------------------------------------------------------------


def hf_packed_rows(micro_batches: list[dict], pad_id: int) -> list[dict]:
    """Our packed micro-batches as Trainer rows: each row's documents flattened by transformers'
    `DataCollatorWithFlattening` (labels' first token -100, position_ids restarting at 0), then
    right-padded to our row width (pad id, label -100, position 0)."""
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    rows = []
    for batch in micro_batches:
        width = batch["input_ids"].shape[1]
        for r in range(batch["input_ids"].shape[0]):
            seg, ids, labels = batch["segment_ids"][r], batch["input_ids"][r], batch["labels"][r]
            docs = [{"input_ids": ids[seg == s].tolist(), "labels": labels[seg == s].tolist()}
                    for s in range(1, int(seg.max()) + 1)]
            flat = flatten(docs)
            n = flat["input_ids"].shape[1]
            row = {"input_ids": torch.full((width,), pad_id, dtype=torch.long),
                   "labels": torch.full((width,), -100, dtype=torch.long),
                   "position_ids": torch.zeros(width, dtype=torch.long)}
            for key in row:
                row[key][:n] = flat[key][0]
            lengths = [len(d["input_ids"]) for d in docs]
            row["bench_counts"] = batch_counts(lengths, int((row["labels"][1:] != -100).sum()), width)
            rows.append(row)
    return rows


def collate_packed_rows(rows: list[dict]) -> dict:
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}
    batch["bench_counts"] = {k: sum(r["bench_counts"][k] for r in rows) for k in rows[0]["bench_counts"]}
    return batch


def hf_padded_rows(examples, config, count: int) -> list[dict]:
    """`count` rows in the order our unpacked batching visits them (a (seed, epoch) permutation per epoch)."""
    from pure import rng

    rows, epoch, seed = [], 0, common.seed_of(config)
    while len(rows) < count:
        order = rng.permutation(rng.fold_in(rng.key(seed), epoch), len(examples)).tolist()
        rows += [{"input_ids": list(examples[i]["input_ids"]), "labels": list(examples[i]["labels"])} for i in order]
        epoch += 1
    return rows[:count]


class _PaddedCollator:
    """`DataCollatorForSeq2Seq` (pad to the longest row, labels padded with -100) plus the step counts."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")

    def __call__(self, rows):
        batch = dict(self.pad(rows))
        lengths = batch["attention_mask"].sum(1).tolist()
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        batch["bench_counts"] = batch_counts(lengths, supervised, batch["input_ids"].numel())
        return batch


def _hf_training_arguments(config, total: int, output_dir: str, device: torch.device):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=output_dir, max_steps=total, per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps or 1,
        optim=config.optimizer or "adamw_torch_fused", learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler or "cosine", weight_decay=config.weight_decay or 0.0,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm is not None else 0.0,
        seed=common.seed_of(config), data_seed=common.seed_of(config),
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


def load_hf_model(config, tokenizer, device: torch.device):
    """transformers model (fp32, sdpa, no KV cache) on the same local HF folder our loader reads, with PEFT
    LoRA on the same modules."""
    from transformers import AutoModelForCausalLM

    from backends.hf import resolve_model_path
    from pure.lora import target_paths

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.base_model), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    # Training builds no KV cache (axolotl sets this too). It matters for packing: transformers 5.24 derives
    # the block-diagonal mask from position_ids only when no cache is passed, so with the config's default
    # use_cache=True a training forward silently attends across packed documents.
    model.config.use_cache = False
    if len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)  # ours: new rows = mean of old
    if config.adapter != "lora":
        return model.to(device)
    from peft import LoraConfig, get_peft_model

    ours = common.lora_config_of(config)
    params = {name: p for name, p in model.named_parameters()}
    paths = target_paths(params, config.lora_target_modules, target_linear=bool(config.lora_target_linear))
    peft_config = LoraConfig(r=ours.r, lora_alpha=ours.alpha, lora_dropout=ours.dropout, target_modules=paths,
                             bias="none", task_type="CAUSAL_LM", use_rslora=ours.use_rslora, use_dora=ours.use_dora,
                             modules_to_save=list(config.lora_modules_to_save or []) or None)
    return get_peft_model(model, peft_config).to(device)


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
    accumulation = config.gradient_accumulation_steps or 1
    total = warmup + steps
    pad_id = common.pad_id(tokenizer)
    if variant == "hf-packed":
        rows = hf_packed_rows(plan_micro_batches(examples, config, pad_id, total * accumulation, packing=True), pad_id)
        collate = collate_packed_rows
    else:
        rows = hf_padded_rows(examples, config, total * accumulation * config.micro_batch_size)
        collate = _PaddedCollator(tokenizer)
    model = load_hf_model(config, tokenizer, device)

    class StepRecorder(TrainerCallback):
        """Times each optimizer step from on_step_begin to on_step_end; counts come from training_step."""

        def __init__(self):
            self.pending, self.records, self.losses, self.start = [], [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
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
        trainer = CountingTrainer(model=model, args=_hf_training_arguments(config, total, tmp, device),
                                  train_dataset=rows, data_collator=collate, callbacks=[recorder])
        trainer.train()
    records = recorder.records
    if len(records) != total:
        raise BenchError(f"{variant}: Trainer ran {len(records)} steps, expected {total}")
    return {"variant": variant, "steps": records[warmup:], "warmup_steps": records[:warmup],
            "first_loss": records[0]["loss"], **peak_memory_mb(device), "threads": torch.get_num_threads(),
            "device": str(device)}


# ---------------------------------------------------------------------------------------------
# The parent: alternate fresh child processes, aggregate, report
# ---------------------------------------------------------------------------------------------


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
        "gradient_accumulation_steps": config.gradient_accumulation_steps or 1,
        "sample_packing": bool(config.sample_packing), "packing_efficiency": packing_efficiency,
        "packing_rows": rows, "examples": len(examples), "model": model_config.__dict__ | {"extra": None},
        "peak": peak, "flop_formula": counter.formula(), "load_average": os.getloadavg(),
        "isolated": isolate, "notes": notes, "variants": results,
    }


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}".rstrip()


def markdown_table(report: dict) -> str:
    """The report as a markdown table plus the lines that say how to read it."""
    head = ("| variant | trained tok/s | supervised tok/s | step median (IQR) s | peak MB | real-token share "
            "| FLOP/s | of peak | ours / this tok/s | ours / this memory |")
    lines = [head, "|" + "---|" * 10]
    for name, r in report["variants"].items():
        lines.append(
            f"| {name} | {r['trained_tokens_per_s']:.1f} | {r['supervised_tokens_per_s']:.1f} | "
            f"{r['step_time_median_s']:.3f} ({r['step_time_iqr_s']:.3f}) | {r['peak_memory_mb']:.0f} | "
            f"{r['slot_efficiency']:.3f} | {_si(r['flops_per_s'], 'FLOP/s')} | {100 * r['fraction_of_peak']:.1f}% | "
            f"{r['ours_over_this_tokens_per_s']:.2f}x | {r['ours_over_this_peak_memory']:.2f}x |")
    peak = report["peak"]
    lines += [
        "",
        f"{report['base_model']}, sequence_len {report['sequence_len']}, micro_batch_size "
        f"{report['micro_batch_size']} x accumulation {report['gradient_accumulation_steps']}, "
        f"{report['steps']} measured steps after {report['warmup']} warm-up, x{report['repeats']} runs "
        f"alternating {' -> '.join(report['order'][:len(report['variants'])])}; {report['device']}, "
        f"{report['threads']} threads, load average {report['load_average'][0]:.2f}",
        f"packing efficiency (epoch 0, real tokens / (rows x sequence_len)): {report['packing_efficiency']:.3f} "
        f"over {report['packing_rows']} rows of {report['examples']} examples",
        f"FLOPs: {report['flop_formula']}",
        f"peak: {_si(peak['flops_per_s'], 'FLOP/s')} measured ({peak['size']}^3 {peak['dtype']} matmul, best of "
        f"{peak['repeats']})",
        "peak MB: max RSS of the run's process on CPU, CUDA allocator peak on CUDA",
    ] + report["notes"]
    return "\n".join(lines)


def _parse_bench_flags(extra: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m programs.bench", add_help=False)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--baseline", choices=["hf"], default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=VARIANTS, default=None)
    parser.add_argument("--result", default=None)
    parser.add_argument("--in-process", action="store_true")
    return parser.parse_args(extra)


def run_suite(argv: list[str]) -> int:
    """`--suite gpu`: CUDA correctness of every kernel, packed attention, and the 1B-shaped benchmark
    (`programs.gpu_suite`); needs nothing but the repo and the GPU image's torch/transformers/triton."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m programs.bench --suite gpu")
    parser.add_argument("--suite", choices=["gpu"], required=True)
    parser.add_argument("--out", default="gpu_suite.json")
    parser.add_argument("--budget-s", type=float, default=450.0)
    args = parser.parse_args(argv)
    from programs.gpu_suite import run_gpu_suite

    try:
        run_gpu_suite(args.out, budget_s=args.budget_s)
    except RuntimeError as e:
        common.fail(str(e))
    print(f"JSON: {args.out}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--suite" in argv:  # python -m programs.bench --suite gpu [--out suite.json]
        # Before the config machinery: the GPU image has torch / transformers / triton, no pydantic.
        return run_suite(argv)
    from backends.hf import ModelLoadError
    from programs.config import ConfigError, parse_cli
    from pure.data.settings import DataError

    try:
        config, extra = parse_cli(argv, DESCRIPTION, program_flags=BENCH_FLAGS)
        args = _parse_bench_flags(extra)
        if args.child:  # one measured run, in its own process
            result = measure(config, args.child, args.steps, args.warmup, args.device)
            Path(args.result).write_text(json.dumps(result))
            return 0
        report = run_bench(config, None, steps=args.steps, warmup=args.warmup, baseline=args.baseline,
                           repeats=args.repeats, device=args.device, isolate=not args.in_process,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
        out = Path(args.out) if args.out else Path(config.output_dir) / "bench.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        print(markdown_table(report))
        print(f"JSON: {out}")
    except (ConfigError, DataError, ModelLoadError, BenchError, ValueError) as e:
        common.fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
