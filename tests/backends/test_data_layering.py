"""The data layer's import rules, read from the source: no cycle hidden in a function, no private
names across modules, and nothing under pure/ that reads files or imports user code."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_MODULES = ["data_cache", "data_sources", "data_spec", "datasets", "streaming", "templates", "tokenizer",
                "user_code"]


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node, id(node) in top


@pytest.mark.parametrize("name", DATA_MODULES)
def test_data_modules_import_public_names_at_the_top(name):
    for node, at_top in _imports(REPO / "backends" / f"{name}.py"):
        if node.module.startswith("backends.") or node.module.startswith("pure."):
            assert at_top, f"backends/{name}.py:{node.lineno}: function-local import of {node.module}"
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"backends/{name}.py:{node.lineno}: imports private {private} from {node.module}"


def test_pure_reads_no_file_and_imports_no_user_code():
    found = []
    for path in sorted((REPO / "pure").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                found.append(f"{path.relative_to(REPO)}:{node.lineno} open(")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                    (node.value.id, node.attr) in {("os", "path"), ("sys", "path"), ("os", "getcwd")}):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value.id}.{node.attr}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                found += [f"{path.relative_to(REPO)}:{node.lineno} import {n}" for n in names if n == "importlib"]
    assert not found, found
