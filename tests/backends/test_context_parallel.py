"""backends.context_parallel: "CP equals no CP on packed rows". The token split (pure); under
torchrun at 2 processes (gloo, the tiny model) the forward's log-probs and 3 training steps (full
fine-tune and LoRA) at context_parallel_size 2 equal one process on the same packed micro-batches,
and the run's sharded checkpoint loads in one process; at 4 processes, cp 2 on HSDP's and FSDP's
meshes equals one process too, with a data-parallel share that has no rows.

Run as a script (`python -m torch.distributed.run --nproc_per_node 2 --standalone
tests/backends/test_context_parallel.py OUT CHECKPOINTS`, or `... four OUT` at 4 processes), rank 0
writes the results to OUT; the tests launch it and compare with the same computation here in one
process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends.context_parallel import owned_bounds, split_tokens
from pure import rng
from pure.losses import sft
from pure.losses.common import IGNORE_INDEX, next_token_targets
from pure.lora import LoraConfig, init_lora
from pure.models import init
from pure.optim import adamw, chain, clip_by_global_norm, sgd
from pure.train import init_train_state, make_apply
from pure.tree import leaves_with_paths
from tests.backends.agreement import assert_runs_agree, step_metrics, train_one_process
from tests.tiny import TINY

REPO = Path(__file__).resolve().parents[2]
STEPS, MICRO_BATCHES, ROWS, WIDTH = 3, 2, 3, 16
VARIANTS = ("full", "lora")


def _packed_batch(key) -> dict:
    """ROWS packed rows of WIDTH: documents of 2-9 tokens laid end to end (positions 0.. per
    document, the first label -100, a random prompt prefix masked), right-padded; the last row is
    filled to the end (no padding). The split point of 2 ranks falls inside a document."""
    ids_key, len_key, prefix_key = rng.split(key, 3)
    ids = rng.randint(ids_key, 1, TINY.vocab_size, (ROWS, WIDTH))
    lengths = rng.randint(len_key, 2, 10, (ROWS, 8)).tolist()
    prefixes = rng.randint(prefix_key, 0, 3, (ROWS, 8)).tolist()
    labels = torch.full((ROWS, WIDTH), IGNORE_INDEX)
    positions = torch.zeros((ROWS, WIDTH), dtype=torch.long)
    segments = torch.zeros((ROWS, WIDTH), dtype=torch.long)
    for r in range(ROWS):
        offset, doc = 0, 0
        fill = WIDTH if r == ROWS - 1 else WIDTH - 1 - r
        while offset < fill:
            n = min(lengths[r][doc], fill - offset)
            segments[r, offset:offset + n] = doc + 1
            positions[r, offset:offset + n] = torch.arange(n)
            start = offset + max(1, prefixes[r][doc])
            labels[r, start:offset + n] = ids[r, start:offset + n]
            offset, doc = offset + n, doc + 1
    ids = torch.where(segments > 0, ids, torch.zeros_like(ids))
    return {"input_ids": ids, "labels": labels, "positions": positions, "segment_ids": segments}


def _global_batches(one_document: bool = False) -> list[list[dict]]:
    """STEPS steps of MICRO_BATCHES packed micro-batches; `one_document`: the last micro-batch is one
    row of one 6-token document (2 data-parallel ranks: one of them has no rows of it)."""
    steps = [[_packed_batch(rng.fold_in(rng.key(11), s * MICRO_BATCHES + m)) for m in range(MICRO_BATCHES)]
             for s in range(STEPS)]
    if one_document:
        mb = _packed_batch(rng.key(12))
        steps[-1][-1] = {key: value[:1] for key, value in mb.items()}
        steps[-1][-1]["segment_ids"] = (torch.arange(WIDTH) < 6).long()[None]
        steps[-1][-1]["labels"] = torch.where(steps[-1][-1]["segment_ids"] > 0, steps[-1][-1]["labels"], IGNORE_INDEX)
    return steps


# ---- the token split (pure) -------------------------------------------------------------------


def test_ranks_own_contiguous_token_ranges_that_make_the_micro_batch():
    assert owned_bounds(10, 2) == [0, 5, 10] and owned_bounds(7, 3) == [0, 2, 4, 7]
    mb = _packed_batch(rng.key(3))
    real = mb["segment_ids"] > 0
    for world in (1, 2, 3, 5):
        rows = [split_tokens(mb, r, world) for r in range(world)]
        owned = [row["input_ids"][0, :row["input_ids"].shape[1] - (r < world - 1)] for r, row in enumerate(rows)]
        assert torch.equal(torch.cat(owned), mb["input_ids"][real])
        for r in range(world - 1):  # the extra token is the next rank's first
            assert rows[r]["input_ids"][0, -1] == rows[r + 1]["input_ids"][0, 0]
            assert rows[r]["segment_ids"][0, -1] == rows[r + 1]["segment_ids"][0, 0]


def test_every_target_is_trained_once_by_the_rank_that_owns_the_predicting_token():
    """The rank rows' targets at their owned tokens, in rank order, are the whole batch's targets at
    its real tokens: the same (token, target) pairs, so the per-token losses are the same."""
    mb = _packed_batch(rng.key(4))
    real = mb["segment_ids"] > 0
    want = next_token_targets(mb["labels"], mb["segment_ids"])[real]
    for world in (2, 3, 4):
        got = []
        for r in range(world):
            row = split_tokens(mb, r, world)
            targets = next_token_targets(row["labels"], row["segment_ids"])[0]
            got.append(targets[:targets.numel() - (r < world - 1)])
            if r < world - 1:
                assert targets[-1] == IGNORE_INDEX  # the extra token's target falls off the row
        assert torch.equal(torch.cat(got), want)
    assert (want != IGNORE_INDEX).any()


def test_documents_stay_apart_across_rows_once_flattened():
    mb = _packed_batch(rng.key(5))
    (row,) = [split_tokens(mb, 0, 1)]
    ids = row["segment_ids"][0]
    runs = ids[torch.cat([torch.tensor([True]), ids[1:] != ids[:-1]])]
    assert runs.unique().numel() == runs.numel()  # each document one run, none shares an id
    assert torch.equal(row["positions"][0], mb["positions"][mb["segment_ids"] > 0])


def test_fewer_tokens_than_ranks_are_refused():
    mb = {key: torch.zeros((1, 4), dtype=torch.long) for key in ("input_ids", "labels", "positions", "segment_ids")}
    mb["segment_ids"][0, 0] = 1  # one real token
    with pytest.raises(ValueError, match="1 real tokens cannot be split over context_parallel_size=2"):
        split_tokens(mb, 0, 2)


def test_unpacked_and_pair_batches_are_refused_by_their_keys():
    pair = {"input_ids": torch.ones((2, 4), dtype=torch.long), "labels": torch.ones((2, 4), dtype=torch.long),
            "attention_mask": torch.ones((2, 4), dtype=torch.long)}
    with pytest.raises(ValueError, match="context parallelism splits packed rows .* this batch has attention_mask"):
        split_tokens(pair, 0, 2)


# ---- 2 ranks of context parallelism equal one process ----------------------------------------


def _setup(variant: str):
    params = init(TINY, rng.key(0))
    if variant == "full":
        return {"params": params}, {}, chain(clip_by_global_norm(0.5), sgd(0.5, momentum=0.9)), None
    lora_config = LoraConfig(r=4, alpha=8)
    delta = init_lora(params, lora_config, rng.key(1), target_modules=["q_proj", "v_proj"])
    return {"lora": delta}, params, adamw(1e-2, weight_decay=0.01), lora_config


def _train_one_process(variant: str, one_document: bool = False) -> dict:
    trainable, frozen, optimizer, lora_config = _setup(variant)
    return train_one_process(TINY, trainable, frozen, optimizer, lora_config, _global_batches(one_document), rng.key(2))


def _train_context_parallel(variant: str, mesh, one_document: bool = False, folder: Path | None = None) -> dict:
    """3 steps of the sharded step on `mesh` (with its cp dimension); `folder`: `save_sharded` there after."""
    from backends.context_parallel import context_parallel_attention
    from backends.distributed import gather, make_sharded_train_step, place, save_sharded, shard_state

    trainable, frozen, optimizer, lora_config = _setup(variant)
    attention = context_parallel_attention(mesh)
    step = make_sharded_train_step(
        sft, optimizer, lambda full: make_apply(TINY, full, lora_config=lora_config), mesh, frozen=place(frozen, mesh),
        make_context_parallel_bind=lambda full: make_apply(TINY, full, lora_config=lora_config, attention_fn=attention))
    state = shard_state(init_train_state(trainable, optimizer, rng.key(2)), mesh)
    history = []
    for micro_batches in _global_batches(one_document):
        state, metrics = step(state, micro_batches)
        history.append(step_metrics(metrics))
    if folder is not None:
        save_sharded(state, folder)
    placements = {path: tuple(str(p) for p in x.placements) for path, x in leaves_with_paths(state.trainable)}
    return {"metrics": history, "params": dict(leaves_with_paths(gather(state.trainable))), "placements": placements}


def _forward_logprobs(bind_params, attention=None, rank: int = 0, world: int = 1) -> torch.Tensor:
    """log-softmax [N, V] at the real tokens of the first micro-batch: the whole batch (no attention
    given) or this rank's owned tokens of its `split_tokens` row."""
    mb = _global_batches()[0][0]
    if attention is None:
        out = make_apply(TINY, {})(bind_params)(mb["input_ids"], positions=mb["positions"],
                                                segment_ids=mb["segment_ids"])
        return out.logits.log_softmax(-1)[mb["segment_ids"] > 0]
    row = split_tokens(mb, rank, world)
    out = make_apply(TINY, {}, attention_fn=attention)(bind_params)(
        row["input_ids"], positions=row["positions"], segment_ids=row["segment_ids"])
    return out.logits.log_softmax(-1)[0, :row["input_ids"].shape[1] - (rank < world - 1)]


