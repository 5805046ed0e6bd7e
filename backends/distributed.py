"""The device mesh, DTensor placements and the data-parallel (FSDP-style) train step under torchrun.

    sizes = mesh_sizes(world_size, dp_shard=..., tp=...)       # pure: defaults and checks
    mesh = make_mesh(sizes, "cpu")                              # init_device_mesh, named dims
    state = shard_state(init_train_state(...), mesh)            # Shard(0) on dp_shard (FSDP, HSDP)
    step = make_sharded_train_step(loss, optimizer, lambda frozen: make_apply(config, frozen), mesh,
                                   frozen=place(frozen_params, mesh))
    state, metrics = step(state, global_micro_batches)          # the same batches on every rank

The step is FSDP's: every rank all-gathers the params (`DTensor.full_tensor`), runs the pure
forward/backward (`pure.train.make_accumulator`, the pure step's own) on its rows of the
global batch, and the local gradients become one `Partial()` DTensor redistributed to the
optimizer state's placements (a reduce-scatter onto `Shard(0)`, an all-reduce onto `Replicate()`;
on HSDP's 2-D mesh both at once, `[Partial(), Partial()]` -> `[Replicate(), Shard(0)]`).
The losses are divided by totals of the *global* batch (the loss's `count_fn` on the global
micro-batches, which every rank holds), so the summed gradient is the gradient of the global-batch
mean: the same step as one process on the whole batch, up to the order of fp32 additions. The
optimizer then runs on the sharded DTensors (its `_foreach_*` ops keep the placements; a global
norm reduces over the ranks by itself). `shard_state`'s flags give the other layouts: ZeRO-1/2
(params replicated, optimizer state sharded: the update runs on each rank's slice, then the params
are all-gathered) and DDP (all replicated, gradients all-reduced).

`torch.func.grad` is never taken over DTensor params: over `Shard(0)` params it returned
`Replicate()` gradients in a probe (torch 2.13), so the placement is set here, explicitly.

Checkpoints: `save_sharded(state, folder)` writes the whole train state with
`torch.distributed.checkpoint` (each rank its shards, keyed by `backends.checkpoint`'s pytree paths,
plus a `state.json` of the non-tensor fields from rank 0), into `<folder>.tmp` renamed by rank 0 after
a barrier; `load_sharded(like, folder, mesh)` reads it into `like`'s placements at any world size, or
(mesh None) into plain tensors in one process with no process group.

The data-parallel dimensions are `dp_shard` (FSDP) and `dp_replicate`: with `dp_replicate` > 1 the
mesh is HSDP's 2-D `("dp_replicate", "dp_shard")`, every sharded tensor is `[Replicate(), Shard(0)]`
(each replica group holds the whole state, sharded within it) and a replicated one `[Replicate(),
Replicate()]`. The data-parallel rank and world of the row split and the RNG keys are the flattened
coordinates (world dp_replicate x dp_shard, rank replicate_index x dp_shard + shard_index), so the
global batch is the same at every layout.

Context parallelism (`cp` > 1, `backends.context_parallel`): the mesh is `("dp_shard", "cp")` or
`("dp_replicate", "dp_shard", "cp")`; the state is placed on all of them (`placement_mesh`),
`Replicate()` on `cp`; each data-parallel share of a packed micro-batch is split over the cp ranks
by tokens, their gradients are partial, and `cp` is one more `Partial()` dimension of the local
gradients and metrics. A mesh with `tp` larger than 1 is refused by name (tensor parallelism is a
later step of issue 17).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from backends.atomic import swap_into_place, fsync_tree
from backends.checkpoint import (SHARDED_METADATA, STATE_JSON, CheckpointError, is_sharded_checkpoint,
                                 split_carry, state_tree)
from pure import rng
from pure.losses.core import Loss
from pure.optim import apply_updates, grad_norm_from_state
from pure.train import TrainState, make_accumulator
from pure.tree import global_norm, leaves_with_paths, replace_leaves, tree_map

MESH_DIM_NAMES = ("dp_replicate", "dp_shard", "cp", "tp")
_SIZE_KEYS = {"dp_replicate": "dp_replicate_size", "dp_shard": "dp_shard_size",
              "cp": "context_parallel_size", "tp": "tensor_parallel_size"}


@dataclass(frozen=True)
class MeshSizes:
    """The size of each mesh dimension; their product is the world size."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @property
    def world_size(self) -> int:
        """The number of processes the mesh spans: the product of the sizes."""
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    def as_dict(self) -> dict[str, int]:
        """`{dim name: size}` in the mesh's dimension order (`MESH_DIM_NAMES`)."""
        return {name: getattr(self, name) for name in MESH_DIM_NAMES}


