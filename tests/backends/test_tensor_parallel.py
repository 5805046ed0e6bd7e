"""backends.tensor_parallel: the TP plan (pure), and at 2 TP ranks under torchrun the forward, the
gradients and 3 training steps equal one process.

Run as a script (`python -m torch.distributed.run --nproc_per_node 2 --standalone
tests/backends/test_tensor_parallel.py OUT`), this file runs the tiny model at TP 2 and rank 0 writes
what both ranks computed to OUT; the test launches it and compares with the same computation here in
one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends.tensor_parallel import (PARTIAL, REPLICATED, SHARD_0, SHARD_1, make_tp_apply, shard_params_for_tp,
                                      tp_layout, tp_local_config)
from pure import rng
from pure.losses import sft
from pure.lora import LINEAR_MODULES, LoraConfig, init_lora
from pure.models import forward, init
from pure.optim import adamw, chain, clip_by_global_norm, sgd
from pure.train import init_train_state, make_accumulator, make_apply
from pure.tree import leaves_with_paths
from tests.backends.agreement import assert_runs_agree, step_metrics, train_one_process
from tests.tiny import TINY

REPO = Path(__file__).resolve().parents[2]
TP = 2
STEPS, MICRO_BATCHES, ROWS, LENGTH = 3, 2, 3, 12
# Qwen3 with every bias: q/k/v biases (sharded), o/down biases (replicated, added once after g),
# gate/up biases (sharded) and the per-head q_norm/k_norm (replicated, partial gradients).
BIASED = TINY.replace(model_type="qwen3", attention_bias=True, mlp_bias=True)


# ---- the plan (one process) -------------------------------------------------------------------


def test_tiny_heads_and_mlp_divide_by_two():
    local = tp_local_config(TINY, TP)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size) == (2, 1, 24)
    assert local.head_size == TINY.head_size == 8


def test_a_model_that_does_not_divide_is_refused_naming_tensor_parallel_size():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not divide .* num_key_value_heads \(2\)"):
        tp_local_config(TINY, 4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=5 .*num_attention_heads \(4\)"):
        shard_params_for_tp(init(TINY, rng.key(0)), None, TINY, 0, 5)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 .*intermediate_size \(47\)"):
        tp_local_config(TINY.replace(intermediate_size=47), 2)


def test_dora_is_refused():
    params = init(TINY, rng.key(0))
    dora = init_lora(params, LoraConfig(r=2, use_dora=True), rng.key(1), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="DoRA .* not supported with tensor_parallel_size > 1"):
        shard_params_for_tp(params, dora, TINY, 0, TP)
    with pytest.raises(ValueError, match="DoRA .* not supported with tensor_parallel_size > 1"):
        make_tp_apply(TINY, params, mesh=None, lora_config=LoraConfig(r=2, use_dora=True))


def test_lora_on_lm_head_is_refused_by_module():
    with pytest.raises(ValueError, match="LoRA on 'lm_head' is not supported"):
        tp_layout({"lora": {"lm_head": {"A": torch.zeros(2, 32), "B": torch.zeros(61, 2)}}})


def test_column_parallel_shards_outputs_row_parallel_shards_inputs_and_lora_follows_its_base():
    params = _biased_params()
    lora = _lora(params)
    layout = tp_layout({"params": params, "lora": lora})
    p, l = layout["params"], layout["lora"]
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert {p[attn + m + ".weight"] for m in ("q_proj", "k_proj", "v_proj")} == {SHARD_0}
    assert p[attn + "q_proj.bias"] == p[mlp + "up_proj.bias"] == SHARD_0
    assert p[attn + "o_proj.weight"] == p[mlp + "down_proj.weight"] == SHARD_1
    assert p[attn + "o_proj.bias"] == p[mlp + "down_proj.bias"] == REPLICATED
    assert p[attn + "q_norm.weight"] == p[attn + "k_norm.weight"] == PARTIAL
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert p[name] == REPLICATED
    assert l[attn + "q_proj"] == l[mlp + "gate_proj"] == {"A": PARTIAL, "B": SHARD_0}
    assert l[attn + "o_proj"] == l[mlp + "down_proj"] == {"A": SHARD_1, "B": PARTIAL}


def test_the_shards_of_every_rank_put_back_together_are_the_full_params():
    params = _biased_params()
    lora = _lora(params)
    shards = [shard_params_for_tp(params, lora, BIASED, r, TP) for r in range(TP)]
    q = "model.layers.1.self_attn.q_proj"
    assert shards[0][0][q + ".weight"].shape == (16, 32) and shards[1][1][q]["B"].shape == (16, 4)
    assert shards[0][0]["model.layers.1.mlp.down_proj.weight"].shape == (32, 24)
    layout = tp_layout({"params": params, "lora": lora})
    flat = dict(leaves_with_paths({"params": params, "lora": lora}))
    pieces = [dict(leaves_with_paths({"params": p, "lora": l})) for p, l in shards]
    for path, how in leaves_with_paths(layout):
        if how in (SHARD_0, SHARD_1):
            joined = torch.cat([piece[path] for piece in pieces], dim=0 if how == SHARD_0 else 1)
        else:
            assert all(piece[path] is flat[path] for piece in pieces), path
            joined = pieces[0][path]
        assert torch.equal(joined, flat[path]), path


# ---- shared set-up of the one-process and the TP runs -------------------------------------------


def _biased_params() -> dict:
    """BIASED's params with random biases and norms (init's are zeros and ones: "added once" and the
    norms' gradients would not show)."""
    params = init(BIASED, rng.key(0))
    for i, name in enumerate(sorted(params)):
        if name.endswith(".bias") or name.endswith("norm.weight"):
            params[name] = params[name] + 0.1 * rng.normal(rng.key(100 + i), params[name].shape)
    return params


