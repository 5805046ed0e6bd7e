"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) for the pure Llama forward, over a `tp` mesh dimension.

    local_config = tp_local_config(config, tp_size)                          # heads and MLP width / tp
    params, lora = shard_params_for_tp(params, lora, config, rank, tp_size)  # each rank's plain shards
    state = init_tp_train_state({"lora": lora}, optimizer, key, mesh)        # DTensor views of the shards
    bind = make_tp_apply(config, params, mesh, lora_config=lora_config)      # the rank's forward
    step = make_tp_train_step(sft, optimizer, bind, mesh)
    state, metrics = step(state, micro_batches)                              # the same batches on every TP rank
    full_lora = backends.distributed.gather(state.trainable["lora"])         # export (full_tensor)

Every TP rank holds whole heads of q/k/v and a slice of the MLP's width: q/k/v/gate/up are
column-parallel (weight [out/tp, in], sharded on dim 0 with their biases), o/down row-parallel
(weight [out, in/tp], sharded on dim 1; their bias replicated); embeddings, norms and lm_head are
replicated. The rank runs the unchanged `pure.models.forward` with the local config
(`tp_local_config`) and TP linear ops:

    column-parallel:  y_r = f(x) W_r^T + b_r         f: identity forward, all-reduce(sum) of dx backward
    row-parallel:     y   = g(x_r W_r^T) + b         g: all-reduce(sum) forward, identity backward

so one attention block and one MLP cost one all-reduce each way, and every rank ends a layer with
the full residual stream. The forward never learns a layer's name, so the plan travels with the
weight: the bound params wrap each decoder linear's weight in a `ColumnParallel` / `RowParallel`
named tuple (made inside `bind`, so `torch.func.grad` sees plain tensors and the wrapper is a pytree
node `pure.remat` looks through). Telling the kinds apart by shape was the other option; it fails for
models whose H * D / tp equals the hidden size (Qwen3-0.6B at tp 2: q_proj and o_proj are both
[1024, 1024] per rank).

LoRA follows its base: column-parallel A [r, in] replicated, B [out/tp, r] sharded on dim 0;
row-parallel A [r, in/tp] sharded on dim 1, B [out, r] replicated (x_r A_r^T is a partial sum, and
so is the low-rank term: g reduces it with the base's). DoRA is refused: its row norm
||W + s B A|| spans all ranks' rows or columns.

Gradients: a sharded param's gradient is its shard of the full gradient. A replicated param whose
every use sees the full activation gradient (embeddings, the layer norms, the final norm, lm_head,
row-parallel biases: f all-reduces dx before it reaches them) gets the full gradient on every rank.
The replicated factor of LoRA and Qwen3's per-head q_norm/k_norm see only the rank's heads or
columns: their gradient is partial, and the step all-reduces it (`tp_layout` says which is which).
The optimizer then runs on DTensor views of the local tensors (`Shard(0)`, `Shard(1)`, `Replicate()`
on the `tp` dimension), as `backends.distributed`'s step does, so a global-norm clip measures the
full model: sharded squares summed over the ranks, replicated ones once. `torch.func.grad` itself
only ever sees plain tensors (a DTensor redistribute inside it fails on torch 2.13).

At rest a TP state's trainable params and optimizer state are those DTensor views, so
`backends.distributed`'s gather, sharded checkpoints (DCP reads them at any TP size, or whole in one
process) and FULL saves take them as they take FSDP's; `place_tp_state` places a whole state.

Not here yet: TP combined with data parallelism on one mesh (other dimensions > 1 are refused),
fp16 loss scaling, quantised bases, and fewer key/value heads than TP ranks (they would have to be
replicated).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from pure import rng
from pure.losses.core import Loss
from pure.lora import LoraConfig, lora_linear
from pure.models.config import ModelConfig
from pure.models.llama import sdpa_attention
from pure.optim import apply_updates, grad_norm_from_state
from pure.train import TrainState, make_accumulator, make_apply
from pure.tree import global_norm, leaves_with_paths, replace_leaves, tree_map

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
# Replicated weights applied per head on the rank's heads only: their gradient is partial.
PER_HEAD_REPLICATED = ("q_norm", "k_norm")

# How a trainable leaf lies over the TP ranks (`tp_layout`).
SHARD_0, SHARD_1, REPLICATED, PARTIAL = "shard0", "shard1", "replicated", "partial"


