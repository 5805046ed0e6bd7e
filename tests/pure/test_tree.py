from collections import OrderedDict, defaultdict, namedtuple

import pytest
import torch

from pure import tree


def flat_params():
    return {
        "model.embed_tokens.weight": torch.randn(8, 4),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(4),
        "model.layers.0.mlp.down_proj.weight": torch.randn(4, 6, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(4),
    }


def nested_lora():
    return {
        "model.layers.0.self_attn.q_proj": {"A": torch.randn(2, 4), "B": torch.zeros(4, 2)},
        "model.layers.0.self_attn.v_proj": {"A": torch.randn(2, 4), "B": torch.zeros(4, 2)},
    }


def test_leaves_with_paths_of_a_flat_dict_are_its_keys_in_order():
    params = flat_params()
    assert [p for p, _ in tree.leaves_with_paths(params)] == list(params)


def test_leaves_with_paths_join_nested_keys_with_dots():
    paths = [p for p, _ in tree.leaves_with_paths(nested_lora())]
    assert paths == [
        "model.layers.0.self_attn.q_proj.A",
        "model.layers.0.self_attn.q_proj.B",
        "model.layers.0.self_attn.v_proj.A",
        "model.layers.0.self_attn.v_proj.B",
    ]


def test_leaves_with_paths_number_list_and_tuple_entries_and_skip_none():
    t = {"opt": ({"mu": torch.ones(1)}, [torch.zeros(2), None]), "empty": None}
    assert [p for p, _ in tree.leaves_with_paths(t)] == ["opt.0.mu", "opt.1.0"]


def test_tree_map_over_several_trees_keeps_structure():
    a, b = nested_lora(), nested_lora()
    out = tree.tree_map(lambda x, y: x + 2 * y, a, b)
    assert list(out) == list(a)
    assert torch.equal(out["model.layers.0.self_attn.q_proj"]["A"],
                       a["model.layers.0.self_attn.q_proj"]["A"] + 2 * b["model.layers.0.self_attn.q_proj"]["A"])


def test_tree_map_keeps_container_types_and_dict_order():
    Pair = namedtuple("Pair", "first second")
    t = {"z": Pair(1, [2, (3,)]), "a": OrderedDict(b=4), "d": defaultdict(list, c=5), "n": None}
    out = tree.tree_map(lambda x: x * 10, t)
    assert list(out) == ["z", "a", "d", "n"]  # insertion order, not sorted
    assert out["z"] == Pair(10, [20, (30,)]) and type(out["z"]) is Pair
    assert type(out["a"]) is OrderedDict and out["a"] == {"b": 40}
    assert type(out["d"]) is defaultdict and out["d"].default_factory is list and out["d"]["c"] == 50
    assert out["n"] is None


def test_tree_map_matches_dicts_by_key_and_passes_subtrees_under_a_prefix_leaf():
    out = tree.tree_map(lambda x, y: (x, y), {"a": 1, "b": 2}, {"b": {"deep": 3}, "a": 4})
    assert out == {"a": (1, 4), "b": (2, {"deep": 3})}


@pytest.mark.parametrize("other, message", [
    ({"a": 1, "c": 2}, "keys"),
    ({"a": 1, "b": [1]}, "length 2 vs length 1"),
    ({"a": 1, "b": 3}, "vs int"),
])
def test_tree_map_names_where_the_trees_differ(other, message):
    with pytest.raises(ValueError, match=message) as err:
        tree.tree_map(lambda x, y: x, {"a": 1, "b": [1, 2]}, other)
    assert "'b'" in str(err.value) or "<root>" in str(err.value)


def test_replace_leaves_inverts_tree_leaves_with_and_without_none_leaves():
    Pair = namedtuple("Pair", "first second")
    t = {"x": Pair(1, None), "y": [2, (3, None)], "z": None}
    assert tree.tree_leaves(t) == [1, 2, 3]
    assert tree.replace_leaves(t, [10, 20, 30]) == {"x": Pair(10, None), "y": [20, (30, None)], "z": None}
    assert tree.tree_leaves(t, none_is_leaf=True) == [1, None, 2, 3, None, None]
    assert [p for p, _ in tree.leaves_with_paths(t, none_is_leaf=True)] == ["x.0", "x.1", "y.0", "y.1.0", "y.1.1", "z"]
    back = tree.replace_leaves(t, [1, "a", 2, 3, "b", "c"], none_is_leaf=True)
    assert back == {"x": Pair(1, "a"), "y": [2, (3, "b")], "z": "c"}
    with pytest.raises(ValueError, match="fewer leaves"):
        tree.replace_leaves(t, [1, 2])
    with pytest.raises(ValueError, match="more leaves"):
        tree.replace_leaves(t, [1, 2, 3, 4])


def test_cast_changes_only_floating_leaves():
    t = {"w": torch.randn(3), "ids": torch.arange(3), "mask": torch.ones(2, dtype=torch.bool)}
    out = tree.cast(t, torch.bfloat16)
    assert out["w"].dtype == torch.bfloat16
    assert out["ids"].dtype == torch.int64 and out["mask"].dtype == torch.bool


def test_global_norm_is_the_norm_of_all_leaves_concatenated():
    params = flat_params()
    flat = torch.cat([x.float().flatten() for x in params.values()])
    norm = tree.global_norm(params)
    assert norm.dtype == torch.float32 and norm.shape == ()
    torch.testing.assert_close(norm, flat.norm())


def test_global_norm_accumulates_low_precision_leaves_in_fp32():
    # 4096 squares of 64 overflow fp16 (max 65504) unless accumulated in fp32.
    t = {"a": torch.full((4096,), 64.0, dtype=torch.float16)}
    assert tree.global_norm(t).item() == pytest.approx(64.0 * 64)


def test_global_norm_of_an_empty_tree_is_zero():
    assert tree.global_norm({}).item() == 0.0
