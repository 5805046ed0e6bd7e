"""GRPO's rollout backend from the config: which engine samples, how the policy reaches it, and the
background producer of async GRPO.

    backend = make_backend(config, model_config, frozen, lora_config, tokenizer, pad_id)
    backend.generate(policy, prompt_ids, n, sampling, key)        # syncs `policy` first when needed
    producer = Producer(work, depth)                              # depth 0: runs each job inline

Engines (`backends.rollout`): the native one (default) binds the policy itself; `trl.use_vllm: true`
samples from a vLLM server (`vllm_mode: server`, the default, at `vllm_server_host:port`, started
with `python -m programs.vllm_serve`) or an in-process `vllm.LLM` (`vllm_mode: colocate`). A vLLM
engine holds one set of weights, so the policy is *synced* to it before it samples: as a PEFT
adapter written to a new folder per version (`vllm_lora_sync: true`), else as merged full weights
(an untied HF folder the server reloads; from memory in colocate mode). The backend remembers
which policy it served (by tensor identity: updates are functional, so a new version is new
tensors) and syncs only when asked for another one.

A server that stops answering gets `RETRIES` more tries (waiting `RETRY_WAIT_S` between them, with
a re-sync, since a restarted server lost the weights); then the step is aborted
(`programs.loop.StepAborted`): the loop saves the state before the step as a checkpoint and the
program exits non-zero, naming the server and how to resume.
"""
from __future__ import annotations

import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from pure.tree import tree_leaves

RETRIES = 3
RETRY_WAIT_S = (1.0, 3.0, 6.0)
SYNC_DIR = "vllm-sync"


def engine_kind(config) -> str:
    trl = config.trl
    if not trl.use_vllm:
        return "native"
    return trl.vllm_mode or "server"


def server_address(config) -> tuple[str, int]:
    return config.trl.vllm_server_host, int(config.trl.vllm_server_port)


def start_hint(config) -> str:
    host, port = server_address(config)
    return (f"start it in another shell with `python -m programs.vllm_serve --config <this config>` (its vllm: "
            f"block must listen on {host}:{port}), or set trl.use_vllm: false for the native engine")


