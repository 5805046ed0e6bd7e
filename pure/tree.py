"""Pytree helpers over params, LoRA deltas, gradients and optimizer states.

A tree is any nesting of dicts, lists and tuples with tensors (or Python scalars) as leaves; the
params are usually a flat dict keyed by Hugging Face state-dict names, and LoRA deltas nest one
level more (`{path: {"A": ..., "B": ...}}`). Both shapes work with every function here.

A leaf's *path* is its keys joined with "." (so a flat HF dict's paths are its keys, and
`{"a": {"b": x}}` has the path "a.b"). `None` is an empty subtree, not a leaf, unless a function's
`none_is_leaf` says otherwise. Only dicts (any Mapping), lists and tuples are containers: anything
else is a leaf. Plain Python on purpose: no pytree library is needed, so the GPU suite runs on an
image with nothing but torch.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

Tree = Any


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """`fn` applied leaf by leaf over `tree` and the trees in `rest`, which have `tree`'s structure
    or `tree` as a prefix (a leaf of `tree` meets the whole subtree there). Dicts are matched by
    key, lists and tuples by index; the result has `tree`'s structure and container types."""

    def go(node: Any, others: tuple, path: tuple) -> Any:
        if node is None:
            return None
        children = _children(node)
        if children is None:
            return fn(node, *others)
        for other in others:
            _check_same_node(node, other, path)
        if isinstance(node, Mapping):
            values = [go(v, tuple(o[k] for o in others), (*path, k)) for k, v in children]
        else:
            values = [go(v, tuple(o[i] for o in others), (*path, i)) for i, v in children]
        return _rebuild_node(node, [k for k, _ in children], values)

    return go(tree, rest, ())


def tree_leaves(tree: Tree, none_is_leaf: bool = False) -> list[Any]:
    """The leaves of `tree`, in the order of `leaves_with_paths`."""
    return [leaf for _, leaf in leaves_with_paths(tree, none_is_leaf)]


def leaves_with_paths(tree: Tree, none_is_leaf: bool = False) -> list[tuple[str, Any]]:
    """`[(dotted_path, leaf), ...]` in the order the dicts were built (HF order for params); lists
    and tuples (named ones too) by index. `None` is an empty subtree unless `none_is_leaf`."""
    out: list[tuple[str, Any]] = []

    def walk(node: Any, prefix: tuple) -> None:
        if node is None and not none_is_leaf:
            return
        children = _children(node)
        if children is None:
            out.append((_join(prefix), node))
            return
        for key, child in children:
            walk(child, (*prefix, key))

    walk(tree, ())
    return out


def replace_leaves(like: Tree, leaves: Iterable[Any], none_is_leaf: bool = False) -> Tree:
    """`like`'s structure and containers with its leaves replaced, in `leaves_with_paths` order:
    the inverse of `tree_leaves(like, none_is_leaf)`. Too few or too many leaves is an error."""
    it = iter(leaves)

    def go(node: Any) -> Any:
        if node is None and not none_is_leaf:
            return None
        children = _children(node)
        if children is None:
            leaf = next(it, _EMPTY)
            if leaf is _EMPTY:
                raise ValueError("replace_leaves: fewer leaves than the tree has")
            return leaf
        return _rebuild_node(node, [k for k, _ in children], [go(v) for _, v in children])

    out = go(like)
    if next(it, _EMPTY) is not _EMPTY:
        raise ValueError("replace_leaves: more leaves than the tree has")
    return out


def _children(node: Any) -> list[tuple[Any, Any]] | None:
    """`[(key, child), ...]` of a container (dict by key, list or tuple by index); None for a leaf."""
    if isinstance(node, Mapping):
        return list(node.items())
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    return None


def _rebuild_node(node: Any, keys: list, values: list) -> Any:
    """A container of `node`'s type holding `values` under `keys`."""
    if isinstance(node, Mapping):
        if isinstance(node, defaultdict):
            return defaultdict(node.default_factory, zip(keys, values))
        return (dict if type(node) is dict else type(node))(zip(keys, values))
    if isinstance(node, tuple) and hasattr(type(node), "_fields"):  # a named tuple
        return type(node)(*values)
    return type(node)(values)


def _check_same_node(node: Any, other: Any, path: tuple) -> None:
    where = _join(path) or "<root>"
    if isinstance(node, Mapping):
        if not isinstance(other, Mapping) or set(other.keys()) != set(node.keys()):
            got = sorted(map(str, other.keys())) if isinstance(other, Mapping) else type(other).__name__
            raise ValueError(f"tree_map: the trees differ at {where!r}: keys {sorted(map(str, node.keys()))} "
                             f"vs {got}")
    elif not isinstance(other, (list, tuple)) or len(other) != len(node):
        got = f"length {len(other)}" if isinstance(other, (list, tuple)) else type(other).__name__
        raise ValueError(f"tree_map: the trees differ at {where!r}: a {type(node).__name__} of length "
                         f"{len(node)} vs {got}")


def _join(path: tuple) -> str:
    return ".".join(str(k) for k in path)


class _Empty:  # a sentinel: "no leaf left" in replace_leaves
    __slots__ = ()


_EMPTY = _Empty()


def cast(tree: Tree, dtype: torch.dtype) -> Tree:
    """`tree` with every floating-point tensor cast to `dtype`; integer and bool leaves untouched."""
    return tree_map(
        lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
    )


def global_norm(tree: Tree) -> torch.Tensor:
    """`sqrt(sum_i ||x_i||^2)` over all tensor leaves, as a 0-dim tensor accumulated in fp32, or in
    fp64 when any leaf is fp64 (so float64 gradient clipping matches a float64 reference exactly)."""
    tensors = [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
    device = tensors[0].device
    norms = torch._foreach_norm(tensors, 2.0, dtype=dtype)  # one fused pass over all leaves
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
