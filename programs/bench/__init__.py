"""The benchmark harness, `python -m programs.bench` (the CLI and the report are in `__main__`).

  throughput  our SFT step vs transformers `Trainer` + PEFT on the config's data, one fresh process
              per measured run, variants alternating, steps pooled (`run_bench`)
  batches     the micro-batches every variant trains on, and the same rows as `Trainer` inputs
  baselines   the transformers + PEFT model on our weights and adapter settings, shared with the
              GPU suite
  gpu/        `--suite gpu`: CUDA kernel and attention checks, kernel timings, the matmul peak and
              the Llama-3.2-1B-shaped LoRA / full fine-tune benchmark with MFU
"""


class BenchError(RuntimeError):
    """A benchmark run that failed or was asked for wrongly, naming the variant or the option and what
    was expected."""