def mesh_sizes(world_size: int, dp_shard: int | None = None, dp_replicate: int | None = None,
               tp: int | None = None, cp: int | None = None) -> MeshSizes:
    """The mesh sizes for `world_size` processes: an unset `dp_replicate`, `tp` or `cp` is 1, an unset
    `dp_shard` takes what the others leave (world / (dp_replicate * cp * tp)).

    Raises ValueError naming the config key (`dp_shard_size`, `dp_replicate_size`,
    `tensor_parallel_size`, `context_parallel_size`) and the world size when a size is not a positive
    integer, when the given sizes do not divide the world size, or when all four are given and their
    product is not the world size."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"the world size must be a positive integer, got {world_size!r}")
    given = {"dp_replicate": dp_replicate, "dp_shard": dp_shard, "cp": cp, "tp": tp}
    for name, size in given.items():
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"{_SIZE_KEYS[name]} must be a positive integer, got {size!r} "
                             f"(world size {world_size})")
    fixed = {name: 1 if given[name] is None else given[name] for name in ("dp_replicate", "cp", "tp")}
    for name, size in fixed.items():
        if world_size % size:
            raise ValueError(f"{_SIZE_KEYS[name]}={size} does not divide the world size {world_size}")
    others = math.prod(fixed.values())
    if world_size % others:
        raise ValueError(f"dp_replicate_size={fixed['dp_replicate']} x context_parallel_size={fixed['cp']} x "
                         f"tensor_parallel_size={fixed['tp']} = {others} does not divide the world size {world_size}")
    if dp_shard is None:
        dp_shard = world_size // others
    elif others * dp_shard != world_size:
        raise ValueError(f"dp_shard_size={dp_shard} times dp_replicate_size={fixed['dp_replicate']}, "
                         f"context_parallel_size={fixed['cp']}, tensor_parallel_size={fixed['tp']} is "
                         f"{others * dp_shard}, not the world size {world_size}")
    return MeshSizes(dp_replicate=fixed["dp_replicate"], dp_shard=dp_shard, cp=fixed["cp"], tp=fixed["tp"])


def make_mesh(sizes: MeshSizes, device_type: str) -> DeviceMesh:
    """The DeviceMesh of `sizes` over the initialised process group (`init_device_mesh` initialises
    the default one when none is): in `MESH_DIM_NAMES` order, `dp_shard` always (size 1 too: the
    dimension the state is sharded on) and each other dimension whose size is > 1; so FSDP's mesh is
    1-D `("dp_shard",)` and HSDP's 2-D `("dp_replicate", "dp_shard")`."""
    dims = {name: size for name, size in sizes.as_dict().items() if size > 1 or name == "dp_shard"}
    return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))