class Backend:
    """An engine plus the way a policy reaches it."""

    def __init__(self, kind: str, engine, *, lora_config=None, frozen=None, model_config=None, tokenizer=None,
                 sync_dir: Path | None = None, lora_sync: bool = False, where: str = ""):
        self.kind, self.engine, self.lora_config, self.frozen = kind, engine, lora_config, frozen
        self.model_config, self.tokenizer, self.sync_dir, self.lora_sync = model_config, tokenizer, sync_dir, lora_sync
        self.where = where
        self.served: list | None = None  # the leaves of the policy the engine holds (None: unknown)
        self.versions = 0
        self.sync_seconds: list[float] = []
        self._last_folder: Path | None = None

    # -- sync
    def _is_served(self, policy: dict) -> bool:
        leaves = tree_leaves(policy)
        return self.served is not None and len(leaves) == len(self.served) and \
            all(a is b for a, b in zip(leaves, self.served))

    def merged_weights(self, policy: dict) -> dict[str, torch.Tensor]:
        """The policy as one set of HF weights: the base (dequantised) with the adapter merged in, or the
        fully trained params over the frozen ones; lm_head untied (what the vLLM engines serve)."""
        from kernels.quantized import dequantize_params
        from pure.lora import merge_lora

        params = {**dequantize_params(self.frozen), **{k: v.detach() for k, v in policy.get("params", {}).items()}}
        if self.lora_config is not None and policy.get("lora"):
            params = merge_lora(params, {k: {n: t.detach() for n, t in e.items()} for k, e in policy["lora"].items()},
                                self.lora_config)
        if "lm_head.weight" not in params:
            params["lm_head.weight"] = params["model.embed_tokens.weight"]
        return params

    def sync(self, policy: dict) -> float:
        """Make the engine serve `policy`; seconds taken (0 for the native engine, which binds it)."""
        if self.kind == "native" or self._is_served(policy):
            return 0.0
        from backends.rollout.vllm_server import save_untied

        start = time.perf_counter()
        self.versions += 1
        folder = None
        if self.lora_sync and self.kind == "server" and self.served is None:
            # the first sync (or the first after a failure) also loads this run's base: a server reused
            # from another run, or one restarted from another folder, may hold other weights
            base = save_untied(self.merged_weights({}), self.model_config.replace(tie_word_embeddings=False),
                               self.tokenizer, self.sync_dir / "base")
            self.engine.sync_full(base)
        if self.lora_sync:
            from backends.export import save_peft_adapter

            folder = self.sync_dir / f"lora-{self.versions:06d}"  # a new folder per version (stale-KV trap)
            save_peft_adapter(folder, policy["lora"], self.lora_config)
            self.engine.sync_lora(folder)
        elif self.kind == "colocate":
            self.engine.sync_full(self.merged_weights(policy))
        else:
            folder = self.sync_dir / f"full-{self.versions:06d}"
            save_untied(self.merged_weights(policy), self.model_config.replace(tie_word_embeddings=False),
                        self.tokenizer, folder)
            self.engine.sync_full(folder)
        if self._last_folder is not None:
            shutil.rmtree(self._last_folder, ignore_errors=True)
        self._last_folder = folder
        self.served = tree_leaves(policy)
        seconds = time.perf_counter() - start
        self.sync_seconds.append(seconds)
        return seconds

    # -- sampling
    def generate_each(self, policy: dict, prompt_ids, n: int, sampling, key):
        """(prompt index, its Rollouts) as each prompt's completions are ready (the server answers
        prompts in any order; the others all at once, in order), after syncing `policy`."""
        from backends.rollout import Rollouts
        from backends.rollout.vllm_server import VllmServerError

        if self.kind != "server":
            self.sync(policy)
            out = self.engine.generate(policy, prompt_ids, n, sampling, key)
            for i in range(len(prompt_ids)):
                part = slice(i * n, (i + 1) * n)
                yield i, Rollouts(out.prompt_ids[part], out.completion_ids[part], out.logprobs[part],
                                  out.finish_reasons[part])
            return
        done: set[int] = set()
        for attempt in range(RETRIES + 1):
            try:
                self.sync(policy)
                for i, rollouts in self.engine.generate_each(prompt_ids, n, sampling, key):
                    if i not in done:  # a retry re-asks only what is missing: same seeds, same answers
                        done.add(i)
                        yield i, rollouts
                return
            except VllmServerError as err:
                self.served = None  # a server that failed may have restarted without our weights
                if attempt == RETRIES:
                    from programs.loop import StepAborted

                    raise StepAborted(f"the vLLM server at {self.where} failed {RETRIES + 1} times in a row "
                                      f"({err})") from None
                print(f"vLLM server at {self.where}: {err}; retry {attempt + 1} of {RETRIES} in "
                      f"{RETRY_WAIT_S[attempt]:g} s", flush=True)
                time.sleep(RETRY_WAIT_S[attempt])

    def generate(self, policy: dict, prompt_ids, n: int, sampling, key):
        """All prompts' Rollouts, prompt-major (the rollout protocol, with the sync in front)."""
        from backends.rollout import Rollouts

        parts = dict(self.generate_each(policy, prompt_ids, n, sampling, key))
        return Rollouts.concat([parts[i] for i in range(len(prompt_ids))])

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()
        if self.sync_dir is not None:
            shutil.rmtree(self.sync_dir, ignore_errors=True)