def _lora(params: dict, r: int = 4) -> dict:
    """A LoRA on all seven linear layers with B random (a fresh B = 0 gives A no gradient)."""
    delta = init_lora(params, LoraConfig(r=r, alpha=8), rng.key(1), target_modules=list(LINEAR_MODULES))
    return {m: {"A": e["A"], "B": 0.05 * rng.normal(rng.fold_in(rng.key(2), i), e["B"].shape)}
            for i, (m, e) in enumerate(delta.items())}


def _packed_batches(config) -> list[list[dict]]:
    """STEPS steps of MICRO_BATCHES packed micro-batches: each row 2-3 documents (segment ids 1..n,
    positions restarting at 0) and a padded tail (segment 0, no labels), a random prompt prefix masked."""
    steps = []
    for s in range(STEPS):
        micro = []
        for m in range(MICRO_BATCHES):
            k = rng.fold_in(rng.key(7), s * MICRO_BATCHES + m)
            ids = rng.randint(k, 0, config.vocab_size, (ROWS, LENGTH))
            segments = torch.zeros(ROWS, LENGTH, dtype=torch.long)
            positions = torch.zeros(ROWS, LENGTH, dtype=torch.long)
            lengths = [[5, 4], [3, 3, 4], [7, 5]][(s + m) % 3:] + [[5, 4], [3, 3, 4], [7, 5]][:(s + m) % 3]
            for row, docs in enumerate(lengths):
                start = 0
                for doc, n in enumerate(docs, start=1):
                    segments[row, start:start + n] = doc
                    positions[row, start:start + n] = torch.arange(n)
                    start += n
            labels = torch.where((segments > 0) & (positions > 0), ids, torch.full_like(ids, -100))
            micro.append({"input_ids": ids, "labels": labels, "segment_ids": segments, "positions": positions})
        steps.append(micro)
    return steps


VARIANTS = ("full", "lora", "lora-dropout-remat")


