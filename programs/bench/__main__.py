"""`python -m programs.bench`: the SFT step's throughput against transformers `Trainer` + PEFT, or the GPU suite.

    python -m programs.bench --config x.yaml [--baseline hf] [--steps N] [--warmup W] [--repeats R]
                             [--device cpu|cuda] [--out bench.json] [--key value ...]
    python -m programs.bench --suite gpu [--out gpu_suite.json] [--budget-s S]
    python -m programs.bench --suite rollout [--model smollm2-135m-instruct] [--prompts 8 --n 4 --max-tokens 64] [--vllm]
    python -m programs.bench --suite grpo --config configs/grpo-smollm2.yaml [--steps 6] [--key value ...]
                             [--threads 2] [--repeats 3] [--temperature T --top-p P --top-k K] [--out F.json]
    python -m programs.bench --suite distributed --config x.yaml [--world 2] [--steps 4] [--warmup 1]
                             [--repeats 2] [--out F.json] [--key value ...]

The first prints a markdown table and writes the whole report as JSON (`programs.bench.throughput`);
`--key value` overrides a config key as in every program. The second runs `programs.bench.gpu` with
nothing but the GPU image's torch / transformers / triton (no pydantic: the config is never read).
The third times GRPO rollouts, our `NativeEngine` against transformers `generate` (`programs.bench.rollout`).
The fifth runs the SFT step in one process and under torchrun: per-rank state bytes and step time
(`programs.bench.distributed`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from programs import common
from programs.bench import BenchError

DESCRIPTION = "Benchmark the SFT train step (and transformers Trainer + PEFT with --baseline hf)."
# The program's own options, flag -> (type, default); a bool option takes no value. `--child VARIANT
# --result FILE` is one measured run in its own process (`throughput.run_child`); `--in-process`
# runs every variant in this one. `--device` defaults to cuda where there is one.
OPTIONS = {"--steps": (int, 10), "--warmup": (int, 2), "--baseline": (str, None), "--repeats": (int, 2),
           "--device": (str, None), "--out": (str, None), "--child": (str, None), "--result": (str, None),
           "--in-process": (bool, False)}
SUITE_OPTIONS = {"--suite": (str, None), "--out": (str, "gpu_suite.json"), "--budget-s": (float, 450.0)}


def read_options(args: list[str], options: dict) -> dict:
    """The values of `options` in `args` (`--flag value`, `--flag=value`, `--flag_name`, a bool flag
    alone), keyed by name (`budget_s`); the defaults for those not given."""
    values = {flag[2:].replace("-", "_"): default for flag, (_, default) in options.items()}
    i = 0
    while i < len(args):
        name, has_value, value = args[i].partition("=")
        flag = "--" + name.lstrip("-").replace("_", "-")
        if flag not in options:
            raise BenchError(f"unknown option {name!r}; expected one of {', '.join(options)}")
        kind, _ = options[flag]
        if kind is not bool and not has_value:
            if i + 1 >= len(args):
                raise BenchError(f"{flag} needs a value")
            i += 1
            value = args[i]
        try:
            values[flag[2:].replace("-", "_")] = True if kind is bool else kind(value)
        except ValueError:
            raise BenchError(f"{flag} expects {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        i += 1
    return values


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
    ] + ([f"ours: params resident {report['variants']['ours']['weights_mb']:.1f} MB (quantised weights counted "
          "with their bitsandbytes state)"] if "weights_mb" in report["variants"].get("ours", {}) else []) + report["notes"]
    return "\n".join(lines)


def suite_of(argv: list[str]) -> str | None:
    """The value of `--suite` in `argv` (`--suite x` or `--suite=x`), None when absent."""
    for i, arg in enumerate(argv):
        name, has_value, value = arg.partition("=")
        if name == "--suite":
            return value if has_value else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def run_suite(argv: list[str]) -> int:
    suite = suite_of(argv)
    if suite == "rollout":
        from programs.bench import rollout

        return rollout.run_suite(read_options(argv, rollout.OPTIONS))
    if suite == "grpo":
        from programs.bench import grpo_step

        own, overrides = grpo_step.split_args(argv)
        return grpo_step.run_suite(read_options(own, grpo_step.OPTIONS), overrides)
    if suite == "distributed":
        from programs.bench import distributed, grpo_step

        own, overrides = grpo_step.split_args(argv, distributed.OPTIONS)
        return distributed.run_suite(read_options(own, distributed.OPTIONS), overrides)
    if suite != "gpu":
        raise BenchError(f"--suite {suite!r} is not known; expected 'gpu', 'rollout', 'grpo' or 'distributed'")
    from programs.bench.gpu.suite import run_gpu_suite

    options = read_options(argv, SUITE_OPTIONS)
    run_gpu_suite(options["out"], budget_s=options["budget_s"])
    print(f"JSON: {options['out']}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg.partition("=")[0] == "--suite" for arg in argv):
        # Before the config machinery: the GPU image has torch / transformers / triton, no pydantic.
        try:
            return run_suite(argv)
        except RuntimeError as e:
            common.fail(str(e))
    from backends.hf import ModelLoadError
    from programs.bench.throughput import measure, run_bench
    from programs.config import ConfigError, parse_cli
    from pure.data.settings import DataError

    try:
        flags = {flag: kind is not bool for flag, (kind, _) in OPTIONS.items()}
        config, extra = parse_cli(argv, DESCRIPTION, program_flags=flags)
        options = read_options(extra, OPTIONS)
        device = options["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
        if options["child"]:
            result = measure(config, options["child"], options["steps"], options["warmup"], device)
            Path(options["result"]).write_text(json.dumps(result))
            return 0
        report = run_bench(config, None, steps=options["steps"], warmup=options["warmup"],
                           baseline=options["baseline"], repeats=options["repeats"], device=device,
                           isolate=not options["in_process"], log=lambda line: print(line, file=sys.stderr, flush=True))
        out = Path(options["out"]) if options["out"] else Path(config.output_dir) / "bench.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        print(markdown_table(report))
        print(f"JSON: {out}")
    except (ConfigError, DataError, ModelLoadError, BenchError, ValueError) as e:
        common.fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