class ColumnParallel(NamedTuple):
    """The weight [out/tp, in] of a column-parallel linear, as `tp_linear` receives it."""

    weight: torch.Tensor


class RowParallel(NamedTuple):
    """The weight [out, in/tp] of a row-parallel linear, as `tp_linear` receives it."""

    weight: torch.Tensor


# ---- the plan ---------------------------------------------------------------------------------


def _module_kind(module: str) -> str | None:
    """"column", "row" or None (not a decoder linear) for a module path such as `model.layers.0.mlp.up_proj`."""
    leaf = module.rsplit(".", 1)[-1]
    return "column" if leaf in COLUMN_PARALLEL else "row" if leaf in ROW_PARALLEL else None


def _param_layout(name: str) -> str:
    module, _, kind = name.rpartition(".")
    which = _module_kind(module)
    if which == "column":
        return SHARD_0  # weight and bias: output features
    if which == "row":
        return SHARD_1 if kind == "weight" else REPLICATED  # the bias is added once, after g
    if module.rsplit(".", 1)[-1] in PER_HEAD_REPLICATED:
        return PARTIAL
    return REPLICATED


def _lora_layout(module: str, factor: str) -> str:
    which = _module_kind(module)
    if which is None:
        raise ValueError(f"tensor parallelism: LoRA on {module!r} is not supported (only the decoder's "
                         f"linear layers {COLUMN_PARALLEL + ROW_PARALLEL}, not lm_head)")
    if factor == "m":
        _refuse_dora()
    if which == "column":
        return SHARD_0 if factor == "B" else PARTIAL
    return SHARD_1 if factor == "A" else PARTIAL


def _refuse_dora():
    raise ValueError("tensor parallelism: DoRA (peft_use_dora) is not supported with tensor_parallel_size > 1: "
                     "its row norm ||W + s B A|| spans every rank's shard")


def tp_layout(trainable: dict) -> dict:
    """`trainable`'s structure (`{"params": {name: t}, "lora": {module: {"A", "B"}}}`) with each leaf
    replaced by how it lies over the TP ranks: SHARD_0 / SHARD_1 (each rank a slice on that dim),
    REPLICATED (every rank the whole tensor and the whole gradient), PARTIAL (the whole tensor, each
    rank a partial gradient: the LoRA factor next to a sharded one, Qwen3's q_norm / k_norm)."""
    out = {}
    if "params" in trainable:
        out["params"] = {name: _param_layout(name) for name in trainable["params"]}
    if "lora" in trainable:
        out["lora"] = {module: {factor: _lora_layout(module, factor) for factor in entry}
                       for module, entry in (trainable["lora"] or {}).items()}
    return out


def tp_local_config(config: ModelConfig, tp_size: int) -> ModelConfig:
    """The config one TP rank's forward runs: num_attention_heads, num_key_value_heads and
    intermediate_size divided by `tp_size`, head_dim pinned to the full model's head size.
    Raises ValueError naming tensor_parallel_size when one of them does not divide."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp_size!r}")
    sizes = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
             "intermediate_size": config.intermediate_size}
    for name, size in sizes.items():
        if size % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} does not divide the model's {name} ({size}): "
                             f"each rank holds whole heads and an equal slice of the MLP")
    return config.replace(head_dim=config.head_size, **{name: size // tp_size for name, size in sizes.items()})


def _shard(x: torch.Tensor, layout: str, rank: int, tp_size: int) -> torch.Tensor:
    if layout in (SHARD_0, SHARD_1):
        return x.chunk(tp_size, dim=0 if layout == SHARD_0 else 1)[rank].clone()  # no view of the full tensor
    return x


def shard_params_for_tp(params: dict, lora: dict | None, config: ModelConfig, tp_rank: int,
                        tp_size: int) -> tuple[dict, dict | None]:
    """(params, lora) of TP rank `tp_rank`: plain tensors, sharded by `tp_layout` (replicated ones
    are the same tensors). Checks the model divides (`tp_local_config`) and refuses DoRA."""
    tp_local_config(config, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"TP rank {tp_rank} is not in a tensor-parallel group of size {tp_size}")
    layout = tp_layout({"params": params, "lora": lora or {}})
    local_params = {name: _shard(x, layout["params"][name], tp_rank, tp_size) for name, x in params.items()}
    local_lora = None if lora is None else {
        module: {f: _shard(x, layout["lora"][module][f], tp_rank, tp_size) for f, x in entry.items()}
        for module, entry in lora.items()}
    return local_params, local_lora


def tp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The `tp` dimension of `mesh` (a 1-D mesh is taken as it is). Other dimensions larger than 1 are
    refused by name: TP combined with data parallelism is not implemented here."""
    names = mesh.mesh_dim_names or ()
    if mesh.ndim == 1:
        return mesh
    for name in names:
        if name != "tp" and mesh[name].size() > 1:
            raise NotImplementedError(f"tensor parallelism with a {name!r} dimension of size {mesh[name].size()} "
                                      "is not supported yet: the TP step runs on a mesh of the 'tp' dimension only")
    if "tp" not in names:
        raise ValueError(f"the mesh has no 'tp' dimension (its dimensions: {names})")
    return mesh["tp"]