def _setup(variant: str):
    """(trainable, frozen, optimizer, lora_config, apply kwargs): a full fine-tune of TINY (SGD with
    momentum after a global-norm clip that is active: the norm is above 0.5), or a LoRA on all seven
    linears (AdamW, with the same clip at 0.05); "lora-dropout-remat" adds LoRA dropout (TP draws
    one process's masks: the row-parallel modules take their slice of it), activation checkpointing
    (the collectives rerun in the recomputation) and the document attention kernel."""
    params = init(TINY, rng.key(0))
    if variant == "full":
        return {"params": params}, {}, chain(clip_by_global_norm(0.5), sgd(0.5, momentum=0.9)), None, {}
    lora_config, kwargs = LoraConfig(r=4, alpha=8), {}
    if variant == "lora-dropout-remat":
        from kernels.attention import document_attention

        lora_config = LoraConfig(r=4, alpha=8, dropout=0.1)
        kwargs = {"checkpoint_layers": True, "attention_fn": document_attention}
    return ({"lora": _lora(params)}, params, chain(clip_by_global_norm(0.05), adamw(1e-2, weight_decay=0.01)),
            lora_config, kwargs)


def _train_one_process(variant: str) -> dict:
    trainable, frozen, optimizer, lora_config, kwargs = _setup(variant)
    return train_one_process(TINY, trainable, frozen, optimizer, lora_config, _packed_batches(TINY), rng.key(3),
                             **kwargs)


def _grads_one_process(variant: str) -> dict:
    """`{path: gradient}` of the first packed step's sft loss on BIASED (full: params; lora: the delta)."""
    params = _biased_params()
    lora_config = LoraConfig(r=4, alpha=8)
    trainable, frozen = ({"params": params}, {}) if variant == "full" else ({"lora": _lora(params)}, params)
    bind = make_apply(BIASED, frozen, lora_config=lora_config)
    micro_batches = _packed_batches(BIASED)[0]
    counts = sft.totals(bind(trainable), micro_batches)
    grads, _, _ = make_accumulator(sft)(trainable, micro_batches, counts, [None] * len(micro_batches), bind)
    return dict(leaves_with_paths(grads))


def _forward_one_process(attention: str) -> dict:
    from kernels.attention import document_attention

    params = _biased_params()
    lora = _lora(params)
    batch = _packed_batches(BIASED)[0][0]
    kwargs = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
    if attention == "kernels":  # drops the padding (its logits are lm_head(0) = 0), so compare like with like
        kwargs["attention_fn"] = document_attention
    return {"base": forward(params, batch["input_ids"], BIASED, **kwargs).logits,
            "lora": forward(params, batch["input_ids"], BIASED, lora=lora, lora_config=LoraConfig(r=4, alpha=8),
                            **kwargs).logits}


# ---- the TP side (inside torchrun) ------------------------------------------------------------


def _all_ranks(x: torch.Tensor, mesh) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(mesh.size())]
    dist.all_gather(parts, x.contiguous(), group=mesh.get_group())
    return parts


def _tp_forward(mesh) -> dict:
    from backends.tensor_parallel import make_tp_apply
    from kernels.attention import document_attention
    from kernels.lora_linear import lora_linear_function

    rank = mesh.get_local_rank()
    full = _biased_params()
    params, lora = shard_params_for_tp(full, _lora(full), BIASED, rank, TP)
    batch = _packed_batches(BIASED)[0][0]
    kwargs = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
    out = {}
    for name, extra in (("sdpa", {}), ("kernels", {"attention_fn": document_attention,
                                                   "lora_linear_fn": lora_linear_function})):
        base = make_tp_apply(BIASED, params, mesh, **extra)({})
        adapted = make_tp_apply(BIASED, params, mesh, lora_config=LoraConfig(r=4, alpha=8), **extra)({"lora": lora})
        with torch.no_grad():
            out[name] = {"base": base(batch["input_ids"], **kwargs).logits,
                         "lora": adapted(batch["input_ids"], **kwargs).logits}
    return out


