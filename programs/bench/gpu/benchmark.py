"""The GPU suite's training benchmark: our step and transformers + PEFT (`programs.bench.baselines`)
on the same weights and packed row, LoRA and full fine-tune, with MFU against the measured peak."""
from __future__ import annotations

import gc
import importlib.util
import platform
import time
import traceback
from typing import Callable

import torch

from kernels import select_model_ops
from programs.bench.baselines import hf_model_from_params, with_peft_lora
from programs.bench.gpu.cases import DOCUMENT_LENGTHS, LLAMA_3_2_1B, hf_labels, packed_batch, supervised_tokens
from programs.bench.gpu.checks import TOLERANCE
from programs.bench.gpu.timing import Budget, time_steps
from pure import rng
from pure.lora import LoraConfig, init_lora
from pure.models.config import ModelConfig
from pure.models.llama import init

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), by device-name substring;
# the first fragment in the device's name wins, so a variant ("H100 PCIe") stands before its family.
DATASHEET_BF16_PEAK = (
    ("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100 NVL", 835.0e12), ("H100", 989.4e12),
    ("A100", 312.0e12), ("L40S", 362.0e12), ("A10G", 70.0e12), ("L4", 121.0e12),
)


def datasheet_peak(device_name: str) -> float | None:
    for fragment, flops in DATASHEET_BF16_PEAK:
        if fragment in device_name:
            return flops
    return None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _throughput(timing: dict, flops: float, flops_6n: float, tokens: int, peak: float, nominal: float | None) -> dict:
    seconds = timing["step_s_median"]
    result = {**timing, "tokens_per_s": tokens / seconds, "model_flops_per_step": flops,
              "achieved_flops_per_s": flops / seconds, "mfu": flops / seconds / peak,
              "mfu_6n": flops_6n / seconds / peak}
    if nominal:
        result["mfu_vs_datasheet"] = flops / seconds / nominal
    return result


def bench_ours(config: ModelConfig, params: dict, batch: dict, device: torch.device, *, lora: LoraConfig | None,
               steps: int, warmup: int, dtype: torch.dtype, attention_fn=None) -> tuple[dict, dict, list[str]]:
    """Our train step (LoRA `lora` over all linear layers, or full fine-tune when it is None) with
    the kernels `programs.sft` trains with: (timing, trainable, `name=kernel` of each op the model
    took). `attention_fn` replaces the dispatched attention when given."""
    from pure.losses import sft
    from pure.optim import adamw
    from pure.train import init_train_state, make_apply, make_train_step

    ops = select_model_ops(device, dtype, config.sliding_window)
    if attention_fn is not None:
        ops["attention_fn"] = attention_fn
    if lora is not None:
        trainable = {"lora": init_lora(params, lora, rng.key(1), target_linear=True)}
        bind = make_apply(config, params, lora_config=lora, **ops)
    else:
        trainable = {"params": params}
        bind = make_apply(config, {}, **ops)
    optimizer = adamw(1e-5)
    state = {"state": init_train_state(trainable, optimizer, rng.key(2))}
    train_step = make_train_step(sft, optimizer, bind)

    def step() -> float:
        state["state"], metrics = train_step(state["state"], [batch])
        return float(metrics["train/loss"])

    timing = time_steps(step, device, steps, warmup)
    # the head's dispatcher returns a functools.partial (its chunk sizes bound), named by its function
    used = [f"{name}={getattr(fn, '__name__', None) or fn.func.__name__}" for name, fn in sorted(ops.items())]
    return timing, state["state"].trainable, used


