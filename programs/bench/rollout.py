"""`--suite rollout`: GRPO rollout speed, our `NativeEngine` against transformers `model.generate`.

Both sides get the same weights (ours loaded by `backends.hf.load_pretrained`, copied into
transformers' `LlamaForCausalLM`), the same chat-templated prompts left-padded in one batch, the
same sampling settings (temperature, top-p, top-k, min-p, repetition penalty), n completions per
prompt (`num_return_sequences=n` there), `max_new_tokens`, EOS as the stop token and the KV cache.
Each repeat runs ours then transformers (one warm-up call each first, not counted), so machine
drift hits both; the tokens/s of a side is its generated tokens over its seconds, pooled over the
repeats (and per CPU-second of the process, `time.process_time`, which other processes on a
shared machine disturb less than wall time). Only generated tokens count: a completion's tokens up to and including its stop token
(transformers pads the rest of a finished row; neither prompt nor padding is counted).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from programs.bench import BenchError

PROMPTS = (
    "What is 7 times 8?",
    "Name three primary colours.",
    "Write a haiku about autumn.",
    "Explain what a prime number is.",
    "What is the capital of France?",
    "Give me a tip for learning to code.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
)
OPTIONS = {"--suite": (str, None), "--model": (str, "smollm2-135m-instruct"), "--prompts": (int, 8),
           "--n": (int, 4), "--max-tokens": (int, 64), "--repeats": (int, 3), "--threads": (int, 2),
           "--temperature": (float, 1.0), "--top-p": (float, 1.0), "--top-k": (int, 0), "--min-p": (float, 0.0),
           "--repetition-penalty": (float, 1.0), "--seed": (int, 0), "--out": (str, "rollout_bench.json"),
           "--vllm": (bool, False)}


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` prompt token lists: the fixed questions (cycled) in the tokenizer's chat template."""
    questions = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i // len(PROMPTS)})")
                 for i in range(count)]
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True) for q in questions]
    else:
        texts = questions
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def generated_count(rows: torch.Tensor, stop_token_ids) -> int:
    """Generated tokens in transformers' new-token rows [R, T]: up to and including the first stop token."""
    from backends.rollout.native import completion_lengths

    lengths, _ = completion_lengths(rows, torch.tensor(list(stop_token_ids), dtype=torch.long))
    return int(lengths.sum())


def hf_generate(model, prompts: list[list[int]], n: int, sampling, pad_token_id: int, seed: int) -> int:
    """One transformers `generate` call on the left-padded prompts; the generated token count."""
    from backends.rollout.native import left_padded

    tokens, segments, _ = left_padded(prompts, pad_token_id, "cpu")
    torch.manual_seed(seed)  # transformers draws from torch's global generator
    out = model.generate(
        input_ids=tokens, attention_mask=segments, do_sample=not sampling.greedy, num_return_sequences=n,
        max_new_tokens=sampling.max_tokens, min_new_tokens=0, pad_token_id=pad_token_id,
        eos_token_id=list(sampling.stop_token_ids), use_cache=True,
        **({} if sampling.greedy else dict(temperature=sampling.temperature, top_p=sampling.top_p,
                                           top_k=max(sampling.top_k, 0), min_p=sampling.min_p or None)),
        repetition_penalty=sampling.repetition_penalty)
    return generated_count(out[:, tokens.shape[1]:], sampling.stop_token_ids)


def sampling_of(options: dict, stop_token_ids) -> "Sampling":
    from backends.rollout import Sampling

    return Sampling(max_tokens=options["max_tokens"], temperature=options["temperature"], top_p=options["top_p"],
                    top_k=options["top_k"], min_p=options["min_p"], repetition_penalty=options["repetition_penalty"],
                    stop_token_ids=tuple(stop_token_ids))


