"""The processes a training program runs in: one, or a torchrun world sharded by backends.distributed.

    layout = launch.layout_of(config)          # torchrun's env -> process group, mesh, sharding plan
    with layout.main_first():                   # rank 0 writes caches, the others then read them
        data = prepare_datasets(...)
    train_step, eval_step = layout.steps(loss, optimizer, bind)
    ... loop.fit places the state (layout.place), saves and loads (layout.save / layout.load),
    agrees on stops (layout.agree) and exports on rank 0 (layout.export) ...

Without torchrun (no WORLD_SIZE, or 1) the layout is one process and every method is the plain
one-process path. Under `torchrun --nproc_per_node N -m programs.sft --config x.yaml` every rank
runs the same program on the same global batches (each a pure function of seed and step, built on
every rank); the sharded step trains each rank on its rows of them, so the global batch sequence,
and the result up to fp32 rounding, is the same at any world size: `micro_batch_size` x
`gradient_accumulation_steps` is the global batch here, not the per-device one of axolotl.
Only rank 0 prints (the others' stdout goes to /dev/null), logs metrics, writes the resolved config
and exports; every rank writes its shards of a checkpoint.

The frozen params (a LoRA's base) stay whole on every rank; the trained params, gradients and
optimizer state are placed as the config's sharding plan says (`programs.config.derived.sharding_plan`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from backends import checkpoint as ckpt
from programs.config import ConfigError


@dataclass(frozen=True)
class Layout:
    """One process (`mesh` None) or rank `rank` of a `world` of data-parallel processes on `mesh`.
    `rank` and `world` are the global process rank and count (rank 0 prints; barriers span them all);
    on HSDP's 2-D mesh the data-parallel rank that picks the rows is the same flattened index
    (`backends.distributed.data_parallel_rank`)."""

    plan: object = None  # programs.config.derived.ShardingPlan
    mesh: object = None  # torch.distributed.device_mesh.DeviceMesh
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tensor_parallel(self) -> bool:
        """Whether the ranks split each layer (`tensor_parallel_size` > 1) rather than the batch."""
        return self.distributed and (self.plan.tp or 1) > 1

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it writes what the block caches: a prepared dataset), then the
        others run it (and read the cache)."""
        if self.distributed and not self.is_main:
            torch.distributed.barrier()
        yield
        if self.distributed and self.is_main:
            torch.distributed.barrier()

    def steps(self, loss, optimizer, bind, paired: bool = False) -> tuple[Callable, Callable]:
        """(train_step, eval_step) of `loss` with `bind` (its frozen params whole on every rank):
        `pure.train`'s, or the sharded step on the plan's placements with an eval step that gathers
        the trained params first (every rank evaluates the whole eval set; rank 0 logs it).
        `paired`: the batches are pair batches, which the ranks split by pairs.
        With context_parallel_size > 1 the train step's local forward runs `bind.with_attention`
        (`programs.common.make_bind`'s) of the context-parallel attention; eval keeps `bind`."""
        from pure.train import make_eval_step, make_train_step

        if not self.distributed:
            return make_train_step(loss, optimizer, bind), make_eval_step(loss, bind)
        if self.tensor_parallel:  # `bind` is the rank's TP forward (`common.make_bind` with this layout)
            from backends.tensor_parallel import make_tp_eval_step, make_tp_train_step

            return make_tp_train_step(loss, optimizer, bind, self.mesh), make_tp_eval_step(loss, bind)
        from backends.distributed import make_sharded_train_step

        make_local_bind = None
        if (self.plan.cp or 1) > 1:
            from backends.context_parallel import context_parallel_attention

            if paired:
                raise ConfigError("context_parallel_size > 1 splits packed rows by tokens; pair batches (DPO and "
                                  "its family, reward models) are not supported yet: set context_parallel_size: 1")
            local_bind = bind.with_attention(context_parallel_attention(self.mesh))
            make_local_bind = lambda frozen: local_bind  # noqa: E731 (the frozen params are bound already)
        train_step = make_sharded_train_step(loss, optimizer, lambda frozen: bind, self.mesh,
                                             shard_optimizer=self.plan.shard_optimizer, paired=paired,
                                             make_context_parallel_bind=make_local_bind)
        return train_step, self.whole_params(make_eval_step(loss, bind))

    def whole(self, tree):
        """`tree` with its DTensors gathered whole (one process: `tree` as it is)."""
        if not self.distributed:
            return tree
        from backends.distributed import gather

        return gather(tree)

    def whole_params(self, step: Callable) -> Callable:
        """`step(params, *args)` called with the params gathered whole."""
        if not self.distributed:
            return step
        return lambda params, *args: step(self.whole(params), *args)

    def from_main(self, fn: Callable, *args):
        """`fn(*args)` on every rank, and rank 0's result, or its exception, on all of them (a pickled
        broadcast): what rank 0 alone computes (GRPO's sampling), the others receive, and a failure
        there (a vLLM server that stopped answering) is raised by every rank at the same point. One
        process: `fn(*args)`."""
        if not self.distributed:
            return fn(*args)
        result, error = None, None
        try:
            result = fn(*args)
        except Exception as err:  # noqa: BLE001 (rank 0's is re-raised on every rank below)
            if not self.is_main:
                raise
            error = err
        box = [(result, error)]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box[0]
        if error is not None:
            raise error
        return result

    def check_same(self, micro_batches, what: str) -> None:
        """Raise ValueError(`what`) unless every rank holds the same micro-batches (a checksum of
        their tensors, compared over the ranks). One process: nothing to check."""
        if not self.distributed:
            return
        total = torch.zeros((), dtype=torch.float64)
        for mb in micro_batches:
            for name in sorted(mb):
                if isinstance(mb[name], torch.Tensor) and mb[name].numel():
                    values = mb[name].detach().double().flatten()
                    total = total + (values * torch.arange(1, values.numel() + 1, dtype=torch.float64)).sum()
        low, high = total.clone().reshape(1), total.clone().reshape(1)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise ValueError(f"rank {self.rank}: {what}")

    def place(self, state):
        """The state in the plan's placements (one process: as it is)."""
        if not self.distributed:
            return state
        if self.tensor_parallel:
            from backends.tensor_parallel import place_tp_state

            return place_tp_state(state, self.mesh)
        from backends.distributed import shard_state

        return shard_state(state, self.mesh, self.plan.shard_params, self.plan.shard_optimizer)

    def save(self, state, output_dir: Path, extra: dict, total_limit: int | None) -> Path:
        """`output_dir/checkpoint-<step>`: one process's `backends.checkpoint` folder, also for a world
        whose plan says `state_dict_type: FULL_STATE_DICT` (gathered, written by rank 0), or the
        world's sharded one (`SHARDED_STATE_DICT`: `backends.distributed.save_sharded`, every rank its
        shards); the oldest beyond `total_limit` are removed by rank 0. Either resumes at any world size."""
        if not self.distributed:
            return ckpt.save_checkpoint(state, output_dir, extra=extra, total_limit=total_limit)
        from backends.distributed import gather, save_sharded

        folder = Path(output_dir) / f"checkpoint-{state.step}"
        if self.plan.state_dict_type == "SHARDED_STATE_DICT":
            save_sharded(state, folder, extra=extra)
            if self.is_main and total_limit:
                ckpt.prune_checkpoints(output_dir, total_limit)
        else:
            whole = state.replace(trainable=gather(state.trainable), opt_state=gather(state.opt_state))
            if self.is_main:
                ckpt.save_checkpoint(whole, output_dir, extra=extra, total_limit=total_limit)
        torch.distributed.barrier()
        return folder

    def load(self, path: Path, like):
        """The state saved in `path`, in `like`'s placements, whatever world size saved it: a sharded
        checkpoint is read by each rank's part (or whole, in one process); a one-process checkpoint is
        read whole and placed."""
        from backends.distributed import gather, is_sharded_checkpoint, load_sharded

        if is_sharded_checkpoint(path):
            return load_sharded(like, path, self.mesh)
        if not self.distributed:
            return ckpt.load_checkpoint(path, like)[0]
        plain = like.replace(trainable=gather(like.trainable), opt_state=gather(like.opt_state))
        return self.place(ckpt.load_checkpoint(path, plain)[0])

    def agree(self, stop: str | None) -> str | None:
        """A stop (a signal) seen by any rank, seen by all after the same step, so they all save the
        same checkpoint and return together; one process: `stop` as it is."""
        if not self.distributed:
            return stop
        flag = torch.tensor([0 if stop is None else 1])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return (stop or "a signal to another rank") if int(flag) else None

    def export(self, export: Callable, state, last_checkpoint: Path | None) -> Path | None:
        """`export(state)` with the trained params whole: gathered on every rank, written by rank 0.
        Returns the folder (None on the other ranks). A plan with `final_state_dict_type:
        SHARDED_STATE_DICT` exports nothing: the run's last sharded checkpoint is its result, and
        `programs.merge_sharded_fsdp_weights` consolidates it."""
        if not self.distributed:
            return export(state)
        from backends.distributed import gather

        if self.plan.final_state_dict_type == "SHARDED_STATE_DICT":
            print(f"final_state_dict_type: SHARDED_STATE_DICT: the result is the sharded checkpoint {last_checkpoint}; "
                  "consolidate it with python -m programs.merge_sharded_fsdp_weights --config <this config>", flush=True)
            return last_checkpoint

        plain = state.replace(trainable=gather(state.trainable))
        folder = export(plain) if self.is_main else None
        torch.distributed.barrier()
        return folder

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