def _tp_grads(variant: str, mesh) -> dict:
    """The raw local gradients of every rank (before any reduction) and the reduced, gathered ones."""
    from backends.tensor_parallel import gather_tp, make_tp_apply, reduce_tp_grads

    rank = mesh.get_local_rank()
    full = _biased_params()
    params, lora = shard_params_for_tp(full, _lora(full), BIASED, rank, TP)
    trainable, frozen = ({"params": params}, {}) if variant == "full" else ({"lora": lora}, params)
    bind = make_tp_apply(BIASED, frozen, mesh, lora_config=LoraConfig(r=4, alpha=8))
    micro_batches = _packed_batches(BIASED)[0]
    counts = sft.totals(bind(trainable), micro_batches)
    grads, _, _ = make_accumulator(sft)(trainable, micro_batches, counts, [None] * len(micro_batches), bind)
    layout = tp_layout(trainable)
    raw = {path: _all_ranks(g, mesh) for path, g in leaves_with_paths(grads)}
    reduced = _to_local(reduce_tp_grads(grads, layout, mesh))
    gathered = gather_tp(reduced.get("params", {}), reduced.get("lora"), mesh)
    return {"layout": dict(leaves_with_paths(layout)), "raw": raw,
            "reduced": dict(leaves_with_paths({"params": gathered[0]} if variant == "full" else {"lora": gathered[1]}))}


def _to_local(tree):
    from pure.tree import tree_map

    return tree_map(lambda x: x.to_local(), tree)


def _train_tp(variant: str, mesh) -> dict:
    from backends.tensor_parallel import gather_tp, init_tp_train_state, make_tp_apply, make_tp_train_step

    rank = mesh.get_local_rank()
    trainable, frozen, optimizer, lora_config, kwargs = _setup(variant)
    if variant == "full":
        local = {"params": shard_params_for_tp(trainable["params"], None, TINY, rank, TP)[0]}
        frozen_local = {}
    else:
        frozen_local, lora = shard_params_for_tp(frozen, trainable["lora"], TINY, rank, TP)
        local = {"lora": lora}
    step = make_tp_train_step(sft, optimizer, make_tp_apply(TINY, frozen_local, mesh, lora_config=lora_config,
                                                            **kwargs), mesh)
    state = init_tp_train_state(local, optimizer, rng.key(3), mesh)
    history = []
    for micro_batches in _packed_batches(TINY):
        state, metrics = step(state, micro_batches)
        history.append(step_metrics(metrics))
    params, lora = gather_tp(_to_local(state.trainable.get("params", {})), _to_local(state.trainable.get("lora")), mesh)
    gathered = {"params": params} if variant == "full" else {"lora": lora}
    return {"metrics": history, "params": dict(leaves_with_paths(gathered))}


def _placed(variant: str, mesh) -> dict:
    """`place_tp_state` of a whole state after one one-process step (moments not zero): each leaf's
    placement and local shard, and the shards `shard_params_for_tp` cuts."""
    from backends.tensor_parallel import place_tp_state
    from pure.train import make_train_step

    trainable, frozen, optimizer, lora_config, kwargs = _setup(variant)
    step = make_train_step(sft, optimizer, make_apply(TINY, frozen, lora_config=lora_config))
    state, _ = step(init_train_state(trainable, optimizer, rng.key(3)), _packed_batches(TINY)[0])
    placed = place_tp_state(state, mesh)
    rank = mesh.get_local_rank()
    params, lora = shard_params_for_tp(state.trainable.get("params", {}), state.trainable.get("lora"), TINY, rank, TP)
    tree = {"trainable": placed.trainable, "opt_state": placed.opt_state}
    return {"placements": {path: str(x.placements[0]) for path, x in leaves_with_paths(tree)},
            "local": {path: x.to_local() for path, x in leaves_with_paths(tree)},
            "want": dict(leaves_with_paths({"trainable": {"params": params} if variant == "full" else {"lora": lora}}))}