def make_backend(config, model_config, frozen: dict, lora_config, tokenizer, pad_id: int) -> Backend:
    """The config's engine, checked to be there: a server that does not answer is one line naming
    where it was looked for and how to start it (`vllm_server_timeout` s of waiting for it first)."""
    from backends.rollout.vllm_server import VllmServerError
    from programs import common
    from programs.config import ConfigError

    kind = engine_kind(config)
    if kind == "native":
        from backends.rollout.native import NativeEngine

        return Backend("native", NativeEngine(model_config, frozen, lora_config=lora_config,
                                              ops=common.quantized_ops(frozen), pad_token_id=pad_id))
    trl = config.trl
    sync_dir = Path(config.output_dir) / SYNC_DIR
    if trl.vllm_lora_sync and lora_config is None:
        raise ConfigError("trl.vllm_lora_sync syncs a LoRA adapter; this config trains no adapter (adapter: lora)")
    common_args = dict(lora_config=lora_config, frozen=frozen, model_config=model_config, tokenizer=tokenizer,
                       sync_dir=sync_dir, lora_sync=bool(trl.vllm_lora_sync))
    if kind == "colocate":
        from backends.rollout.vllm_colocate import VllmColocateEngine, vllm_importable
        from backends.rollout.vllm_server import save_untied
        from kernels.quantized import dequantize_params

        if not vllm_importable():
            raise ConfigError("trl.vllm_mode: colocate runs vLLM in this process, but vLLM is not importable in this "
                              "Python; on a CPU machine run the program with `.venv-vllm/bin/python` after "
                              "`bash scripts/setup-vllm.sh` (on CUDA: pip install vllm), or use vllm_mode: server")
        vllm = config.vllm
        folder = save_untied(dequantize_params(frozen), model_config, tokenizer, sync_dir / "base")
        engine = VllmColocateEngine(str(folder), max_model_len=(vllm.max_model_len if vllm else None) or config.sequence_len,
                                    seed=config.seed, max_lora_rank=config.lora_r if trl.vllm_lora_sync else None,
                                    enable_prefix_caching=vllm.enable_prefix_caching if vllm else None)
        return Backend("colocate", engine, where="in-process vLLM", **common_args)
    from backends.rollout.vllm_server import VllmServerEngine, wait_healthy

    host, port = server_address(config)
    try:
        if trl.vllm_server_timeout:
            wait_healthy(host, port, float(trl.vllm_server_timeout))
        engine = VllmServerEngine(host, port, timeout=float(trl.vllm_server_timeout or 240))
    except VllmServerError:
        raise ConfigError(f"no vLLM server answers at {host}:{port} (trl.vllm_server_host / vllm_server_port); "
                          f"{start_hint(config)}") from None
    return Backend("server", engine, where=f"{host}:{port}", **common_args)


class Producer:
    """Runs generation jobs in order on one background thread (`depth` > 0: async GRPO's data
    producer), or inline (`depth` 0). Jobs run strictly one after another on the same engine, so
    their results do not depend on timing: only on each job's (policy, prompts, key)."""

    def __init__(self, work, depth: int):
        self.work, self.depth = work, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grpo-producer") if depth > 0 else None
        self.futures: dict = {}

    def submit(self, name, *args) -> None:
        if name in self.futures:
            return
        if self.pool is None:
            done: Future = Future()
            self.futures[name] = (done, args)
            return
        self.futures[name] = (self.pool.submit(self.work, *args), args)

    def result(self, name):
        """The job's result (run now when inline); a failure in the background surfaces here."""
        future, args = self.futures.pop(name)
        if self.pool is None:
            return self.work(*args)
        return future.result()

    def pending(self) -> list:
        return list(self.futures)

    def call(self, fn, *args):
        """`fn(*args)` outside the queue (a synchronous generation, eval), after every queued job, on
        the same thread: nothing else uses the engine meanwhile."""
        if self.pool is None:
            return fn(*args)
        return self.pool.submit(fn, *args).result()

    def close(self) -> None:
        if self.pool is not None:
            for future, _ in self.futures.values():
                future.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