def shard_batch_indices(num_rows_in_global_batch: int, rank: int, world: int) -> range:
    """The rows of one global (micro-)batch that data-parallel `rank` of `world` takes: a contiguous
    slice, the first `rows % world` ranks one row more than the others, so the ranks' rows in rank
    order are the global batch, whatever `world`. A rank may get no rows (a micro-batch of fewer rows
    than ranks); the sharded step then adds nothing for it, and the sum over ranks is unchanged.

    Raises ValueError when the rank is outside the world."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a data-parallel world of size {world}")
    per_rank, extra = divmod(num_rows_in_global_batch, world)
    start = rank * per_rank + min(rank, extra)
    return range(start, start + per_rank + (rank < extra))


PACKED_KEYS = frozenset({"input_ids", "labels", "positions", "segment_ids"})


def shard_micro_batches(micro_batches: Sequence[dict], rank: int, world: int, paired: bool = False) -> list[dict]:
    """Each micro-batch of a global step cut to `rank`'s share; a share may be empty.

    A packed micro-batch (`pure.data.packing`: `input_ids`, `labels`, `positions`, `segment_ids`,
    nothing else) is split by documents (`split_documents`), so the ranks get about equal tokens even
    when there are fewer rows than ranks. Otherwise it is split by rows (`shard_batch_indices`):
    every tensor with the micro-batch's row count as its dim 0 is sliced, other values pass
    unchanged. `paired`: the micro-batches are pair batches (`pure.data.pair_batch`,
    `reward_batch`: 2B rows, pair i at rows i and B + i), split by pairs: the rank takes pairs
    i0..i1, rows i0..i1 and B + i0..B + i1, in that layout."""
    out = []
    for mb in micro_batches:
        if not paired and set(mb) == PACKED_KEYS:
            out.append(split_documents(mb, rank, world))
            continue
        rows = int(mb["input_ids"].shape[0])
        if paired:
            half = rows // 2
            take = shard_batch_indices(half, rank, world)
            index = torch.cat([torch.arange(take.start, take.stop), torch.arange(half + take.start, half + take.stop)])
        else:
            take = shard_batch_indices(rows, rank, world)
            index = torch.arange(take.start, take.stop)
        out.append({k: v.index_select(0, index) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows
                    else v for k, v in mb.items()})
    return out


def split_documents(mb: dict, rank: int, world: int) -> dict:
    """`rank`'s documents of a packed micro-batch, packed again into rows of the same width.

    The documents (each row's segments, in row order) are cut into `world` contiguous runs of about
    equal tokens: document i goes to rank floor(world * (tokens before i + half its length) / all
    tokens). Each is copied whole, with its positions and labels (its first label is already -100),
    so attention stays within it and every token's loss is the one it has in the whole batch: the
    ranks' losses and gradients sum to the batch's. A rank with no documents gets zero rows."""
    segments = mb["segment_ids"]
    spans = []  # (row, start, length) of each document, in order
    for r in range(segments.shape[0]):
        ids = segments[r]
        for s in torch.unique(ids[ids > 0]).tolist():
            where = (ids == s).nonzero().flatten()
            spans.append((r, int(where[0]), int(where.numel())))
    total = sum(n for _, _, n in spans) or 1
    mine, before = [], 0
    for span in spans:
        if min(world - 1, world * (2 * before + span[2]) // (2 * total)) == rank:
            mine.append(span)
        before += span[2]
    width = segments.shape[1]
    rows = {}  # the rank's documents of each original row, which stay together in one row
    for span in mine:
        rows.setdefault(span[0], []).append(span)
    rows = list(rows.values())
    pad = mb["input_ids"][segments == 0]
    pad_id = int(pad[0]) if pad.numel() else 0
    out = {"input_ids": torch.full((len(rows), width), pad_id, dtype=mb["input_ids"].dtype),
           "labels": torch.full((len(rows), width), -100, dtype=mb["labels"].dtype),
           "positions": torch.zeros((len(rows), width), dtype=mb["positions"].dtype),
           "segment_ids": torch.zeros((len(rows), width), dtype=segments.dtype)}
    for i, docs in enumerate(rows):
        offset = 0
        for segment, (r, start, n) in enumerate(docs, start=1):
            for key in ("input_ids", "labels", "positions"):
                out[key][i, offset:offset + n] = mb[key][r, start:start + n]
            out["segment_ids"][i, offset:offset + n] = segment
            offset += n
    return out


_DATA_PARALLEL_DIMS = ("dp_replicate", "dp_shard")
# The dimensions the state is placed on: data parallel, and context parallel (whose ranks hold the same
# params and sum their partial gradients, as dp_replicate's do).
_PLACEMENT_DIMS = ("dp_replicate", "dp_shard", "cp")


def _submesh(mesh: DeviceMesh, keep: tuple[str, ...]) -> DeviceMesh:
    """`mesh` restricted to the dimensions of `keep` it has, after refusing by config key any other
    dimension larger than 1 (tensor parallelism: not implemented yet)."""
    names = mesh.mesh_dim_names or ()
    for name in names:
        if name not in _PLACEMENT_DIMS and mesh[name].size() > 1:
            raise NotImplementedError(f"{_SIZE_KEYS.get(name, name)} > 1 is not supported yet: only data-parallel "
                                      "sharding (dp_shard, dp_replicate: FSDP, HSDP) and context parallelism "
                                      "(context_parallel_size) are implemented")
    if "dp_shard" not in names:
        raise ValueError(f"the mesh has no 'dp_shard' dimension (its dimensions: {names}); build it with make_mesh")
    dims = tuple(name for name in keep if name in names)
    return mesh if dims == names else mesh[dims if len(dims) > 1 else dims[0]]


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """`mesh` restricted to its data-parallel dimensions, the ones that split the rows: 1-D
    `("dp_shard",)` (FSDP, DDP) or 2-D `("dp_replicate", "dp_shard")` (HSDP). Raises
    NotImplementedError naming the config key of a tensor-parallel dimension larger than 1 (not
    implemented yet), ValueError when `mesh` has no `dp_shard` dimension."""
    return _submesh(mesh, _DATA_PARALLEL_DIMS)


def placement_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """`mesh` restricted to the dimensions the state is placed on: the data-parallel ones and, when
    `make_mesh` built one (context_parallel_size > 1), `cp` last, on which everything is
    `Replicate()`. Without cp it is `data_parallel_mesh(mesh)`. Refuses what `data_parallel_mesh` does."""
    return _submesh(mesh, _PLACEMENT_DIMS)


def context_parallel_size(mesh: DeviceMesh) -> int:
    """The size of `mesh`'s `cp` dimension (1 when it has none)."""
    return mesh["cp"].size() if "cp" in (mesh.mesh_dim_names or ()) else 1


def data_parallel_rank(dp: DeviceMesh) -> tuple[int, int]:
    """(rank, world) of this process among the data-parallel ranks of `dp` (a `data_parallel_mesh`):
    its flattened coordinates, rank = replicate_index * dp_shard + shard_index of world =
    dp_replicate * dp_shard on HSDP's mesh, the `dp_shard` index on a 1-D one."""
    rank = 0
    for index, size in zip(dp.get_coordinate(), dp.mesh.shape):
        rank = rank * size + index
    return rank, dp.size()


def placement_for(x: torch.Tensor, dp: DeviceMesh, shard: bool = True) -> tuple:
    """The placements of `x` on `dp` (a `placement_mesh`), one per dimension: `Replicate()` on
    `dp_replicate` and `cp`, and on `dp_shard` `Shard(0)` for a tensor whose dim 0 divides by its size
    (when `shard`), else `Replicate()`: 0-dim tensors such as an optimizer's step count, or an odd dim 0."""
    at = dp.mesh_dim_names.index("dp_shard")
    shards = shard and x.dim() > 0 and x.shape[0] % dp.mesh.shape[at] == 0
    return tuple(Shard(0) if i == at and shards else Replicate() for i in range(dp.ndim))


def place(tree, mesh: DeviceMesh, shard: bool = True):
    """`tree` with every tensor leaf a DTensor on the placement dimensions of `mesh` (`placement_mesh`), placed by
    `placement_for` (`shard` false: every leaf `Replicate()` on every dimension, DDP's layout). Every
    rank passes the same full values; each keeps its shard."""
    dp = placement_mesh(mesh)
    return tree_map(lambda x: distribute_tensor(x, dp, placement_for(x, dp, shard))
                    if isinstance(x, torch.Tensor) else x, tree)


def gather(tree):
    """`tree` with every DTensor leaf all-gathered into a plain full tensor (FSDP's unshard)."""
    return tree_map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, tree)


