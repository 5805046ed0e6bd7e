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
        "model.layers.0.self_attn.q_proj.weight": {"A": torch.randn(2, 4), "B": torch.zeros(4, 2)},
        "model.layers.0.self_attn.v_proj.weight": {"A": torch.randn(2, 4), "B": torch.zeros(4, 2)},
    }


def assert_trees_equal(a, b):
    pa, pb = tree.leaves_with_paths(a), tree.leaves_with_paths(b)
    assert sorted(p for p, _ in pa) == sorted(p for p, _ in pb)
    lookup = dict(pb)
    for path, leaf in pa:
        assert torch.equal(leaf, lookup[path]), path


def test_leaves_with_paths_of_a_flat_dict_are_its_keys_in_order():
    params = flat_params()
    assert [p for p, _ in tree.leaves_with_paths(params)] == list(params)


def test_leaves_with_paths_join_nested_keys_with_dots():
    paths = [p for p, _ in tree.leaves_with_paths(nested_lora())]
    assert paths == [
        "model.layers.0.self_attn.q_proj.weight.A",
        "model.layers.0.self_attn.q_proj.weight.B",
        "model.layers.0.self_attn.v_proj.weight.A",
        "model.layers.0.self_attn.v_proj.weight.B",
    ]


def test_leaves_with_paths_number_list_and_tuple_entries_and_skip_none():
    t = {"opt": ({"mu": torch.ones(1)}, [torch.zeros(2), None]), "empty": None}
    assert [p for p, _ in tree.leaves_with_paths(t)] == ["opt.0.mu", "opt.1.0"]


def test_tree_map_over_several_trees_keeps_structure():
    a, b = nested_lora(), nested_lora()
    out = tree.tree_map(lambda x, y: x + 2 * y, a, b)
    assert list(out) == list(a)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"]["A"],
                       a["model.layers.0.self_attn.q_proj.weight"]["A"] + 2 * b["model.layers.0.self_attn.q_proj.weight"]["A"])


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


@pytest.mark.parametrize("select", [
    r"q_proj",
    [r"q_proj\.weight$", r"q_proj\.bias$"],
    lambda path, leaf: "q_proj" in path,
])
def test_partition_splits_a_flat_dict_and_combine_restores_it(select):
    params = flat_params()
    selected, rest = tree.partition(params, select)
    assert set(selected) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"}
    assert set(rest) == set(params) - set(selected)
    assert None not in selected.values() and None not in rest.values()
    assert_trees_equal(tree.combine(selected, rest), params)
    assert all(selected[k] is params[k] for k in selected)  # no copies


def test_partition_of_nested_dicts_drops_emptied_subtrees():
    lora = nested_lora()
    a_only, b_only = tree.partition(lora, r"\.A$")
    assert set(a_only) == set(lora) and all(set(v) == {"A"} for v in a_only.values())
    assert all(set(v) == {"B"} for v in b_only.values())
    q, rest = tree.partition(lora, "q_proj")
    assert list(q) == ["model.layers.0.self_attn.q_proj.weight"]
    assert list(rest) == ["model.layers.0.self_attn.v_proj.weight"]
    assert_trees_equal(tree.combine(q, rest), lora)


def test_partition_with_nothing_selected_gives_an_empty_dict():
    selected, rest = tree.partition(flat_params(), "no-such-param")
    assert selected == {} and len(rest) == len(flat_params())


def test_partition_predicate_receives_the_leaf():
    selected, _ = tree.partition(flat_params(), lambda path, leaf: leaf.dtype == torch.bfloat16)
    assert list(selected) == ["model.layers.0.mlp.down_proj.weight"]


def test_partition_refuses_to_split_a_tuple():
    with pytest.raises(TypeError, match="only dicts"):
        tree.partition({"s": (torch.ones(1), torch.zeros(1))}, r"s\.0")


def test_combine_rejects_a_path_present_in_both():
    with pytest.raises(ValueError, match="model.norm.weight"):
        tree.combine({"model.norm.weight": torch.ones(1)}, {"model.norm.weight": torch.ones(1)})


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


def test_zeros_like_and_num_params():
    params = flat_params()
    zeros = tree.zeros_like(params)
    assert all(torch.equal(z, torch.zeros_like(p)) and z.dtype == p.dtype
               for z, p in zip(zeros.values(), params.values()))
    assert tree.num_params(params) == 32 + 16 + 4 + 24 + 4
    assert tree.num_params(nested_lora()) == 32


def test_shape_summary_lists_every_leaf_and_the_total():
    text = tree.shape_summary(flat_params())
    lines = text.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "count"]
    assert any("model.layers.0.mlp.down_proj.weight" in ln and "(4, 6)" in ln and "bfloat16" in ln
               and ln.rstrip().endswith("24") for ln in lines)
    total_line = next(ln for ln in lines if ln.startswith("total"))
    assert total_line.split()[-1] == "80" and "5 leaves" in total_line


def test_shape_summary_formats_large_counts():
    text = tree.shape_summary({"w": torch.empty(1000, 1500)})
    assert "1,500,000" in text and "1.5M" in text
