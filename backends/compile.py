"""`torch.compile` for the pure train step, with a compile cache that survives the process.

    step = compile_step(make_train_step(loss, optimizer, bind), cache_dir)
    state, metrics = step(state, micro_batches)      # same contract, same numbers (fp32 reorder only)

What stops Dynamo from tracing the step as written, and what this module does about it:

- **RNG keys.** `pure.rng` derives keys with Threefry on Python ints (`key.tolist()`) and draws
  from a seeded CPU `torch.Generator`; a Generator cannot be created inside a compiled region,
  and the `.tolist()` words become unbacked SymInts that make Inductor's symbolic shape work
  explode (measured: > 15 min in lowering for a 1-layer model). Inside compiled regions only,
  `rng.split`, `rng.fold_in`, `rng.uniform` and `rng.normal` are swapped
  (`torch.compiler.substitute_in_graph`) for opaque custom ops (`puretune::rng_*`) whose
  implementation *is* the eager function, so compiled and eager runs draw the same bits and a
  compiled run resumes bitwise onto an eager checkpoint's key. Eager code is untouched.
- **Token counts.** `pure.losses.common.count_targets` turns tensor sums into Python ints; in graphs a
  tensor-only version with the same values is traced instead.
- **`torch.func.grad_and_value(has_aux=True)`** traces as one higher-order op as long as nothing
  inside it breaks the graph; a break inside it sends the whole gradient back to eager, which is
  why the two points above matter. The boolean-mask gather that computes lm_head logits only
  at trained tokens has a data-dependent size: `capture_dynamic_output_shape_ops` keeps it in
  the graph as one unbacked size (no recompiles when the number of trained tokens changes).
- **The step counter.** `TrainState.step` is a Python int that feeds the schedules. It is marked
  dynamic from the first call (`dynamic_sources`), so it is one symbolic int, not a constant per
  step; but a schedule's `if step < warmup_steps` becomes a guard, so each branch region of the
  schedule compiles once (warmup, then decay: two graphs for cosine with warmup, a third with
  `cosine_constant_lr_ratio`), and never again. The optimizer's bias-correction count is read
  with `.item()` (`capture_scalar_outputs`).
- **Shapes.** Batches must have static shapes (packed rows padded to `sequence_len`,
  `pad_to_sequence_len: true` without packing); a new shape is a new compile.

Persistence: Inductor's FX-graph cache (compiled kernels) and the AOTAutograd cache (the traced
forward+backward) are on by default but live in a temporary folder (`/tmp/torchinductor_<user>`).
`compile_step(..., cache_dir)` points them (`TORCHINDUCTOR_CACHE_DIR`, process-wide) at
`cache_dir/inductor`, so a second run of the same config finds its graphs there and pays only
Dynamo's tracing (and the AOT trace of graphs the AOTAutograd cache refuses: a cosine schedule's
`math.cos` of the symbolic step makes one such graph). `cache_dir_for(...)` names the folder by a
hash of what the compiled code depends on (torch version, device, the config keys that change the
graph). torch's portable "mega-cache" (`torch.compiler.save_cache_artifacts`) was tried first and
dropped: its bundle lacked the FX graph of the main step graph (the one holding the gradient), so
a run that loaded it still recompiled that graph from scratch.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pure import rng
from pure.losses.common import IGNORE_INDEX, next_token_targets

# The oldest torch whose Dynamo traces the whole step: 2.11 and 2.12 stop in `compute_unbacked_bindings`
# ("Expected FakeTensor") at the boolean selection of trained tokens inside `torch.func.grad`.
MIN_TORCH = "2.13"
# Dynamo settings the step needs; patched around each call, never set process-wide. Dynamo's
# profile-guided dynamism is off so that a run traces exactly the graphs the previous run did
# (with it on, the second run started from the first run's profile, traced a different first
# graph and missed the cache).
DYNAMO_SETTINGS = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True,
                   "automatic_dynamic_local_pgo": False}
# The step counter is symbolic from the first call (no static step-0 graph to throw away).
COMPILER_SETTINGS = {"dynamic_sources": "L['state'].step"}


# ------------------------------------------------------------------ traceable stand-ins for pure.rng


@torch.library.custom_op("puretune::rng_split", mutates_args=())
def _rng_split(key: torch.Tensor, n: int) -> torch.Tensor:
    return _EAGER["split"](key, n)


@_rng_split.register_fake
def _(key, n):
    return torch.empty((n, 2), dtype=torch.int64)


@torch.library.custom_op("puretune::rng_fold_in", mutates_args=())
def _rng_fold_in(key: torch.Tensor, data: int) -> torch.Tensor:
    return _EAGER["fold_in"](key, data)


@_rng_fold_in.register_fake
def _(key, data):
    return torch.empty((2,), dtype=torch.int64)


@torch.library.custom_op("puretune::rng_uniform", mutates_args=())
def _rng_uniform(key: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                 low: float, high: float) -> torch.Tensor:
    return _EAGER["uniform"](key, list(shape), dtype=dtype, device=device, low=low, high=high)


@_rng_uniform.register_fake
def _(key, shape, dtype, device, low, high):
    return torch.empty(list(shape), dtype=dtype, device=device)


@torch.library.custom_op("puretune::rng_normal", mutates_args=())
def _rng_normal(key: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                std: float, mean: float) -> torch.Tensor:
    return _EAGER["normal"](key, list(shape), dtype=dtype, device=device, std=std, mean=mean)


@_rng_normal.register_fake
def _(key, shape, dtype, device, std, mean):
    return torch.empty(list(shape), dtype=dtype, device=device)


@torch.library.custom_op("puretune::rng_dropout_mask", mutates_args=())
def _rng_dropout_mask(key: torch.Tensor, rate: float, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    return _EAGER["dropout_mask"](key, rate, list(shape), device=device)


@_rng_dropout_mask.register_fake
def _(key, rate, shape, device):
    return torch.empty(list(shape), dtype=torch.bool, device=device)


# The eager functions, held before any substitution so the ops never call a polyfill.
_EAGER = {"split": rng.split, "fold_in": rng.fold_in, "uniform": rng.uniform, "normal": rng.normal,
          "dropout_mask": rng.dropout_mask}


def _as_shape(shape) -> list[int]:
    return [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]


def _register_polyfills() -> None:
    """Tell Dynamo to trace the custom ops in place of the eager RNG and counting functions.
    Registration is process-wide and permanent, so it happens once; it changes nothing outside
    compiled regions."""
    if getattr(_register_polyfills, "done", False):
        return
    from torch.compiler import substitute_in_graph

    from pure.losses import common

    @substitute_in_graph(rng.split)
    def split(key, n=2):
        return torch.ops.puretune.rng_split(key, n)

    @substitute_in_graph(rng.fold_in)
    def fold_in(key, data):
        return torch.ops.puretune.rng_fold_in(key, int(data))

    @substitute_in_graph(rng.uniform)
    def uniform(key, shape, dtype=torch.float32, device="cpu", low=0.0, high=1.0):
        return torch.ops.puretune.rng_uniform(key, _as_shape(shape), dtype, torch.device(device),
                                              float(low), float(high))

    @substitute_in_graph(rng.normal)
    def normal(key, shape, dtype=torch.float32, device="cpu", std=1.0, mean=0.0):
        return torch.ops.puretune.rng_normal(key, _as_shape(shape), dtype, torch.device(device),
                                             float(std), float(mean))

    @substitute_in_graph(rng.dropout_mask)
    def dropout_mask(key, rate, shape, device="cpu"):
        return torch.ops.puretune.rng_dropout_mask(key, float(rate), _as_shape(shape), torch.device(device))

    @substitute_in_graph(common.count_targets)
    def count_targets(micro_batches):
        # Same values and dtypes as the eager version, without leaving tensor land.
        tokens = torch.zeros((), dtype=torch.int64)
        for mb in micro_batches:
            if "labels" in mb:
                targets = next_token_targets(mb["labels"], mb.get("segment_ids"))
                tokens = tokens + (targets != IGNORE_INDEX).sum().cpu()
        rows = sum(int(mb["input_ids"].shape[0]) for mb in micro_batches if "input_ids" in mb)
        return {"total_target_tokens": tokens.clamp(min=1), "total_rows": torch.tensor(max(rows, 1))}

    _register_polyfills.done = True


# ------------------------------------------------------------------ cache folder


def default_cache_root() -> Path:
    """`$PURETUNE_CACHE/compile`, else `~/.cache/puretune/compile`."""
    base = os.environ.get("PURETUNE_CACHE") or Path.home() / ".cache" / "puretune"
    return Path(base) / "compile"


def cache_dir_for(graph_keys: Mapping[str, Any], device: str | torch.device = "cpu",
                  root: str | os.PathLike | None = None) -> Path:
    """The cache folder of one compiled step: `root/<sha256[:16]>` of the torch version, the
    device and `graph_keys` (the config values that change the traced graph: model shape, adapter
    and LoRA keys, sequence_len, micro_batch_size, gradient_accumulation_steps, optimizer ...)."""
    blob = json.dumps({"torch": torch.__version__, "device": str(device), **{k: graph_keys[k] for k in graph_keys}},
                      sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return Path(root or default_cache_root()) / digest


# ------------------------------------------------------------------ the compiled step


class CompiledStep:
    """`step(state, micro_batches) -> (state, metrics)`, compiled on first call.

    `compile_seconds` lists the wall time of each call that compiled (one per branch region of
    the schedule, see the module docstring); `cache_dir` is where the compiled graphs are kept
    (None: torch's temporary default).
    """

    def __init__(self, train_step: Callable, cache_dir: str | os.PathLike | None, *, backend: str = "inductor",
                 mode: str | None = None, fullgraph: bool = False):
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"torch_compile_backend: unknown backend {backend!r}; "
                             f"available: {', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
        if torch.torch_version.TorchVersion(torch.__version__) < MIN_TORCH:
            raise ValueError(
                f"torch_compile: true needs torch >= {MIN_TORCH}, this is {torch.__version__}: older Dynamo fails "
                "on the trained-token selection (a data-dependent shape) under torch.func.grad; set "
                "torch_compile: false or install a newer torch")
        _register_polyfills()
        self.train_step = train_step
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            use_cache_dir(self.cache_dir)
        self.compiled = torch.compile(train_step, backend=backend, mode=mode, fullgraph=fullgraph)
        self.compile_seconds: list[float] = []

    def __call__(self, state, micro_batches):
        before = _compiles()
        start = time.perf_counter()
        with torch._dynamo.config.patch(**DYNAMO_SETTINGS), torch.compiler.config.patch(**COMPILER_SETTINGS):
            out = self.compiled(state, micro_batches)
        if _compiles() != before:
            self.compile_seconds.append(time.perf_counter() - start)
        return out


def use_cache_dir(cache_dir: str | os.PathLike) -> Path:
    """Keep Inductor's and AOTAutograd's on-disk caches in `cache_dir/inductor` (process-wide:
    every later compile in this process uses it too)."""
    folder = Path(cache_dir).resolve() / "inductor"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def _compiles() -> int:
    """Frames Dynamo has compiled so far in this process."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_step(train_step: Callable, cache_dir: str | os.PathLike | None = None, *, backend: str = "inductor",
                 mode: str | None = None, fullgraph: bool = False) -> CompiledStep:
    """Wrap `train_step` (from `pure.train.make_train_step`) in `torch.compile` with its compile
    caches kept in `cache_dir` (None: torch's temporary default). `backend` / `mode` are
    the config's `torch_compile_backend` / `torch_compile_mode`; `fullgraph=True` raises on any
    graph break instead of running that part eagerly (the tests use it to pin that the whole
    step, gradient included, is one graph)."""
    return CompiledStep(train_step, cache_dir, backend=backend, mode=mode, fullgraph=fullgraph)