def shard_state(state: TrainState, mesh: DeviceMesh, shard_params: bool = True,
                shard_optimizer: bool = True) -> TrainState:
    """`state` with its trainable params and optimizer state placed by `place` on the data-parallel
    dimensions: `Shard(0)` on `dp_shard` (where dim 0 divides; `Replicate()` on `dp_replicate`) for
    the params when `shard_params` (FSDP, HSDP, ZeRO-3) and for the optimizer state when
    `shard_optimizer` (ZeRO-1 and up), `Replicate()` otherwise (DDP: neither).
    Frozen params are placed with `place(frozen, mesh)` and passed to `make_sharded_train_step`,
    which gathers them every step, or passed plain (replicated on every rank)."""
    if state.loss_scale is not None:
        raise NotImplementedError("fp16 dynamic loss scaling is not supported by the sharded step yet")
    return state.replace(trainable=place(state.trainable, mesh, shard_params),
                         opt_state=place(state.opt_state, mesh, shard_optimizer))


def _sum_over_ranks(x: torch.Tensor, dp: DeviceMesh) -> torch.Tensor:
    """The sum of every rank's `x` over the dimensions of `dp` (a `placement_mesh`: the data-parallel
    ranks and the context-parallel ones; an all-reduce through a DTensor `Partial()` on each), as a plain tensor."""
    return DTensor.from_local(torch.as_tensor(x), dp, [Partial()] * dp.ndim).full_tensor()