def gather_tp(params: dict, lora: dict | None, mesh: DeviceMesh) -> tuple[dict, dict | None]:
    """The full (params, lora) from every TP rank's shards (an all-gather per sharded tensor), plain
    tensors on every rank: the inverse of `shard_params_for_tp`, for export and tests."""
    tp = tp_mesh(mesh)
    group, size = tp.get_group(), tp.size()

    def full(x: torch.Tensor, layout: str) -> torch.Tensor:
        if layout not in (SHARD_0, SHARD_1):
            return x
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0 if layout == SHARD_0 else 1)

    layout = tp_layout({"params": params, "lora": lora or {}})
    full_params = {name: full(x, layout["params"][name]) for name, x in params.items()}
    full_lora = None if lora is None else {
        module: {f: full(x, layout["lora"][module][f]) for f, x in entry.items()} for module, entry in lora.items()}
    return full_params, full_lora


# ---- the collectives (f and g) ----------------------------------------------------------------


class _AllReduce(torch.autograd.Function):
    """g: y = sum over the TP ranks of x; the gradient passes through (every rank holds the whole dy)."""

    @staticmethod
    def forward(x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToRanks(torch.autograd.Function):
    """f: the identity, whose gradient is summed over the TP ranks (each rank's branch gives part of dx)."""

    @staticmethod
    def forward(x, group):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _AllReduce.apply(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """f of Megatron-LM: identity forward, all-reduce(sum) of the gradient backward."""
    return _CopyToRanks.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """g of Megatron-LM: all-reduce(sum) forward, identity backward."""
    return _AllReduce.apply(x, group)


# ---- the TP ops -------------------------------------------------------------------------------


def make_tp_ops(mesh: DeviceMesh, linear_fn: Callable = F.linear,
                lora_linear_fn: Callable = lora_linear) -> dict[str, Callable]:
    """`{"linear_fn", "lora_linear_fn"}` for `pure.models.forward` / `pure.train.make_apply` on TP
    shards whose weights are `ColumnParallel` / `RowParallel` (`tag_tp_weights`): f or g around the
    given local ops (the references, or `kernels/` ones that take the same arguments).

    LoRA dropout on a row-parallel module draws the one-process mask over the full input width and
    keeps the rank's slice, then computes the low-rank term with the reference math (not
    `lora_linear_fn`): so TP drops the same entries as one process, at the cost of a full-width
    mask per rank. A column-parallel module's input is whole on every rank: its mask is one
    process's as it is."""
    tp = tp_mesh(mesh)
    group, rank, size = tp.get_group(), tp.get_local_rank(), tp.size()

    def tp_linear(x, weight, bias):
        if isinstance(weight, ColumnParallel):
            return linear_fn(copy_to_tp(x, group), weight.weight, bias)
        if isinstance(weight, RowParallel):
            y = reduce_from_tp(linear_fn(x, weight.weight, None), group)
            return y if bias is None else y + bias
        raise TypeError(f"tensor-parallel linear: the weight {tuple(weight.shape)} is not tagged ColumnParallel "
                        "or RowParallel (bind the params through tag_tp_weights)")

    def tp_lora_linear(x, weight, bias, entry, config: LoraConfig, key=None):
        if config.use_dora:
            _refuse_dora()
        if isinstance(weight, ColumnParallel):  # x is whole on every rank: the one-process dropout mask
            return lora_linear_fn(copy_to_tp(x, group), weight.weight, bias, entry, config, key)
        if not isinstance(weight, RowParallel):
            raise TypeError("tensor-parallel LoRA linear: the base weight is not tagged ColumnParallel or RowParallel")
        if config.dropout > 0.0 and key is not None:
            # x holds this rank's columns: take its slice of the one-process mask (drawn over the full width,
            # row-major, so the slice is exact) so TP drops the same entries as one process.
            keep = rng.dropout_mask(key, config.dropout, (*x.shape[:-1], x.shape[-1] * size), device=x.device)
            keep = keep.narrow(-1, rank * x.shape[-1], x.shape[-1])
            dropped = torch.where(keep, x * (1.0 / rng.keep_probability(config.dropout)), 0.0)
            a, b = entry["A"].to(x.dtype), entry["B"].to(x.dtype)
            y = linear_fn(x, weight.weight, None) + F.linear(F.linear(dropped, a), b) * config.scale
        else:
            y = lora_linear_fn(x, weight.weight, None, entry, config, None)
        y = reduce_from_tp(y, group)  # the base and the low-rank term are both partial sums
        return y if bias is None else y + bias

    return {"linear_fn": tp_linear, "lora_linear_fn": tp_lora_linear}


def tag_tp_weights(params: dict) -> dict:
    """`params` with each decoder linear's weight wrapped as `ColumnParallel` or `RowParallel` (the
    tensors themselves untouched: wrapped inside the differentiated function, gradients flow)."""
    tags = {"column": ColumnParallel, "row": RowParallel}
    out = {}
    for name, x in params.items():
        module, _, kind = name.rpartition(".")
        which = _module_kind(module) if kind == "weight" else None
        out[name] = tags[which](x) if which is not None and isinstance(x, torch.Tensor) else x
    return out


def make_tp_apply(config: ModelConfig, frozen: dict, mesh: DeviceMesh, *, lora_config: LoraConfig | None = None,
                  attention_fn=sdpa_attention, linear_fn: Callable = F.linear,
                  lora_linear_fn: Callable = lora_linear, **apply_kwargs) -> Callable:
    """`pure.train.make_apply` for one TP rank: `config` is the full model's, `frozen` the rank's
    shards (`shard_params_for_tp`), and `bind(trainable)` takes the rank's trainable shards. The
    attention, norm and SwiGLU ops pass through unchanged (they see the rank's heads; an attention
    that reads H from q, as `sdpa_attention` and `kernels.attention`'s do, needs nothing more);
    linear_fn / lora_linear_fn are the local ops f and g wrap. `apply_kwargs`: make_apply's others
    (checkpoint_layers, token_logprob_fn, rms_norm_fn, swiglu_fn, neftune_alpha)."""
    if lora_config is not None and lora_config.use_dora:
        _refuse_dora()
    tp = tp_mesh(mesh)
    local = tp_local_config(config, tp.size())
    if "reference_params" in apply_kwargs and apply_kwargs["reference_params"] is not None:
        apply_kwargs["reference_params"] = tag_tp_weights(apply_kwargs["reference_params"])
    inner = make_apply(local, tag_tp_weights(frozen), lora_config=lora_config, attention_fn=attention_fn,
                       **make_tp_ops(tp, linear_fn, lora_linear_fn), **apply_kwargs)

    def bind(trainable: dict):
        if trainable.get("params"):
            trainable = {**trainable, "params": tag_tp_weights(trainable["params"])}
        return inner(trainable)

    return bind


# ---- the train step ---------------------------------------------------------------------------

_PLACEMENTS = {SHARD_0: Shard(0), SHARD_1: Shard(1), REPLICATED: Replicate(), PARTIAL: Replicate()}


def _as_dtensors(tree: dict, layout: dict, tp: DeviceMesh) -> dict:
    """Local tensors as DTensor views on `tp` (no communication): shards as Shard(d), the rest Replicate()."""
    return tree_map(lambda x, how: DTensor.from_local(x, tp, [_PLACEMENTS[how]], run_check=False), tree, layout)


def reduce_tp_grads(grads: dict, layout: dict, tp: DeviceMesh) -> dict:
    """The local gradients as the optimizer's DTensors: PARTIAL ones all-reduced (summed over the TP
    ranks) into Replicate(), the shards Shard(d), the full replicated ones Replicate() as they are."""

    def place(g, how):
        if how == PARTIAL:
            return DTensor.from_local(g, tp, [Partial()]).redistribute(tp, [Replicate()])
        return DTensor.from_local(g, tp, [_PLACEMENTS[how]], run_check=False)

    return tree_map(place, grads, layout)


def init_tp_train_state(trainable: dict, optimizer, key: torch.Tensor, mesh: DeviceMesh) -> TrainState:
    """A TrainState of the rank's plain shards (`shard_params_for_tp`) held as DTensor views on the
    `tp` dimension (`Shard(0)`, `Shard(1)` or `Replicate()`, no communication), the optimizer state
    initialised on them (moments placed as their params)."""
    tp = tp_mesh(mesh)
    trainable = _as_dtensors(trainable, tp_layout(trainable), tp)
    return TrainState(step=0, trainable=trainable, opt_state=optimizer.init(trainable), rng_key=key)


def place_tp_state(state: TrainState, mesh: DeviceMesh) -> TrainState:
    """`state` with whole plain tensors on every rank (a fresh one, or a one-process checkpoint)
    placed for TP: each trainable leaf a DTensor on the `tp` dimension as `tp_layout` lays it, each
    optimizer-state leaf as the trainable param it belongs to (the one whose pytree path ends its
    own, when the shapes agree: a moment of that param), `Replicate()` otherwise (a step count)."""
    tp = tp_mesh(mesh)
    layout = tp_layout(state.trainable)
    trainable = tree_map(lambda x, how: distribute_tensor(x, tp, [_PLACEMENTS[how]]), state.trainable, layout)
    params = {path: (how, leaf.shape) for (path, how), (_, leaf) in
              zip(leaves_with_paths(layout), leaves_with_paths(state.trainable))}

    def placed(path: str, x):
        if not isinstance(x, torch.Tensor):
            return x
        how = next((how for p, (how, shape) in params.items()
                    if (path == p or path.endswith("." + p)) and shape == x.shape), REPLICATED)
        return distribute_tensor(x, tp, [_PLACEMENTS[how]])

    named = leaves_with_paths(state.opt_state, none_is_leaf=True)
    opt_state = replace_leaves(state.opt_state, [placed(path, x) for path, x in named], none_is_leaf=True)
    return state.replace(trainable=trainable, opt_state=opt_state)


def _local(tree):
    return tree_map(lambda x: x.to_local() if isinstance(x, DTensor) else x, tree)


def make_tp_train_step(loss: Loss, optimizer, bind, mesh: DeviceMesh):
    """Build `train_step(state, micro_batches) -> (state, metrics)` for a TP state
    (`init_tp_train_state`, `place_tp_state`): `pure.train.make_train_step`'s contract on one TP rank,
    every TP rank passing the same micro-batches (TP ranks share the data, and the keys: dropout
    masks are one process's). `bind` is `make_tp_apply`'s.

    Per step: the loss's totals, then per micro-batch `torch.func.grad_and_value` of the rank's
    forward over its plain local shards; the PARTIAL gradients are all-reduced (`reduce_tp_grads`)
    and the optimizer updates the DTensor views, so `clip_by_global_norm` and `train/grad_norm` are
    the full model's norm. Loss and metrics come out of a replicated forward: the same on every
    rank, no reduction. fp16 loss scaling is refused."""
    tp = tp_mesh(mesh)
    accumulate = make_accumulator(loss)

    def train_step(state: TrainState, micro_batches: Sequence[dict]):
        if state.loss_scale is not None:
            raise NotImplementedError("fp16 dynamic loss scaling is not supported by the tensor-parallel step yet")
        local = _local(state.trainable)
        layout = tp_layout(local)
        step_key, next_key = rng.split(state.rng_key, 2)
        counts = loss.totals(bind(local), micro_batches)
        keys = [rng.fold_in(step_key, i) for i in range(len(micro_batches))]
        grads, total, aux = accumulate(local, micro_batches, counts, keys, bind)
        grads = reduce_tp_grads(grads, layout, tp)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable, state.step)
        grad_norm = grad_norm_from_state(opt_state)
        if grad_norm is None:
            grad_norm = global_norm(grads)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        metrics = {"train/loss": total, "train/grad_norm": grad_norm, **aux}
        return state.replace(step=state.step + 1, trainable=apply_updates(state.trainable, updates),
                             opt_state=opt_state, rng_key=next_key), metrics

    return train_step


def make_tp_eval_step(loss: Loss, bind):
    """`pure.train.make_eval_step` of `bind` (`make_tp_apply`'s) on a TP state's trainable DTensor views."""
    from pure.train import make_eval_step

    inner = make_eval_step(loss, bind)
    return lambda trainable, micro_batches: inner(_local(trainable), micro_batches)