ONE_PROCESS = Layout()


def world_size_from_env() -> int:
    """torchrun's WORLD_SIZE (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def layout_of(config) -> Layout:
    """The layout the config runs in, from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT) and the sharding keys: one process, or the process group (nccl on CUDA, gloo
    on CPU) with its DeviceMesh. Prints (rank 0) one line of how the ranks share the state, and the
    plan's lines. Raises ConfigError when the sizes do not fit the world or ask for more than one
    process without torchrun, or the config asks for what the sharded step does not run."""
    from programs.config.derived import sharding_plan

    plan = sharding_plan(config)
    world = world_size_from_env()
    asked = {key: size for key, size in (("dp_shard_size", plan.dp_shard), ("dp_replicate_size", plan.dp_replicate),
                                         ("tensor_parallel_size", plan.tp), ("context_parallel_size", plan.cp))
             if size and size > 1}
    if plan.final_state_dict_type == "SHARDED_STATE_DICT" and config.save_strategy == "no":
        raise ConfigError("final_state_dict_type: SHARDED_STATE_DICT makes the last sharded checkpoint the result, "
                          "but save_strategy: no saves none; drop one of them")
    if world == 1:
        if asked:
            key, size = next(iter(asked.items()))
            raise ConfigError(f"{key}: {size} needs more than one process; launch with "
                              f"torchrun --nproc_per_node N -m programs.<program> --config ...")
        for line in plan.lines:
            print(line, flush=True)
        return ONE_PROCESS
    refuse_in_world(config, world)
    from backends.distributed import make_mesh, mesh_sizes, placement_mesh

    try:
        sizes = mesh_sizes(world, dp_shard=plan.dp_shard, dp_replicate=plan.dp_replicate, tp=plan.tp, cp=plan.cp)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=plan.timeout_s) if plan.timeout_s else None
        torch.distributed.init_process_group(backend, timeout=timeout)
    mesh = make_mesh(sizes, "cuda" if cuda else "cpu")
    try:
        if sizes.tp > 1:
            from backends.tensor_parallel import tp_mesh

            tp_mesh(mesh)  # TP alone: every rank of the world in the one TP group
        else:
            placement_mesh(mesh)
    except NotImplementedError as err:
        raise ConfigError(f"{err} (tensor_parallel_size={sizes.tp} with {world} processes: TP runs alone, "
                          "tensor_parallel_size = the world size)" if sizes.tp > 1 else str(err)) from None
    rank = torch.distributed.get_rank()
    layout = Layout(plan=plan, mesh=mesh, rank=rank, world=world)
    if not layout.is_main:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints for the world
    print(f"distributed: {world} processes over {backend}, mesh {sizes.as_dict()}; {describe(plan)}", flush=True)
    for line in plan.lines + memory_lines(plan, cuda):
        print(line, flush=True)
    return layout


def memory_lines(plan, cuda: bool) -> tuple[str, ...]:
    """What the plan's memory-only switches do here, one line each (none changes a result)."""
    lines = []
    if plan.shard_params and plan.reshard_after_forward:
        lines.append("reshard_after_forward: true: the sharded params are gathered whole once per step and freed "
                     "after its backward (the memory of reshard_after_forward: false); per-layer resharding is not "
                     "built yet")
    if plan.offload_params or plan.offload_optimizer:
        if cuda:
            raise ConfigError("offload_params / offload_optimizer: CPU offload from a CUDA device is not supported "
                              "yet; set them false")
        lines.append("offload: the params and optimizer state already live in CPU memory (no accelerator)")
    if plan.cpu_ram_efficient_loading:
        lines.append("cpu_ram_efficient_loading: no effect yet; every rank reads the whole checkpoint from disk")
    return tuple(lines)