def make_sharded_train_step(loss: Loss, optimizer, make_bind, mesh: DeviceMesh, frozen: dict | None = None,
                            shard_optimizer: bool = True, paired: bool = False, make_context_parallel_bind=None):
    """Build `train_step(state, micro_batches) -> (state, metrics)` for a `shard_state`d state; every
    rank passes the same micro-batches, those of the global step, and trains on its rows of each
    (`shard_micro_batches`).

    The result equals `pure.train.make_train_step(loss, optimizer, bind)` on the same micro-batches:
    params are gathered, the loss's totals (its `count_fn`, and `batch_stats_fn` such as KTO's KL
    baseline) are those of the global batch, computed on every rank, so each rank's micro-batch
    gradient (`torch.func.grad_and_value`) is its share of the global-batch mean; the local sums
    become `Partial()` DTensors redistributed to the optimizer state's placements, and the
    optimizer updates those shards (on HSDP's mesh: all-reduced over the replicas and reduce-scattered
    within each shard group, in one redistribute). Micro-batch `i` of data-parallel rank `r`
    (`data_parallel_rank`, the flattened coordinates on HSDP's mesh) draws
    its key from `fold_in(step_key, r * len(micro_batches) + i)`: the pure step's keys at world
    size 1, a distinct key per rank otherwise (so dropout masks differ between ranks, and a run with
    dropout equals one process in distribution, not sample by sample). A micro-batch with no rows
    on this rank (fewer rows than ranks) adds nothing.

    `paired`: the micro-batches are pair batches, split by pairs (`shard_micro_batches`).
    `shard_optimizer` says how `shard_state` placed the optimizer state: True (FSDP, ZeRO-1/2/3)
    reduce-scatters the gradients onto `Shard(0)` and updates each param's shard (a replicated param,
    ZeRO-1/2, is sliced for the update, a local view, and all-gathered after it); False (DDP)
    all-reduces them and every rank updates the whole param.

    `frozen`: the frozen params, plain (replicated) or `place`d (FSDP-sharded too); `make_bind(frozen_full) -> bind`
    gets them gathered once per step, e.g. `lambda frozen: make_apply(config, frozen, lora_config=...)`,
    and `bind(trainable)` gets plain gathered trainable tensors. The gathers happen outside
    `torch.func.grad`: a DTensor redistribute inside it fails (torch 2.13: "In order to use an
    autograd.Function with functorch transforms ... it must override the setup_context staticmethod").
    Metrics are those of the global batch, plain tensors on every rank: summed over the ranks as the
    pure step sums them over micro-batches.

    Context parallelism (a mesh with a `cp` dimension, context_parallel_size > 1): the ranks of a cp
    group hold the same data-parallel share of each micro-batch and split it by tokens
    (`backends.context_parallel.split_tokens`: packed micro-batches only; pair batches and other
    keys are refused); `make_context_parallel_bind(frozen_full) -> bind` is then required, a bind whose
    attention is `backends.context_parallel.context_parallel_attention(mesh)`, used for the local
    forward/backward only (the totals and a share with no rows use `make_bind`'s). Each cp rank's
    gradient is partial (its tokens), so `cp` is one more `Partial()` dimension of the local
    gradients and the metrics (the params are `Replicate()` on it); each cp rank folds its cp index
    into its keys, so it draws its own dropout masks."""
    dp = placement_mesh(mesh)
    rank, world = data_parallel_rank(data_parallel_mesh(mesh))
    frozen = {} if frozen is None else frozen
    cp = context_parallel_size(mesh)
    if cp > 1:
        from backends.context_parallel import split_tokens

        if paired:
            raise ValueError("context parallelism (context_parallel_size > 1) splits packed rows by tokens; pair "
                             "batches (DPO and its family, reward models) are not supported: set "
                             "context_parallel_size: 1")
        if make_context_parallel_bind is None:
            raise ValueError("a mesh with context_parallel_size > 1 needs make_context_parallel_bind: a bind whose "
                             "attention is backends.context_parallel.context_parallel_attention(mesh)")
        cp_rank = mesh["cp"].get_local_rank()

    accumulate = make_accumulator(loss)

    def for_update(param: DTensor) -> DTensor:
        # the param as the optimizer state is placed: a replicated param's shard is a local slice
        return param.redistribute(dp, placement_for(param, dp, shard_optimizer))

    def to_placement(local_grad: torch.Tensor, param: DTensor) -> DTensor:
        # The ranks' local grads sum to the global one: reduce-scatter onto Shard(0), all-reduce onto
        # Replicate, on each mesh dimension (HSDP: across the replicas and within a shard group).
        return DTensor.from_local(local_grad, dp, [Partial()] * dp.ndim).redistribute(dp, param.placements)

    def train_step(state: TrainState, micro_batches: Sequence[dict]):
        step_key, next_key = rng.split(state.rng_key, 2)
        whole_frozen = gather(frozen)
        bind = make_bind(whole_frozen)
        full = gather(state.trainable)
        counts = loss.totals(bind(full), micro_batches)
        local = shard_micro_batches(micro_batches, rank, world, paired)
        keys = [rng.fold_in(step_key, rank * len(local) + i) for i in range(len(local))]
        mine = [i for i, mb in enumerate(local) if mb["input_ids"].shape[0]]
        local_bind = bind
        if cp > 1:  # the cp group shares each data-parallel share by tokens (the whole group has it or none)
            local = [split_tokens(mb, cp_rank, cp) if i in mine else mb for i, mb in enumerate(local)]
            keys = [rng.fold_in(key, cp_rank) for key in keys]
            local_bind = make_context_parallel_bind(whole_frozen)
        grads, total, aux = accumulate(full, [local[i] for i in mine], counts, [keys[i] for i in mine], local_bind)
        if grads is None:  # no rows on this rank in this step
            grads = tree_map(torch.zeros_like, full)
            aux = _empty_metrics(loss, bind, full, micro_batches[0], counts, keys[0], paired)
        params = tree_map(for_update, state.trainable)
        grads = tree_map(to_placement, grads, params)
        updates, opt_state = optimizer.update(grads, state.opt_state, params, state.step)
        grad_norm = grad_norm_from_state(opt_state)
        if grad_norm is None:
            grad_norm = global_norm(grads)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        trainable = tree_map(lambda new, old: new.redistribute(dp, old.placements),
                             apply_updates(params, updates), state.trainable)
        metrics = {"train/loss": _sum_over_ranks(total, dp), "train/grad_norm": grad_norm,
                   **{name: _sum_over_ranks(v, dp) for name, v in sorted(aux.items())}}
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng_key=next_key), metrics

    return train_step