def _torchrun_main(out: str, checkpoints: str) -> None:
    import torch.distributed as dist

    from backends.context_parallel import context_parallel_attention
    from backends.distributed import make_mesh, make_sharded_train_step, mesh_sizes

    world = int(os.environ["WORLD_SIZE"])
    mesh = make_mesh(mesh_sizes(world, cp=world), "cpu")
    rank = mesh["cp"].get_local_rank()
    results = {"mesh": (mesh.mesh_dim_names, tuple(mesh.mesh.shape))}
    mine = _forward_logprobs({"params": init(TINY, rng.key(0))}, context_parallel_attention(mesh), rank, world)
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    results["logprobs"] = torch.cat(parts)
    results.update({variant: _train_context_parallel(variant, mesh, folder=Path(checkpoints) / variant)
                    for variant in VARIANTS})
    try:
        make_sharded_train_step(sft, sgd(0.1), lambda full: make_apply(TINY, full), mesh, paired=True)
    except ValueError as error:
        results["pair_refusal"] = str(error)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _four_rank_main(out: str) -> None:
    """4 processes: HSDP (dp_replicate 2) x cp 2 and FSDP (dp_shard 2) x cp 2, with a micro-batch of
    one document (one data-parallel share has no rows: its whole cp group adds zeros)."""
    import torch.distributed as dist

    from backends.distributed import make_mesh, mesh_sizes

    world = int(os.environ["WORLD_SIZE"])
    meshes = {"hsdp-cp": make_mesh(mesh_sizes(world, dp_replicate=2, cp=2), "cpu"),
              "fsdp-cp": make_mesh(mesh_sizes(world, cp=2), "cpu")}
    results = {name: {variant: _train_context_parallel(variant, mesh, one_document=True) for variant in VARIANTS}
               for name, mesh in meshes.items()}
    results["meshes"] = {name: mesh.mesh_dim_names for name, mesh in meshes.items()}
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _launch(nproc: int, *args) -> None:
    """This file under torchrun at `nproc` processes (gloo, one thread each), with `args`."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
                           __file__, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def context_parallel_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("context_parallel")
    _launch(2, root / "results.pt", root / "checkpoints")
    return {**torch.load(root / "results.pt"), "checkpoints": root / "checkpoints"}


def test_the_forward_logprobs_of_two_context_parallel_ranks_equal_one_process(context_parallel_results):
    want = _forward_logprobs({"params": init(TINY, rng.key(0))})
    torch.testing.assert_close(context_parallel_results["logprobs"], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_at_context_parallel_two_equals_one_process(context_parallel_results, variant):
    got, want = context_parallel_results[variant], _train_one_process(variant)
    # the two ranks sum their partial gradients (and the keys' gradients) in another order
    assert_runs_agree(got, want)


def test_the_params_are_replicated_on_cp_and_sharded_on_dp_shard(context_parallel_results):
    assert context_parallel_results["mesh"] == (("dp_shard", "cp"), (1, 2))
    placements = context_parallel_results["full"]["placements"]
    assert set(placements.values()) == {("S(0)", "R")}, placements


def test_pair_batches_are_refused_under_context_parallelism(context_parallel_results):
    assert "pair batches" in context_parallel_results["pair_refusal"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_context_parallel_checkpoint_loads_in_one_process_as_the_gathered_params(context_parallel_results, variant):
    from backends.distributed import load_sharded

    trainable, _, optimizer, _ = _setup(variant)
    state = load_sharded(init_train_state(trainable, optimizer, rng.key(2)),
                         context_parallel_results["checkpoints"] / variant, mesh=None)
    assert state.step == STEPS
    for path, value in leaves_with_paths(state.trainable):
        assert torch.equal(value, context_parallel_results[variant]["params"][path]), path


def test_context_parallel_two_on_hsdp_and_fsdp_at_four_ranks_equals_one_process(tmp_path):
    _launch(4, "four", tmp_path / "results.pt")
    results = torch.load(tmp_path / "results.pt")
    assert results["meshes"] == {"hsdp-cp": ("dp_replicate", "dp_shard", "cp"), "fsdp-cp": ("dp_shard", "cp")}
    for variant in VARIANTS:
        want = _train_one_process(variant, one_document=True)
        for name in ("hsdp-cp", "fsdp-cp"):
            assert_runs_agree(results[name][variant], want, f"{name} {variant}")


if __name__ == "__main__":
    if sys.argv[1] == "four":
        _four_rank_main(sys.argv[2])
    else:
        _torchrun_main(sys.argv[1], sys.argv[2])