def bench_hf(config: ModelConfig, params: dict, batch: dict, device: torch.device, *, lora: LoraConfig | None,
             steps: int, warmup: int, dtype: torch.dtype) -> dict:
    """transformers + PEFT LoRA `lora` on the linear layers ours adapts, or a full fine-tune, a manual
    loop with torch.optim.AdamW on the same packed row (position_ids restart per document)."""
    model, implementation = hf_model_from_params(config, params, device, dtype)
    if lora is not None:
        model = with_peft_lora(model, lora, target_linear=True)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=device.type == "cuda")
    labels = hf_labels(batch)

    def step() -> float:
        out = model(input_ids=batch["input_ids"], position_ids=batch["positions"], labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    timing = time_steps(step, device, steps, warmup)
    timing["attn_implementation"] = implementation
    timing["trained_params"] = sum(p.numel() for p in trained)
    return timing  # the model and optimizer go with this frame; the caller frees the cache


def run_benchmark(device, *, config: ModelConfig = LLAMA_3_2_1B, document_lengths=DOCUMENT_LENGTHS,
                  lora_rank: int = 16, steps: int = 6, warmup: int = 2, dtype=torch.bfloat16,
                  peak_flops: float, budget: Budget | None = None, log: Callable = print,
                  attention_fn=None) -> dict:
    """LoRA and full fine-tune, ours and HF's, on one packed row; MFU against `peak_flops`.
    `attention_fn`: ours takes the dispatched attention unless given another."""
    from backends.flops import attention_pairs, flop_counter

    device = torch.device(device)
    budget = budget or Budget(float("inf"))
    began = time.perf_counter()
    params = init(config, rng.key(0), dtype=dtype, device=device)
    batch = packed_batch(config, document_lengths, rng.key(4), device)
    tokens, supervised = sum(document_lengths), supervised_tokens(batch)
    pairs = attention_pairs(document_lengths)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    nominal = datasheet_peak(name) if device.type == "cuda" else None
    report = {"model": {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
                        "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                        "kv_heads": config.num_key_value_heads, "vocab": config.vocab_size,
                        "tied": config.tie_word_embeddings, "params": config.num_params(), "dtype": str(dtype)},
              "batch": {"tokens": tokens, "documents": list(document_lengths), "supervised": supervised},
              "init_seconds": round(time.perf_counter() - began, 2), "peak_flops_per_s": peak_flops,
              "datasheet_peak_flops_per_s": nominal}
    log(f"[gpu-suite] model ready in {report['init_seconds']} s")
    have_peft = importlib.util.find_spec("peft") is not None
    for mode, lora in (("lora", LoraConfig(r=lora_rank, alpha=2 * lora_rank)), ("full", None)):
        section = report.setdefault(mode, {})
        if not budget.allows(30):
            section["skipped"] = "time budget"
            continue
        try:
            timing, trainable, used = bench_ours(config, params, batch, device, lora=lora, steps=steps,
                                                 warmup=warmup, dtype=dtype, attention_fn=attention_fn)
            counter = flop_counter(config, trainable)
            adapter = sum(e["A"].numel() + e["B"].numel() for e in trainable.get("lora", {}).values())
            flops = counter.step_flops(tokens, pairs, supervised)
            flops_6n = counter.six_n_flops(tokens, pairs, adapter_params=adapter)
            section["formula"] = counter.formula()
            section["ours"] = _throughput(timing, flops, flops_6n, tokens, peak_flops, nominal)
            section["ours"]["kernels"] = used
            del trainable
        except Exception as error:
            section["ours"] = {"error": f"{type(error).__name__}: {error}",
                               "traceback": traceback.format_exc(limit=6).splitlines()[-12:]}
            flops = flops_6n = None
        _free(device)
        log(f"[gpu-suite] {mode} ours: {_summary(section.get('ours'))}")
        if lora is not None and not have_peft:
            section["hf"] = {"skipped": "peft is not installed"}
        elif not budget.allows(40):
            section["hf"] = {"skipped": "time budget"}
        else:
            try:
                timing = bench_hf(config, params, batch, device, lora=lora, steps=steps, warmup=warmup,
                                  dtype=dtype)
                section["hf"] = (_throughput(timing, flops, flops_6n, tokens, peak_flops, nominal)
                                 if flops is not None else timing)
            except Exception as error:
                section["hf"] = {"error": f"{type(error).__name__}: {error}",
                                 "traceback": traceback.format_exc(limit=6).splitlines()[-12:]}
            _free(device)
            log(f"[gpu-suite] {mode} hf: {_summary(section.get('hf'))}")
        ours, hf = section.get("ours", {}), section.get("hf", {})
        if "step_s_median" in ours and "step_s_median" in hf:
            section["speedup_vs_hf"] = hf["step_s_median"] / ours["step_s_median"]
            # Same weights, same packed row, LoRA B = 0: the first losses must agree (bf16 rounding apart).
            first = [ours["losses"][0], hf["losses"][0]]
            section["first_loss_ours_vs_hf"] = first
            section["first_loss_agrees"] = abs(first[0] - first[1]) <= TOLERANCE[dtype] * abs(first[1])
    del params
    _free(device)
    return report


def _summary(record: dict | None) -> str:
    if not record:
        return "-"
    if "error" in record or "skipped" in record:
        return record.get("error") or record.get("skipped")
    return (f"{record['step_s_median'] * 1e3:.1f} ms/step, {record.get('tokens_per_s', 0):.0f} tok/s, "
            f"MFU {record.get('mfu', 0):.3f}")