def _empty_metrics(loss: Loss, bind, full, micro_batch: dict, counts: dict, key, paired: bool) -> dict:
    """The metrics `loss` reports for no rows (zeros of each metric's dtype), for a rank with no rows
    in a step: it still joins every metric's sum over the ranks, with the same names and dtypes.
    Read from the loss on the first row (or pair) of a global micro-batch, without gradients: a
    forward of zero rows is not something every attention kernel takes."""
    units = int(micro_batch["input_ids"].shape[0]) // (2 if paired else 1)
    (first,) = shard_micro_batches([micro_batch], 0, units, paired)
    with torch.no_grad():
        _, metrics = loss(bind(full), {**first, **counts}, key)
    return {name: torch.zeros_like(v) for name, v in metrics.items()}


# ---- sharded checkpoints (torch.distributed.checkpoint) ---------------------------------------

def _tensors_and_values(state: TrainState) -> tuple[dict[str, torch.Tensor], dict]:
    """The state's tensors by pytree path (`backends.checkpoint`'s keys; DTensors as they are
    placed, `carry` tensors under `carry/<name>`) and the JSON of the rest (step, data cursor,
    non-tensor leaves, carry values, the tensor keys)."""
    tensors, values = {}, {}
    for name, leaf in leaves_with_paths(state_tree(state), none_is_leaf=True):
        if isinstance(leaf, torch.Tensor):
            tensors[name] = leaf.detach()
        else:
            values[name] = leaf
    carry_tensors, carry_values = split_carry(state.carry)
    tensors.update(carry_tensors)
    meta = {"step": state.step, "data_cursor": state.data_cursor, "values": values, "tensors": sorted(tensors),
            "carry": {"values": carry_values, "tensors": sorted(carry_tensors)}}
    return tensors, meta


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def save_sharded(state: TrainState, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save the whole train state into `folder` with `torch.distributed.checkpoint`: every rank
    writes its shards (`dcp.save`, one `FileSystemWriter` file per rank; a replicated tensor is
    written once), rank 0 writes `state.json` (the non-tensor fields and `extra`). Collective: every rank calls
    it with its `shard_state`d state; without a process group it saves one process's plain state.

    Atomic: the ranks write into `<folder>.tmp`, and after a barrier rank 0 fsyncs it and renames it
    to `folder` (swapping out an existing one), so a crash leaves the previous `folder` or none,
    never a half-written one. Returns `folder`."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    distributed = _is_distributed()
    rank = torch.distributed.get_rank() if distributed else 0
    tensors, meta = _tensors_and_values(state)
    meta["extra"] = extra or {}
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
        aside = tmp.with_name(tmp.name + ".old")  # where `swap_into_place` moves the previous `folder`
        if folder.exists():
            shutil.rmtree(aside, ignore_errors=True)
        tmp.mkdir(parents=True)
    if distributed:
        torch.distributed.barrier()
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not distributed)
        if distributed:
            torch.distributed.barrier()  # every rank's shards are written
        if rank == 0:
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))
            fsync_tree(tmp)
            swap_into_place(tmp, folder)
    except BaseException:
        if rank == 0:  # DCP raises on every rank when one fails; `folder` is untouched
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if distributed:
        torch.distributed.barrier()  # no rank returns before `folder` is there
    return folder


