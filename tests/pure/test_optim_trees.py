"""pure.optim walks trees with pure.tree's helpers: same paths, same order, and the float64
behaviour of the global norm (and so of clipping) kept."""
import math

import pytest
import torch

from pure import optim, tree
from pure.optim import clip_by_global_norm, grad_norm_from_state
from pure.optim.base import _unzip


def float64_grads():
    gen = torch.Generator().manual_seed(0)
    return {"a": {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64)},
            "b": torch.randn(7, generator=gen, dtype=torch.float64) * 1e8}


def test_optim_global_norm_is_pure_tree_global_norm():
    assert optim.global_norm is tree.global_norm


def test_global_norm_of_float64_leaves_is_accumulated_in_float64():
    grads = float64_grads()
    norm = tree.global_norm(grads)
    exact = math.sqrt(sum(float((g ** 2).sum()) for g in tree.tree_leaves(grads)))
    assert norm.dtype == torch.float64
    assert norm.item() == pytest.approx(exact, rel=1e-12)  # float64 summation order only


def test_float64_clipping_matches_torch_clip_grad_norm():
    grads = float64_grads()
    clip = clip_by_global_norm(1.0)
    clipped, state = clip.update(grads, clip.init(grads), grads, 0)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in tree.tree_leaves(grads)]
    for p, g in zip(params, tree.tree_leaves(grads)):
        p.grad = g.clone()
    reference_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert grad_norm_from_state(state).item() == pytest.approx(reference_norm.item(), rel=1e-12)
    for mine, p in zip(tree.tree_leaves(clipped), params):
        torch.testing.assert_close(mine, p.grad, rtol=1e-12, atol=0)  # float64: same formula


def test_unzip_and_replace_leaves_follow_leaves_with_paths_order():
    t = {"z": torch.ones(1), "a": {"y": torch.zeros(2), "b": torch.full((1,), 3.0)}, "skip": None}
    paths, leaves = _unzip(t)
    assert paths == [p for p, _ in tree.leaves_with_paths(t)] == ["z", "a.y", "a.b"]
    assert leaves == tree.tree_leaves(t)
    rebuilt = tree.replace_leaves(t, [torch.full((1,), 9.0), torch.ones(2), torch.zeros(1)])
    assert list(rebuilt) == ["z", "a", "skip"] and rebuilt["skip"] is None
    assert list(rebuilt["a"]) == ["y", "b"] and rebuilt["z"].item() == 9.0


def test_optimizer_state_round_trips_through_flat_dict_for_nested_params():
    params = {"model": {"w": torch.randn(3, 2), "norm": {"weight": torch.ones(3)}}}
    opt = optim.adamw(1e-2, weight_decay=0.1)
    grads = tree.tree_map(torch.ones_like, params)
    _, state = opt.update(grads, opt.init(params), params, 0)
    flat = dict(tree.leaves_with_paths(state))
    assert any(k.endswith(".mu.model.w") for k in flat), sorted(flat)
    like = opt.init(params)
    back = tree.replace_leaves(like, [flat[path] for path, _ in tree.leaves_with_paths(like)])
    for a, b in zip(tree.tree_leaves(back), tree.tree_leaves(state)):
        assert torch.equal(a, b)
