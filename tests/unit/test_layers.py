"""The package's layout is its architecture: layers, one-way imports, no I/O below.

relay/DESIGN.md's module table, the tree under relay/, and the imports all
tell the same story; these tests fail when one of them drifts.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

#: The source tree (the installed copy has no DESIGN.md, and the layout is the tree's).
ROOT = pathlib.Path(__file__).resolve().parents[2] / "relay"

#: Rank of each layer: a module imports only from its own rank or lower ones.
LAYERS = {"http": 0, "core": 1, "ops": 2, "tools": 3}
#: Top-level modules: the configuration and argument helpers sit at the bottom
#: (everything reads a Config); the command line sits on top.
TOP = {"__init__": 0, "config": 0, "cliparse": 0, "cli": 4, "__main__": 4}
IO_MODULES = {"asyncio", "socket", "ssl", "uvloop", "selectors"}


def module_names() -> list[str]:
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts))
    return names


def rank(name: str) -> int:
    head = name.split(".")[0]
    return LAYERS[head] if head in LAYERS else TOP[name]


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(relay modules, third-party or stdlib top-level names) that ``name`` imports."""
    path = ROOT.joinpath(*name.split(".")).with_suffix(".py")
    package = name.split(".")[:-1]
    ours: set[str] = set()
    theirs: set[str] = set()
    known = set(module_names())
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("relay"):
                    ours.add(alias.name.removeprefix("relay.").removeprefix("relay"))
                else:
                    theirs.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
                if module == "relay" or module.startswith("relay."):
                    base = module.removeprefix("relay").removeprefix(".")
                else:
                    theirs.add(module.split(".")[0])
                    continue
            else:
                up = package[: len(package) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                if candidate in known:
                    ours.add(candidate)
                elif base in known:
                    ours.add(base)
                elif f"{base}.__init__" in known:
                    ours.add(f"{base}.__init__")
                elif not base:
                    ours.add("__init__")
    return ours, theirs


@pytest.mark.parametrize("name", module_names())
def test_imports_flow_down_the_layers(name):
    """A module imports only modules of its own layer or a lower one."""
    ours, _ = imports_of(name)
    upward = sorted(m for m in ours if rank(m) > rank(name))
    assert not upward, f"{name} (layer {rank(name)}) imports upward: {upward}"


def test_no_import_circles():
    """The module import graph (type-checking imports included) has no cycle."""
    graph = {name: imports_of(name)[0] - {name} for name in module_names()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", [n for n in module_names() if rank(n) == 0])
def test_sans_io_layer_imports_no_io(name):
    """The bottom layer (sans-IO HTTP, config) touches no socket, directly or indirectly."""
    todo, seen = [name], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        ours, theirs = imports_of(current)
        assert not IO_MODULES & theirs, (current, sorted(IO_MODULES & theirs))
        todo.extend(ours)


def test_design_doc_names_every_module_in_its_place():
    """relay/DESIGN.md's module table lists exactly the modules in the tree."""
    text = (ROOT / "DESIGN.md").read_text()
    listed = set(re.findall(r"^\| `relay/([a-z_/]+)\.py` \|", text, flags=re.M))
    present = {n.replace(".", "/") for n in module_names() if not n.endswith("__init__")}
    present.discard("__main__")
    listed.discard("__main__")
    assert listed == present, (sorted(present - listed), sorted(listed - present))