def _open_sharded(folder: Path) -> tuple[dict, dict]:
    """(`state.json`, DCP's metadata of each saved tensor) of a `save_sharded` folder."""
    if not is_sharded_checkpoint(folder):
        raise CheckpointError(f"{folder} is not a puretune sharded checkpoint (no {STATE_JSON} / "
                              f"{SHARDED_METADATA} written by save_sharded)")
    meta = json.loads((folder / STATE_JSON).read_text())
    return meta, dcp.FileSystemReader(folder).read_metadata().state_dict_metadata


def _targets(folder: Path, named, meta: dict, saved: dict, plain_only: bool) -> dict[str, torch.Tensor]:
    """What DCP loads into, by name, for the tensor leaves of `named` (pytree path, leaf), checked
    against the checkpoint: a DTensor leaf's copy (DCP fills each rank's part of it), a plain
    tensor of the leaf's shape for a plain leaf. Non-tensor leaves must be in `state.json`."""
    tensors = {}
    for name, leaf in named:
        if not isinstance(leaf, torch.Tensor):
            if name not in meta["values"]:
                raise CheckpointError(f"{folder}: value {name!r} is missing from {STATE_JSON}; the "
                                      "checkpoint is from a different run setup")
            continue
        if isinstance(leaf, DTensor) and plain_only:
            raise ValueError(f"loading {folder}: `like` holds DTensor {name!r} but no mesh was given")
        if name not in saved:
            raise CheckpointError(f"{folder}: tensor {name!r} is missing; the checkpoint is from a different run setup")
        size, dtype = saved[name].size, saved[name].properties.dtype
        if tuple(size) != tuple(leaf.shape) or dtype != leaf.dtype:
            raise CheckpointError(f"{folder}: {name} is {dtype} {list(size)} in the checkpoint, expected "
                                  f"{leaf.dtype} {list(leaf.shape)}")
        tensors[name] = leaf.detach().clone() if isinstance(leaf, DTensor) else torch.empty(tuple(size), dtype=dtype)
    return tensors