def describe(plan) -> str:
    """How the ranks share the state, in words."""
    def where(sharded: bool) -> str:
        return "sharded" if sharded else "replicated"

    if (plan.tp or 1) > 1:
        return ("tensor parallel: q/k/v/gate/up split by output features (whole heads), o/down by input "
                "features, embeddings, norms and lm_head replicated, LoRA factors placed with their base; every "
                "rank runs every row of the batch")
    return (f"{plan.strategy}: trained params {where(plan.shard_params)}, gradients "
            f"{'reduce-scattered' if plan.shard_grads else 'all-reduced'}, optimizer state "
            f"{where(plan.shard_optimizer)}; frozen params whole on every rank; each rank trains on its "
            "rows of every global micro-batch")


def refuse_in_world(config, world: int) -> None:
    """What the sharded step does not run yet, refused by key before anything loads."""
    from programs.config.derived import precision_plan, training_kind

    where = f"under torchrun ({world} processes)"
    if (config.tensor_parallel_size or 1) > 1:
        if training_kind(config) != "sft":
            raise ConfigError(f"tensor_parallel_size runs programs.sft only yet; rl / reward models {where} shard "
                              "the batch (dp_shard_size), not the layers")
        if config.adapter == "qlora" or config.load_in_4bit or config.load_in_8bit:
            raise ConfigError("tensor_parallel_size: a quantised base (load_in_4bit / load_in_8bit) is not split "
                              "over TP ranks yet")
    if config.torch_compile is True:
        raise ConfigError(f"torch_compile: true is not supported {where} yet; set torch_compile: false")
    if precision_plan(config).loss_scaling:
        raise ConfigError(f"fp16 (dynamic loss scaling) is not supported {where} yet; use bf16 or fp32")
    if training_kind(config) in ("grpo", "gdpo") and config.trl.use_vllm and config.trl.vllm_mode == "colocate":
        raise ConfigError(f"trl.vllm_mode: colocate is not supported {where} yet (an engine in every rank); use "
                          "vllm_mode: server, which rank 0 talks to")
    if (config.context_parallel_size or 1) > 1 and (training_kind(config) != "sft" or not config.sample_packing):
        raise ConfigError(f"context_parallel_size: {config.context_parallel_size} splits packed rows by tokens: it "
                          f"needs SFT with sample_packing: true, not {training_kind(config)} with sample_packing: "
                          f"{config.sample_packing} (pair batches and unpacked rows are not supported yet)")