def _torchrun_main(out: str) -> None:
    import torch.distributed as dist

    from backends.distributed import make_mesh, mesh_sizes
    from backends.tensor_parallel import tp_mesh

    world = int(os.environ["WORLD_SIZE"])
    mesh = tp_mesh(make_mesh(mesh_sizes(world, tp=world), "cpu"))
    results = {"forward": _tp_forward(mesh),
               "grads": {variant: _tp_grads(variant, mesh) for variant in ("full", "lora")},
               "train": {variant: _train_tp(variant, mesh) for variant in VARIANTS},
               "placed": [None] * world}  # each rank's `_placed`
    dist.all_gather_object(results["placed"], {variant: _placed(variant, mesh) for variant in ("full", "lora")})
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("tensor_parallel") / "results.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(TP), "--standalone",
                           __file__, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out)


# ---- TP 2 equals 1 ----------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "kernels"])
def test_the_tp2_forward_equals_one_process_logits(tp_results, attention):
    reference = _forward_one_process(attention)
    for name in ("base", "lora"):
        torch.testing.assert_close(tp_results["forward"][attention][name], reference[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_replicated_grads_are_whole_on_every_rank_and_partial_ones_are_reduced(tp_results, variant):
    got, want = tp_results["grads"][variant], _grads_one_process(variant)
    kinds = set()
    for path, how in got["layout"].items():
        kinds.add(how)
        ranks = got["raw"][path]
        if how == REPLICATED:  # f all-reduced dx before it reached them: the whole gradient already
            torch.testing.assert_close(ranks[0], ranks[1], atol=1e-6, rtol=1e-6, msg=path)
            torch.testing.assert_close(ranks[0], want[path], atol=1e-5, rtol=1e-5, msg=path)
        elif how == PARTIAL:  # each rank saw its heads or columns only: the sum is the gradient
            assert (ranks[0] - want[path]).norm() > 0.05 * want[path].norm(), path
            torch.testing.assert_close(ranks[0] + ranks[1], want[path], atol=1e-5, rtol=1e-5, msg=path)
        torch.testing.assert_close(got["reduced"][path], want[path], atol=1e-5, rtol=1e-5, msg=path)
    assert PARTIAL in kinds and SHARD_0 in kinds and SHARD_1 in kinds
    assert (REPLICATED in kinds) == (variant == "full")


@pytest.mark.parametrize("variant", VARIANTS)
def test_tp2_training_equals_one_process(tp_results, variant):
    got, want = tp_results["train"][variant], _train_one_process(variant)
    max_norm = 0.5 if variant == "full" else 0.05
    assert all(norm > max_norm for _, norm, _ in want["metrics"])  # the clip is active every step
    # a TP rank sums half of each matmul's inner dimension and the all-reduce adds the halves
    assert_runs_agree(got, want)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_a_whole_state_is_placed_for_tp_as_the_shards_and_their_moments(tp_results, variant):
    for rank, placed in enumerate(tp_results["placed"]):
        got = placed[variant]
        for path, want in got["want"].items():  # the trainable shards are shard_params_for_tp's
            assert torch.equal(got["local"][path], want), path
        for path, placement in got["placements"].items():
            if not path.startswith("opt_state.") or got["local"][path].dim() == 0:
                continue
            param = next(p for p in got["want"] if path.endswith(p[len("trainable"):]))  # its param
            assert placement == got["placements"][param], path  # a moment lies as its param
            assert got["local"][path].shape == got["local"][param].shape, path
    placements = set(tp_results["placed"][0][variant]["placements"].values())
    assert {"S(0)", "S(1)", "R"} <= placements


if __name__ == "__main__":
    _torchrun_main(sys.argv[1])