def _read(folder: Path, tensors: dict[str, torch.Tensor], no_dist: bool) -> None:
    """DCP's load of `tensors` (in place) from `folder`; a missing or truncated shard file is a
    CheckpointError."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=dcp.FileSystemReader(folder), no_dist=no_dist)
    except dcp.CheckpointException as e:
        raise CheckpointError(f"{folder}: the shards cannot be read; the checkpoint is damaged "
                              f"({str(e).strip().splitlines()[-1]})") from e


def _refuse_unexpected(folder: Path, unexpected) -> None:
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensors {sorted(unexpected)[:5]}; the checkpoint is from a "
                              "different run setup")


def load_sharded(like: TrainState, folder: str | os.PathLike, mesh: DeviceMesh | None) -> TrainState:
    """The state saved by `save_sharded` in `folder`, in the placements of `like`: a state of the
    same run placed with `shard_state` on `mesh`, at any world size (DCP reads each rank's part of
    the saved shards, whatever world size wrote them). With `mesh` None, `like` is a plain state and
    one process loads the full tensors, no process group needed. `carry` is restored as saved.

    Raises CheckpointError naming the folder and the key when the folder is not a sharded
    checkpoint, or its tensors or values do not match `like` (another run setup or model shape)."""
    folder = Path(folder)
    meta, saved = _open_sharded(folder)
    template = state_tree(like)
    named = leaves_with_paths(template, none_is_leaf=True)
    tensors = _targets(folder, named, meta, saved, plain_only=mesh is None)
    carry_names = meta["carry"]["tensors"]
    _refuse_unexpected(folder, set(saved) - set(tensors) - set(carry_names))
    for name in carry_names:  # carry has no template: full plain tensors of the saved size
        tensors[name] = torch.empty(tuple(saved[name].size), dtype=saved[name].properties.dtype)
    _read(folder, tensors, no_dist=mesh is None)
    carry = dict(meta["carry"]["values"])
    carry.update({name.split("/", 1)[1]: tensors.pop(name) for name in carry_names})
    restored = [tensors[name] if isinstance(leaf, torch.Tensor) else meta["values"][name] for name, leaf in named]
    return like.replace(**replace_leaves(template, restored, none_is_leaf=True), carry=carry)


def load_sharded_fields(like: dict, folder: str | os.PathLike, exact: bool = True) -> dict:
    """Some fields of the train state saved by `save_sharded` in `folder`, read in one process with
    no process group into plain full tensors: `like` maps field names (`"trainable"`, ...) to plain
    trees of that field (or a part of one, e.g. `{"opt_state": {"schedule_free": {"z": ...}}}`) in
    the structure the run builds. Only their tensors are read (DCP reads the requested byte ranges),
    so a merge skips the optimizer state of a 70B run. Non-tensor leaves come from `state.json`.
    `exact`: the checkpoint must hold no other tensors under the requested fields (False to read a
    part of a field on purpose).

    Raises CheckpointError naming the folder and the key when the folder is not a sharded
    checkpoint, a tensor is missing or has another shape or dtype, or the checkpoint holds tensors
    under a requested field that `like` lacks (another run setup or model shape)."""
    folder = Path(folder)
    meta, saved = _open_sharded(folder)
    named = leaves_with_paths(like, none_is_leaf=True)
    tensors = _targets(folder, named, meta, saved, plain_only=True)
    if exact:
        fields = tuple(f"{field}." for field in like)
        _refuse_unexpected(folder, [n for n in saved if n.startswith(fields) and n not in tensors])
    _read(folder, tensors, no_dist=True)
    restored = [tensors[name] if isinstance(leaf, torch.Tensor) else meta["values"][name] for name, leaf in named]
    return replace_leaves(like, restored, none_is_leaf=True)
