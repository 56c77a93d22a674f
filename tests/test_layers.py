"""sscell's modules import only downwards and never in a cycle.

Layers, lowest first: errors / config / atomic / allocator / bundle -> data -> models -> losses ->
training -> evaluation -> api / main -> the embed / predict commands (front ends of the API).
Every import counts, also one inside a function. Read with `ast` from the source files, so the
test imports nothing it checks.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sscell"
LAYERS = {  # module prefix -> rank (the longest matching prefix wins)
    "sscell.errors": 0, "sscell.config": 0, "sscell.atomic": 0, "sscell.allocator": 0, "sscell.bundle": 0,
    "sscell.data": 1,
    "sscell.models": 2,
    "sscell.losses": 3,
    "sscell.training": 4,
    "sscell.evaluation": 5,
    "sscell.api": 6, "sscell.main": 6, "sscell.reproduce": 6, "sscell": 6,
    "sscell.embed": 7, "sscell.predict": 7, "sscell.from_study": 7,  # commands that are front ends of the Python API (sscell.api)
}
# Losses are pure functions of arrays: of sscell.data they may use only the on-device array code
# (densify, log1p normalisation, the batch's field names), never a reader of stores or files.
LOSSES_MAY_IMPORT_FROM_DATA = {"sscell.data.preprocess"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(path: Path) -> set[str]:
    """The sscell modules `path` imports (`from pkg import mod` names the module mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sscell")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "sscell":
            found.update(f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module
                         for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write `from sscell... import ...`")
    return found


GRAPH = {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def rank(module: str) -> int:
    return LAYERS[max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)]


def test_the_graph_is_read():  # the checks below see real imports
    assert "sscell.data.store" in GRAPH["sscell.data.loader"]
    assert "sscell.losses.registry" in GRAPH["sscell.losses.masking"]
    assert GRAPH["sscell.losses"] >= {"sscell.losses.masking", "sscell.losses.byol"}
    assert rank("sscell.evaluation.metrics") == 5 and rank("sscell.configs") == 6 and rank("sscell.config") == 0


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{module} ({rank(module)}) imports {target} ({rank(target)})"
                    for module, targets in GRAPH.items() for target in targets if rank(target) > rank(module))
    assert not upward, "\n".join(upward)


def test_losses_read_no_data():
    reads = sorted(f"{module} imports {target}" for module, targets in GRAPH.items() if rank(module) == 3
                   for target in targets if rank(target) == 1 and target not in LOSSES_MAY_IMPORT_FROM_DATA)
    assert not reads, "\n".join(reads)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None. A package's own __init__
    importing its modules is not an edge back: importing sscell.x.y runs sscell.x first anyway."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = 2
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node, [node]))), None)


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"c"}}, ["c", "c"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
])
def test_find_cycle_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle
