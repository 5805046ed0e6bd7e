"""backends.distributed: mesh sizes and batch sharding (pure), and FSDP-style training at 2 ranks,
HSDP (dp_replicate 2 x dp_shard 2) at 4 and pure replication (dp_replicate 2 x dp_shard 1) at 2
under torchrun equal to one process.

Run as a script (`python -m torch.distributed.run --nproc_per_node 2 --standalone
tests/backends/test_distributed.py OUT CHECKPOINTS`, or `... hsdp OUT CHECKPOINTS` at 4 processes,
`... replicate OUT CHECKPOINTS` at 2), this file trains the tiny model sharded and rank 0 writes
the losses and gathered final params to OUT; the tests launch it and compare with the same steps
run here in one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends.distributed import mesh_sizes, shard_batch_indices, shard_micro_batches
from pure import rng
from pure.losses import sft
from pure.lora import LoraConfig, init_lora
from pure.models import init
from pure.optim import adamw, chain, clip_by_global_norm, sgd
from pure.train import init_train_state, make_apply, make_train_step
from pure.tree import leaves_with_paths
from tests.tiny import TINY

REPO = Path(__file__).resolve().parents[2]

STEPS, MICRO_BATCHES, ROWS, LENGTH = 3, 2, 4, 12
VARIANTS = ("full", "lora")
# name -> (variant, shard_params, shard_optimizer, rows per micro-batch): ZeRO-2 (params replicated,
# optimizer state sharded), DDP (all replicated), and rows that do not split evenly over 2 ranks
# (3: one rank takes 2 rows, the other 1; 1: one rank has no rows at all).
LAYOUTS = {"full-zero2": ("full", False, True, ROWS), "full-ddp": ("full", False, False, ROWS),
           "lora-rows3": ("lora", True, True, 3), "full-rows1": ("full", True, True, 1)}
# the same on HSDP's 2 x 2 mesh: 3 rows over 4 data-parallel ranks leave the last (replica 1, shard 1) none
HSDP_LAYOUTS = {"hsdp-full-zero2": ("full", False, True, ROWS), "hsdp-full-ddp": ("full", False, False, ROWS),
                "hsdp-lora-rows3": ("lora", True, True, 3)}


# ---- mesh sizes -------------------------------------------------------------------------------


def test_mesh_sizes_give_dp_shard_what_the_others_leave():
    assert mesh_sizes(8).as_dict() == {"dp_replicate": 1, "dp_shard": 8, "cp": 1, "tp": 1}
    assert mesh_sizes(8, tp=2).dp_shard == 4
    assert mesh_sizes(8, dp_replicate=2, cp=2).dp_shard == 2
    assert mesh_sizes(8, dp_shard=2, dp_replicate=2, tp=2).world_size == 8
    assert mesh_sizes(1).world_size == 1


@pytest.mark.parametrize("kwargs, key", [
    ({"tp": 3}, "tensor_parallel_size"),
    ({"cp": 5}, "context_parallel_size"),
    ({"dp_replicate": 3}, "dp_replicate_size"),
    ({"dp_shard": 3}, "dp_shard_size"),
    ({"dp_shard": 2, "tp": 2}, "dp_shard_size"),
    ({"tp": 0}, "tensor_parallel_size"),
])
def test_mesh_sizes_that_do_not_fit_the_world_are_refused_by_key(kwargs, key):
    with pytest.raises(ValueError, match=key) as error:
        mesh_sizes(8, **kwargs)
    assert "8" in str(error.value)


def test_mesh_sizes_whose_product_does_not_divide_the_world_name_the_sizes():
    with pytest.raises(ValueError, match="tensor_parallel_size=4 = 8 does not divide the world size 4"):
        mesh_sizes(4, dp_replicate=2, tp=4)


# ---- batch sharding ---------------------------------------------------------------------------


def test_ranks_take_contiguous_rows_that_make_the_global_batch_at_any_world_size():
    for rows in (1, 3, 6, 8):
        for world in (1, 2, 4, 8):
            taken = [shard_batch_indices(rows, rank, world) for rank in range(world)]
            assert [i for r in taken for i in r] == list(range(rows))
            assert max(map(len, taken)) - min(map(len, taken)) <= 1  # as even as the rows allow
    assert shard_batch_indices(8, 1, 2) == range(4, 8)
    assert shard_batch_indices(6, 0, 4) == range(0, 2) and shard_batch_indices(6, 3, 4) == range(5, 6)
    assert shard_batch_indices(1, 1, 2) == range(1, 1)  # fewer rows than ranks: rank 1 has none


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not in a data-parallel world of size 2"):
        shard_batch_indices(4, 2, 2)


def test_shard_micro_batches_slices_the_row_tensors_only():
    mb = {"input_ids": torch.arange(8).reshape(4, 2), "labels": torch.arange(8).reshape(4, 2), "note": "x"}
    (mine,) = shard_micro_batches([mb], rank=1, world=2)
    assert mine["input_ids"].tolist() == [[4, 5], [6, 7]] and mine["note"] == "x"


# ---- training at 2 ranks equals 1 -------------------------------------------------------------


def _global_batches(rows: int = ROWS) -> list[list[dict]]:
    """STEPS global steps of MICRO_BATCHES random-token micro-batches; each row's labels mask a random
    prefix, so the ranks hold different numbers of trained tokens (the global normalisation matters)."""
    steps = []
    for s in range(STEPS):
        micro = []
        for m in range(MICRO_BATCHES):
            tokens_key, prefix_key = rng.split(rng.fold_in(rng.key(7), s * MICRO_BATCHES + m), 2)
            ids = rng.randint(tokens_key, 0, TINY.vocab_size, (rows, LENGTH))
            prefix = rng.randint(prefix_key, 0, LENGTH - 2, (rows, 1))
            labels = torch.where(torch.arange(LENGTH) < prefix, torch.full_like(ids, -100), ids)
            micro.append({"input_ids": ids, "labels": labels})
        steps.append(micro)
    return steps


def _setup(variant: str):
    """(trainable, frozen, optimizer, lora_config) of a full fine-tune (SGD with momentum after a
    global-norm clip that is active: the norm is ~1) or a LoRA (AdamW) of the tiny model."""
    params = init(TINY, rng.key(0))
    if variant == "full":
        return {"params": params}, {}, chain(clip_by_global_norm(0.5), sgd(0.5, momentum=0.9)), None
    lora_config = LoraConfig(r=4, alpha=8)
    delta = init_lora(params, lora_config, rng.key(1), target_modules=["q_proj", "v_proj"])
    return {"lora": delta}, params, adamw(1e-2, weight_decay=0.01), lora_config


def _train_one_process(variant: str, rows: int = ROWS):
    """`{"metrics": [(loss, grad_norm, trained tokens) per step], "params": {path: final tensor}}`."""
    trainable, frozen, optimizer, lora_config = _setup(variant)
    step = make_train_step(sft, optimizer, make_apply(TINY, frozen, lora_config=lora_config))
    state = init_train_state(trainable, optimizer, rng.key(2))
    history = []
    for micro_batches in _global_batches(rows):
        state, metrics = step(state, micro_batches)
        history.append(_step_metrics(metrics))
    return {"metrics": history, "params": dict(leaves_with_paths(state.trainable))}


def _step_metrics(metrics: dict) -> tuple[float, float, float]:
    return tuple(float(metrics[name]) for name in ("train/loss", "train/grad_norm", "num_trained_tokens"))


def _train_sharded(variant: str, mesh, shard_params: bool = True, shard_optimizer: bool = True, rows: int = ROWS):
    from backends.distributed import gather, make_sharded_train_step, place, shard_state

    trainable, frozen, optimizer, lora_config = _setup(variant)
    step = make_sharded_train_step(sft, optimizer, lambda full: make_apply(TINY, full, lora_config=lora_config),
                                   mesh, frozen=place(frozen, mesh, shard_params), shard_optimizer=shard_optimizer)
    state = shard_state(init_train_state(trainable, optimizer, rng.key(2)), mesh, shard_params, shard_optimizer)
    history = []
    for micro_batches in _global_batches(rows):
        state, metrics = step(state, micro_batches)
        history.append(_step_metrics(metrics))
    placed = leaves_with_paths({"trainable": state.trainable, "opt_state": state.opt_state})
    return {"metrics": history, "params": dict(leaves_with_paths(gather(state.trainable))),
            "placements": {path: tuple(str(p) for p in x.placements) for path, x in placed},
            "local_numel": sum(x.to_local().numel() for _, x in placed), "full_numel": sum(x.numel() for _, x in placed)}


def _gathered(state) -> dict:
    """`{path: full tensor}` of the state's trainable params, optimizer state and RNG key, and its step."""
    from backends.distributed import gather

    tree = gather({"trainable": state.trainable, "opt_state": state.opt_state, "rng_key": state.rng_key})
    return {**dict(leaves_with_paths(tree)), "step": state.step}


def _fresh(variant: str, mesh):
    """The initial train state of `variant`, `shard_state`d on `mesh` (FSDP's or HSDP's placements)."""
    from backends.distributed import shard_state

    trainable, _, optimizer, _ = _setup(variant)
    return shard_state(init_train_state(trainable, optimizer, rng.key(2)), mesh)


def _reload(variant: str, folder: Path, mesh):
    """The `save_sharded` checkpoint in `folder` loaded into a fresh state on `mesh`."""
    from backends.distributed import load_sharded

    return load_sharded(_fresh(variant, mesh), folder, mesh)


def _checkpoint_sharded(variant: str, mesh, rank: int, world: int, folder: Path, one_process: Path) -> dict:
    """Train 2 steps, `save_sharded` (and on rank 0 a plain `save_checkpoint` of the gathered state),
    take step 3 (the uninterrupted run); then load the checkpoint into a fresh sharded state and take
    step 3 again (the resumed run), and load the one-process checkpoint `one_process`."""
    from backends.checkpoint import save_checkpoint
    from backends.distributed import gather, load_sharded, make_sharded_train_step, place, save_sharded, shard_state

    trainable, frozen, optimizer, lora_config = _setup(variant)
    step = make_sharded_train_step(sft, optimizer, lambda full: make_apply(TINY, full, lora_config=lora_config),
                                   mesh, frozen=place(frozen, mesh))

    def fresh():
        return shard_state(init_train_state(trainable, optimizer, rng.key(2)), mesh)

    batches = _global_batches()
    state = fresh()
    for micro_batches in batches[:2]:
        state, _ = step(state, micro_batches)
    save_sharded(state, folder / "sharded")
    full = state.replace(trainable=gather(state.trainable), opt_state=gather(state.opt_state))
    if rank == 0:
        save_checkpoint(full, folder / "plain")
    state, metrics = step(state, batches[2])
    resumed, resumed_metrics = step(load_sharded(fresh(), folder / "sharded", mesh), batches[2])
    return {"uninterrupted": _gathered(state), "resumed": _gathered(resumed),
            "metrics": (_step_metrics(metrics), _step_metrics(resumed_metrics)),
            "from_one_process": _gathered(load_sharded(fresh(), one_process, mesh))}


def _torchrun_main(out: str, checkpoints: str) -> None:
    import torch.distributed as dist

    from backends.distributed import make_mesh, place

    world = int(os.environ["WORLD_SIZE"])
    mesh = make_mesh(mesh_sizes(world), "cpu")
    rank = dist.get_rank()
    results = {variant: _train_sharded(variant, mesh) for variant in VARIANTS}
    results.update({name: _train_sharded(variant, mesh, *layout) for name, (variant, *layout) in LAYOUTS.items()})
    results["checkpoint"] = {variant: _checkpoint_sharded(variant, mesh, rank, world, Path(checkpoints) / variant,
                                                          Path(checkpoints) / "one-process" / variant)
                             for variant in VARIANTS}
    results["mesh_dims"] = mesh.mesh_dim_names
    try:
        place({"w": torch.zeros(4)}, make_mesh(mesh_sizes(world, tp=world), "cpu"))
    except NotImplementedError as error:
        results["tp_refusal"] = str(error)
    else:
        results["tp_refusal"] = "a tp mesh was accepted"
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _hsdp_main(out: str, checkpoints: str) -> None:
    """4 processes: HSDP (dp_replicate 2 x dp_shard 2) and FSDP (dp_shard 4) runs; an HSDP checkpoint
    resumed at HSDP, loaded at FSDP 4 ranks, saved there and loaded back at HSDP."""
    import torch.distributed as dist

    from backends.distributed import make_mesh, place, save_sharded

    world = int(os.environ["WORLD_SIZE"])
    hsdp = make_mesh(mesh_sizes(world, dp_replicate=2), "cpu")  # initialises the process group
    fsdp = make_mesh(mesh_sizes(world), "cpu")
    rank = dist.get_rank()
    results = {f"hsdp-{variant}": _train_sharded(variant, hsdp) for variant in VARIANTS}
    results.update({f"fsdp4-{variant}": _train_sharded(variant, fsdp) for variant in VARIANTS})
    results.update({name: _train_sharded(variant, hsdp, *layout) for name, (variant, *layout) in HSDP_LAYOUTS.items()})
    results["checkpoint"] = {}
    for variant in VARIANTS:
        folder = Path(checkpoints) / variant
        run = _checkpoint_sharded(variant, hsdp, rank, world, folder, Path(checkpoints) / "one-process" / variant)
        at_fsdp = _reload(variant, folder / "sharded", fsdp)
        save_sharded(at_fsdp, folder / "fsdp4")
        run.update(at_fsdp4=_gathered(at_fsdp), back_at_hsdp=_gathered(_reload(variant, folder / "fsdp4", hsdp)))
        results["checkpoint"][variant] = run
    results["mesh"] = (hsdp.mesh_dim_names, tuple(hsdp.mesh.shape))
    try:  # the data-parallel placements take no tp dimension (TP has its own step: backends.tensor_parallel)
        place({"w": torch.zeros(4)}, make_mesh(mesh_sizes(world, dp_replicate=2, tp=2), "cpu"))
    except NotImplementedError as error:
        results["tp_refusal_hsdp"] = str(error)
    else:
        results["tp_refusal_hsdp"] = "a tp mesh was accepted"
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _replicate_main(out: str, checkpoints: str) -> None:
    """2 processes: dp_replicate 2 x dp_shard 1 runs (the 2-D path with nothing sharded); the HSDP
    checkpoint of `_hsdp_main` loaded at FSDP 2 ranks and at this mesh."""
    import torch.distributed as dist

    from backends.distributed import make_mesh

    world = int(os.environ["WORLD_SIZE"])
    mesh = make_mesh(mesh_sizes(world, dp_replicate=world), "cpu")
    fsdp = make_mesh(mesh_sizes(world), "cpu")
    results = {f"replicate-{variant}": _train_sharded(variant, mesh) for variant in VARIANTS}
    results["mesh"] = (mesh.mesh_dim_names, tuple(mesh.mesh.shape))
    results["hsdp_checkpoint_at"] = {
        variant: {"fsdp2": _gathered(_reload(variant, Path(checkpoints) / variant / "sharded", fsdp)),
                  "replicate2": _gathered(_reload(variant, Path(checkpoints) / variant / "sharded", mesh))}
        for variant in VARIANTS}
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _save_one_process_checkpoints(folder: Path) -> dict:
    """`save_sharded` without a process group, after 2 one-process steps of each variant, into
    `folder/<variant>`; returns the saved states' `_gathered` tensors for the 2-rank load to match."""
    from backends.distributed import save_sharded

    saved = {}
    for variant in VARIANTS:
        trainable, frozen, optimizer, lora_config = _setup(variant)
        step = make_train_step(sft, optimizer, make_apply(TINY, frozen, lora_config=lora_config))
        state = init_train_state(trainable, optimizer, rng.key(2))
        for micro_batches in _global_batches()[:2]:
            state, _ = step(state, micro_batches)
        save_sharded(state, folder / variant)
        saved[variant] = _gathered(state)
    return saved


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    root = tmp_path_factory.mktemp("distributed")
    out, checkpoints = root / "results.pt", root / "checkpoints"
    one_process = _save_one_process_checkpoints(checkpoints / "one-process")
    _launch(2, out, checkpoints)
    results = torch.load(out)
    results["checkpoints"], results["one_process_saved"] = checkpoints, one_process
    return results


def _launch(nproc: int, *args) -> None:
    """This file under torchrun at `nproc` processes (gloo, one thread each), with `args`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
                           __file__, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp_at_two_ranks_equals_one_process(two_rank_results, variant):
    sharded, reference = two_rank_results[variant], _train_one_process(variant)
    # fp32: the two ranks add the same terms in a different order (per-rank partial sums, then the
    # reduce-scatter), so agreement is to rounding, not bitwise; 1e-5 is ~100 ulps at these magnitudes.
    for got, want in zip(sharded["metrics"], reference["metrics"], strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    assert sharded["params"].keys() == reference["params"].keys()
    for path, value in reference["params"].items():
        torch.testing.assert_close(sharded["params"][path], value, atol=1e-5, rtol=1e-5, msg=path)


@pytest.mark.parametrize("name", LAYOUTS)
def test_zero2_ddp_and_uneven_rows_at_two_ranks_equal_one_process(two_rank_results, name):
    variant, _, _, rows = LAYOUTS[name]
    sharded, reference = two_rank_results[name], _train_one_process(variant, rows)
    for got, want in zip(sharded["metrics"], reference["metrics"], strict=True):  # fp32 sums, as above
        assert got == pytest.approx(want, abs=1e-5)
    for path, value in reference["params"].items():
        torch.testing.assert_close(sharded["params"][path], value, atol=1e-5, rtol=1e-5, msg=path)


def test_zero2_replicates_params_and_shards_optimizer_state_and_ddp_replicates_both(two_rank_results):
    zero2, ddp = two_rank_results["full-zero2"]["placements"], two_rank_results["full-ddp"]["placements"]
    name = "layers.0.mlp.up_proj.weight"
    assert zero2[f"trainable.params.model.{name}"] == ("R",)
    assert zero2[f"opt_state.1.1.momentum.params.model.{name}"] == ("S(0)",)
    assert set(ddp.values()) == {("R",)}


def test_fsdp_state_is_sharded_on_dim_0_and_replicated_where_it_does_not_divide(two_rank_results):
    full = two_rank_results["full"]
    placements = full["placements"]
    # 61 vocabulary rows do not split over 2 ranks; a 0-dim grad norm or step count cannot split.
    assert placements["trainable.params.model.embed_tokens.weight"] == ("R",)
    assert placements["trainable.params.model.layers.0.mlp.up_proj.weight"] == ("S(0)",)
    assert placements["opt_state.1.1.momentum.params.model.layers.0.mlp.up_proj.weight"] == ("S(0)",)
    assert placements["opt_state.0.grad_norm"] == ("R",)
    lora = two_rank_results["lora"]["placements"]
    assert all(p == ("S(0)",) for path, p in lora.items() if path.startswith("trainable.")), lora
    # Rank 0 holds about half of the params and optimizer state (the replicated embedding aside).
    assert full["local_numel"] < 0.7 * full["full_numel"]


def test_the_two_rank_mesh_is_dp_shard_and_other_dimensions_are_refused_by_key(two_rank_results):
    assert two_rank_results["mesh_dims"] == ("dp_shard",)
    assert "tensor_parallel_size > 1 is not supported yet" in two_rank_results["tp_refusal"]


# ---- sharded checkpoints ----------------------------------------------------------------------


def _assert_bitwise_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for path, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[path].dtype == value.dtype and torch.equal(got[path], value), path
        else:
            assert got[path] == value, path


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_two_rank_checkpoint_resumes_at_two_ranks_bitwise_identical(two_rank_results, variant):
    run = two_rank_results["checkpoint"][variant]
    assert run["uninterrupted"]["step"] == 3
    _assert_bitwise_equal(run["resumed"], run["uninterrupted"])
    assert run["metrics"][0] == run["metrics"][1]


def _plain_like(variant: str):
    trainable, _, optimizer, _ = _setup(variant)
    return init_train_state(trainable, optimizer, rng.key(5))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_two_rank_checkpoint_loads_in_one_process_as_the_gathered_state(two_rank_results, variant):
    from backends.checkpoint import latest_checkpoint, load_checkpoint
    from backends.distributed import load_sharded

    folder = two_rank_results["checkpoints"] / variant
    loaded = load_sharded(_plain_like(variant), folder / "sharded", mesh=None)
    gathered, _ = load_checkpoint(latest_checkpoint(folder / "plain"), _plain_like(variant))
    assert loaded.step == gathered.step == 2 and loaded.data_cursor == gathered.data_cursor
    _assert_bitwise_equal(_gathered(loaded), _gathered(gathered))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_one_process_checkpoint_loads_at_two_ranks_as_saved(two_rank_results, variant):
    _assert_bitwise_equal(two_rank_results["checkpoint"][variant]["from_one_process"],
                          two_rank_results["one_process_saved"][variant])


def test_the_sharded_save_leaves_no_temporary_folder(two_rank_results):
    left = sorted(p.name for p in two_rank_results["checkpoints"].rglob("*.tmp*"))
    assert left == []


def test_a_missing_or_differently_shaped_sharded_checkpoint_is_refused_naming_folder_and_key(two_rank_results, tmp_path):
    from backends.checkpoint import CheckpointError
    from backends.distributed import load_sharded

    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nowhere'} is not a puretune sharded checkpoint"):
        load_sharded(_plain_like("lora"), tmp_path / "nowhere", mesh=None)
    folder = two_rank_results["checkpoints"] / "lora" / "sharded"
    params = init(TINY, rng.key(0))
    wider = init_lora(params, LoraConfig(r=8, alpha=8), rng.key(1), target_modules=["q_proj", "v_proj"])
    with pytest.raises(CheckpointError, match=r"sharded: trainable\.lora\..*q_proj.* is torch.float32 \[4, "):
        load_sharded(init_train_state({"lora": wider}, adamw(1e-2), rng.key(2)), folder, mesh=None)
    with pytest.raises(CheckpointError, match=r"sharded: tensor 'trainable\.params\..*' is missing"):
        load_sharded(_plain_like("full"), folder, mesh=None)


def test_a_one_process_sharded_checkpoint_restores_carry_and_values_as_saved(tmp_path):
    from backends.distributed import load_sharded, save_sharded

    state = _plain_like("lora").replace(step=4, data_cursor={"epoch": 1, "batch": 3},
                                        carry={"old_logprobs": torch.arange(6.0).reshape(2, 3), "round": 2})
    save_sharded(state, tmp_path / "ckpt")
    loaded = load_sharded(_plain_like("lora"), tmp_path / "ckpt", mesh=None)
    assert loaded.step == 4 and loaded.data_cursor == {"epoch": 1, "batch": 3} and loaded.carry["round"] == 2
    assert torch.equal(loaded.carry["old_logprobs"], state.carry["old_logprobs"])
    _assert_bitwise_equal(_gathered(loaded), _gathered(state))


def test_a_failed_sharded_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from backends.distributed import load_sharded, save_sharded

    first = _plain_like("lora")
    save_sharded(first, tmp_path / "ckpt")
    (tmp_path / "ckpt.tmp").mkdir()  # a crashed save's leftovers are cleared by the next one

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_sharded(first.replace(step=9), tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_sharded(_plain_like("lora"), tmp_path / "ckpt", mesh=None).step == 0


def test_a_sharded_checkpoint_with_a_missing_shard_file_is_refused_as_damaged(two_rank_results, tmp_path):
    import shutil

    from backends.checkpoint import CheckpointError
    from backends.distributed import load_sharded

    damaged = tmp_path / "sharded"
    shutil.copytree(two_rank_results["checkpoints"] / "lora" / "sharded", damaged)
    (damaged / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=f"{damaged}: the shards cannot be read"):
        load_sharded(_plain_like("lora"), damaged, mesh=None)


# ---- HSDP: dp_replicate x dp_shard ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hsdp_results(tmp_path_factory):
    """The 4-process HSDP / FSDP launch, then the 2-process dp_replicate launch (which loads the HSDP
    checkpoints the first wrote); one dict of both, with the folders and the one-process saves."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    root = tmp_path_factory.mktemp("hsdp")
    checkpoints = root / "checkpoints"
    one_process = _save_one_process_checkpoints(checkpoints / "one-process")
    _launch(4, "hsdp", root / "hsdp.pt", checkpoints)
    _launch(2, "replicate", root / "replicate.pt", checkpoints)
    return {**torch.load(root / "hsdp.pt"), "replicate": torch.load(root / "replicate.pt"),
            "checkpoints": checkpoints, "one_process_saved": one_process}


def _assert_runs_agree(got: dict, want: dict) -> None:
    # fp32 sums in another order (per-rank partial sums, the all-reduce and reduce-scatter), as above
    for g, w in zip(got["metrics"], want["metrics"], strict=True):
        assert g == pytest.approx(w, abs=1e-5)
    assert got["params"].keys() == want["params"].keys()
    for path, value in want["params"].items():
        torch.testing.assert_close(got["params"][path], value, atol=1e-5, rtol=1e-5, msg=path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hsdp_at_four_ranks_equals_one_process_and_fsdp_at_four_ranks(hsdp_results, variant):
    hsdp = hsdp_results[f"hsdp-{variant}"]
    _assert_runs_agree(hsdp, _train_one_process(variant))
    _assert_runs_agree(hsdp, hsdp_results[f"fsdp4-{variant}"])


@pytest.mark.parametrize("name", HSDP_LAYOUTS)
def test_hsdp_zero2_ddp_and_uneven_rows_equal_one_process(hsdp_results, name):
    variant, _, _, rows = HSDP_LAYOUTS[name]
    _assert_runs_agree(hsdp_results[name], _train_one_process(variant, rows))


def test_hsdp_replicates_across_the_replicas_and_shards_dim_0_within_a_shard_group(hsdp_results):
    full = hsdp_results["hsdp-full"]
    placements = full["placements"]
    name = "layers.0.mlp.up_proj.weight"
    assert placements[f"trainable.params.model.{name}"] == ("R", "S(0)")
    assert placements[f"opt_state.1.1.momentum.params.model.{name}"] == ("R", "S(0)")
    # 61 vocabulary rows do not split over the 2 ranks of a shard group; a 0-dim grad norm cannot split
    assert placements["trainable.params.model.embed_tokens.weight"] == ("R", "R")
    assert placements["opt_state.0.grad_norm"] == ("R", "R")
    lora = hsdp_results["hsdp-lora"]["placements"]
    assert all(p == ("R", "S(0)") for path, p in lora.items() if path.startswith("trainable.")), lora
    # a rank holds about half (its shard group's share), not a quarter: the replicas hold the same shards
    assert 0.4 * full["full_numel"] < full["local_numel"] < 0.7 * full["full_numel"]
    zero2, ddp = hsdp_results["hsdp-full-zero2"]["placements"], hsdp_results["hsdp-full-ddp"]["placements"]
    assert zero2[f"trainable.params.model.{name}"] == ("R", "R")
    assert zero2[f"opt_state.1.1.momentum.params.model.{name}"] == ("R", "S(0)")
    assert set(ddp.values()) == {("R", "R")}


def test_the_hsdp_mesh_is_replicate_by_shard_and_a_tp_dimension_is_refused_by_key(hsdp_results):
    assert hsdp_results["mesh"] == (("dp_replicate", "dp_shard"), (2, 2))
    assert "tensor_parallel_size > 1 is not supported yet" in hsdp_results["tp_refusal_hsdp"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_dp_replicate_two_by_dp_shard_one_at_two_ranks_equals_one_process(hsdp_results, variant):
    replicate = hsdp_results["replicate"]
    assert replicate["mesh"] == (("dp_replicate", "dp_shard"), (2, 1))
    _assert_runs_agree(replicate[f"replicate-{variant}"], _train_one_process(variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_hsdp_checkpoint_resumes_at_hsdp_bitwise_identical(hsdp_results, variant):
    run = hsdp_results["checkpoint"][variant]
    assert run["uninterrupted"]["step"] == 3
    _assert_bitwise_equal(run["resumed"], run["uninterrupted"])
    assert run["metrics"][0] == run["metrics"][1]


def _saved_at_step_2(results, variant: str) -> dict:
    """`_gathered` of the state the HSDP run saved, from rank 0's plain checkpoint of it."""
    from backends.checkpoint import latest_checkpoint, load_checkpoint

    return _gathered(load_checkpoint(latest_checkpoint(results["checkpoints"] / variant / "plain"),
                                     _plain_like(variant))[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_hsdp_checkpoint_loads_in_one_process_as_the_gathered_state(hsdp_results, variant):
    from backends.distributed import load_sharded

    loaded = load_sharded(_plain_like(variant), hsdp_results["checkpoints"] / variant / "sharded", mesh=None)
    assert loaded.step == 2
    _assert_bitwise_equal(_gathered(loaded), _saved_at_step_2(hsdp_results, variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_hsdp_checkpoint_loads_at_fsdp_two_and_four_ranks_and_back_at_hsdp_as_saved(hsdp_results, variant):
    saved = _saved_at_step_2(hsdp_results, variant)
    run, at = hsdp_results["checkpoint"][variant], hsdp_results["replicate"]["hsdp_checkpoint_at"][variant]
    for loaded in (at["fsdp2"], at["replicate2"], run["at_fsdp4"], run["back_at_hsdp"]):
        _assert_bitwise_equal(loaded, saved)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_one_process_checkpoint_loads_at_hsdp_as_saved(hsdp_results, variant):
    _assert_bitwise_equal(hsdp_results["checkpoint"][variant]["from_one_process"],
                          hsdp_results["one_process_saved"][variant])


if __name__ == "__main__":
    mains = {"hsdp": _hsdp_main, "replicate": _replicate_main}
    if sys.argv[1] in mains:
        mains[sys.argv[1]](sys.argv[2], sys.argv[3])
    else:
        _torchrun_main(sys.argv[1], sys.argv[2])
