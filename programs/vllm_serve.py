"""`python -m programs.vllm_serve --config x.yaml`: a real vLLM server for the config's model (axolotl's `vllm-serve`).

Reads the `vllm:` block (host, port, dtype, max_model_len, gpu_memory_utilization (CUDA only:
the CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE), tensor/data_parallel_size,
enable_prefix_caching, enforce_eager). The model is the config's
`base_model` as training loads it (tokenizer edits and resized embeddings included), written once
as an untied HF folder under `output_dir/vllm-base` (`backends.rollout.vllm_server.save_untied`:
the CPU build reloads an untied head with the rest). `trl.vllm_lora_sync: true` also serves LoRA
adapters (rank up to `lora_r`); the server runs in dev mode, for full-weight reloads.
It waits for `/health`, prints where it listens, and Ctrl-C (or SIGTERM) stops the server and all
its children. On a CPU machine the server runs from `.venv-vllm` (`bash scripts/setup-vllm.sh`).
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from programs import common

DESCRIPTION = "Start a vLLM server for the config's model (the vLLM rollout backend's server)."
CPU_DTYPES = {"auto": "float32", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def settings_of(config, model_folder: Path):
    """`ServerSettings` from the `vllm:` block and `trl.vllm_lora_sync`."""
    from backends.rollout.vllm_server import ServerSettings
    from programs.config import ConfigError

    vllm = config.vllm
    if vllm is None:
        from programs.config.schema import VllmConfig

        vllm = VllmConfig()
    dtype = vllm.dtype
    if dtype not in CPU_DTYPES:
        raise ConfigError(f"vllm.dtype: expected one of {', '.join(CPU_DTYPES)}, got {dtype!r}")
    lora_sync = bool(config.trl and config.trl.vllm_lora_sync)
    if lora_sync and config.adapter not in ("lora", "qlora"):
        raise ConfigError("trl.vllm_lora_sync serves LoRA adapters; this config trains no adapter (adapter: lora)")
    return ServerSettings(model=str(model_folder), host=vllm.host, port=vllm.port, dtype=CPU_DTYPES[dtype],
                          max_model_len=vllm.max_model_len or config.sequence_len,
                          gpu_memory_utilization=vllm.gpu_memory_utilization,
                          tensor_parallel_size=vllm.tensor_parallel_size, data_parallel_size=vllm.data_parallel_size,
                          enable_prefix_caching=vllm.enable_prefix_caching,
                          enforce_eager=True if vllm.enforce_eager is None else bool(vllm.enforce_eager),
                          max_lora_rank=config.lora_r if lora_sync else None, dev_mode=True, seed=config.seed)


def run(config, *, ready=None) -> int:
    """Serve until interrupted; `ready(settings)` is called once the server is healthy (tests)."""
    from backends.rollout.vllm_server import save_untied, start_server, stop_server

    params, model_config, tokenizer = common.load_model(config, quantize=False)
    folder = Path(config.output_dir) / "vllm-base"
    save_untied(params, model_config, tokenizer, folder)
    settings = settings_of(config, folder)
    log = Path(config.output_dir) / "vllm-server.log"
    print(f"starting vLLM for {config.base_model} ({'LoRA and full-weight sync' if settings.max_lora_rank else 'full-weight sync'}); "
          f"log {log}", flush=True)
    proc = start_server(settings, log=log)
    stop = {"signal": None}

    def handle(signum, frame):
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"vLLM server listening on http://{settings.host}:{settings.port} (pid {proc.pid}); Ctrl-C stops it",
              flush=True)
        if ready is not None:
            ready(settings)
        while stop["signal"] is None and proc.poll() is None:
            time.sleep(0.5)
        if proc.poll() is not None and stop["signal"] is None:
            common.fail(f"the vLLM server exited with code {proc.returncode}; see {log}")
    finally:
        stop_server(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("vLLM server stopped", flush=True)
    return 0


def main(argv=None) -> int:
    from backends.hf import ModelLoadError
    from backends.rollout.vllm_server import VllmServerError
    from programs.config import ConfigError, parse_cli

    try:
        config, _ = parse_cli(argv, DESCRIPTION, program_flags={})
        return run(config)
    except (ConfigError, ModelLoadError, VllmServerError, ValueError) as e:
        common.fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