def measure_rollouts(params: dict, config, prompts: list[list[int]], n: int, sampling, *, pad_token_id: int,
                     repeats: int, seed: int = 0, log=print) -> dict:
    """Both sides on the same prompts, one warm-up call each, then `repeats` rounds alternating
    native -> transformers; per side the pooled generated tokens/s and the runs."""
    from backends.rollout.native import NativeEngine
    from programs.bench.baselines import hf_model_from_params
    from pure import rng

    engine = NativeEngine(config, params, pad_token_id=pad_token_id)
    model, attention = hf_model_from_params(config, params, torch.device("cpu"), next(iter(params.values())).dtype)
    model.config.use_cache = True
    model.eval()

    def native(repeat: int) -> int:
        rollouts = engine.generate({"params": {}}, prompts, n, sampling, rng.fold_in(rng.key(seed), repeat + 1))
        return sum(len(c) for c in rollouts.completion_ids)

    def transformers(repeat: int) -> int:
        with torch.inference_mode():
            return hf_generate(model, prompts, n, sampling, pad_token_id, seed + repeat + 1)

    sides = {"native": native, "transformers": transformers}
    for run in sides.values():  # warm-up: first-call allocations and lazy initialisation, not counted
        run(-1)
    runs = {name: [] for name in sides}
    for r in range(repeats):
        for name, run in sides.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            tokens = run(r)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            runs[name].append({"seconds": seconds, "cpu_seconds": cpu_seconds, "generated_tokens": tokens})
            log(f"repeat {r + 1}/{repeats}: {name} {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tok/s)")
    results = {}
    for name, rs in runs.items():
        seconds, tokens = sum(x["seconds"] for x in rs), sum(x["generated_tokens"] for x in rs)
        cpu_seconds = sum(x["cpu_seconds"] for x in rs)
        results[name] = {"generated_tokens_per_s": tokens / seconds, "generated_tokens_per_cpu_s": tokens / cpu_seconds,
                         "seconds": seconds, "cpu_seconds": cpu_seconds, "generated_tokens": tokens, "runs": rs}
    ratio = results["native"]["generated_tokens_per_s"] / results["transformers"]["generated_tokens_per_s"]
    cpu_ratio = results["native"]["generated_tokens_per_cpu_s"] / results["transformers"]["generated_tokens_per_cpu_s"]
    per_repeat = [a["generated_tokens"] / a["seconds"] / (b["generated_tokens"] / b["seconds"])
                  for a, b in zip(runs["native"], runs["transformers"])]
    return {
        "prompts": len(prompts), "prompt_lengths": [len(p) for p in prompts], "n": n,
        "max_tokens": sampling.max_tokens,
        "sampling": {k: getattr(sampling, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")},
        "stop_token_ids": list(sampling.stop_token_ids), "dtype": str(next(iter(params.values())).dtype).split(".")[-1],
        "threads": torch.get_num_threads(), "repeats": repeats, "hf_attention": attention,
        "load_average": os.getloadavg(), "native_over_transformers_tokens_per_s": ratio,
        "native_over_transformers_tokens_per_cpu_s": cpu_ratio, "ratio_per_repeat": per_repeat, "variants": results,
    }


def measure_vllm(params: dict, config, tokenizer, prompts: list[list[int]], n: int, sampling, *, repeats: int,
                 seed: int = 0, log=print) -> dict:
    """`--vllm`: the same prompts and sampling through a real vLLM server (`.venv-vllm`) for the same
    weights, measured after the native / transformers rounds with the server started only for this
    (an idle server would share the cores with them): one warm-up request, then `repeats` runs."""
    import tempfile

    from backends.rollout.vllm_server import (ServerSettings, VllmServerEngine, VllmServerError, free_port,
                                              save_untied, start_server, stop_server)

    with tempfile.TemporaryDirectory() as tmp:
        save_untied(params, config, tokenizer, Path(tmp) / "model")
        port = free_port()
        longest = max(len(p) for p in prompts) + sampling.max_tokens + 8
        try:
            proc = start_server(ServerSettings(model=str(Path(tmp) / "model"), port=port, max_model_len=longest),
                                log=Path(tmp) / "server.log")
        except VllmServerError as err:
            raise BenchError(f"--vllm: {err}") from None
        try:
            return measure_server(VllmServerEngine("127.0.0.1", port), prompts, n, sampling, repeats=repeats,
                                  seed=seed, log=log)
        finally:
            stop_server(proc)


def measure_server(engine, prompts: list[list[int]], n: int, sampling, *, repeats: int, seed: int = 0,
                   log=print, name: str = "vllm") -> dict:
    """A server engine's generated tokens/s: one warm-up call, then `repeats` timed calls (its CPU time
    is the server's, not this process's, so none is reported)."""
    from pure import rng

    engine.generate({}, prompts, n, sampling, rng.key(seed))
    runs = []
    for r in range(repeats):
        start = time.perf_counter()
        out = engine.generate({}, prompts, n, sampling, rng.fold_in(rng.key(seed), r + 1))
        seconds, tokens = time.perf_counter() - start, sum(len(c) for c in out.completion_ids)
        runs.append({"seconds": seconds, "generated_tokens": tokens})
        log(f"repeat {r + 1}/{repeats}: {name} {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tok/s)")
    seconds, tokens = sum(x["seconds"] for x in runs), sum(x["generated_tokens"] for x in runs)
    return {"generated_tokens_per_s": tokens / seconds, "generated_tokens_per_cpu_s": None, "seconds": seconds,
            "cpu_seconds": None, "generated_tokens": tokens, "runs": runs}


def run_rollout_bench(options: dict, log=print) -> dict:
    """Load `--model` (float32), template the prompts, measure; the report (JSON-ready)."""
    from backends.hf import load_pretrained

    for name in ("prompts", "n", "max_tokens", "repeats", "threads"):
        if options[name] < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {options[name]}")
    try:
        sampling_of(options, ())  # the sampling settings checked before the model loads
    except ValueError as e:
        raise BenchError(str(e)) from None
    # --threads holds for the measurement only: the caller's thread count (and with it how torch splits
    # its reductions, so the bits of everything it computes afterwards) comes back after it
    threads = torch.get_num_threads()
    torch.set_num_threads(options["threads"])
    try:
        params, config, tokenizer = load_pretrained(options["model"], dtype=torch.float32)
        if tokenizer is None:
            raise BenchError(f"--model {options['model']!r} has no tokenizer; the rollout suite needs one for its "
                             "prompts")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        prompts, sampling = chat_prompts(tokenizer, options["prompts"]), sampling_of(options, (tokenizer.eos_token_id,))
        report = measure_rollouts(params, config, prompts, options["n"], sampling, pad_token_id=pad,
                                  repeats=options["repeats"], seed=options["seed"], log=log)
        if options.get("vllm"):
            report["variants"]["vllm"] = measure_vllm(params, config, tokenizer, prompts, options["n"], sampling,
                                                      repeats=options["repeats"], seed=options["seed"], log=log)
    finally:
        torch.set_num_threads(threads)
    return {"suite": "rollout", "model": str(options["model"]), **report}


def markdown_table(report: dict) -> str:
    lines = ["| side | generated tok/s | tok per CPU-s | generated tokens | seconds | CPU seconds |",
             "|---|---|---|---|---|---|"]
    for name, r in report["variants"].items():
        per_cpu = "-" if r["generated_tokens_per_cpu_s"] is None else f"{r['generated_tokens_per_cpu_s']:.1f}"
        cpu = "- (server process)" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.2f}"
        lines.append(f"| {name} | {r['generated_tokens_per_s']:.1f} | {per_cpu} | "
                     f"{r['generated_tokens']} | {r['seconds']:.2f} | {cpu} |")
    s = report["sampling"]
    lines += ["", f"native / transformers tok/s: {report['native_over_transformers_tokens_per_s']:.2f}x (per repeat: "
              f"{', '.join(f'{x:.2f}x' for x in report['ratio_per_repeat'])}); per CPU-second: "
              f"{report['native_over_transformers_tokens_per_cpu_s']:.2f}x",
              f"{report['model']}: {report['prompts']} prompts x {report['n']} completions x {report['max_tokens']} "
              f"max new tokens, {report['dtype']}, {report['threads']} threads, temperature {s['temperature']}, "
              f"top_p {s['top_p']}, top_k {s['top_k']}, min_p {s['min_p']}, repetition_penalty "
              f"{s['repetition_penalty']}; {report['repeats']} repeats alternating native -> transformers after one "
              f"warm-up each; load average {report['load_average'][0]:.2f}"]
    return "\n".join(lines)


def run_suite(options: dict) -> int:
    report = run_rollout_bench(options, log=lambda line: print(line, flush=True))
    out = Path(options["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(markdown_table(report))
    print(f"JSON: {out}")
    return 0
