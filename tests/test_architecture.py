"""The package's shape: imports go one way, down the layers (function-local imports included), with no
circles, and the validator side of the process boundary never imports the trainer side."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

from conftest import ROOT

PACKAGES = {"launcher": "launcher", "jobs": "launcher.jobs"}  # folder -> the package it installs as
# Lowest first: a module may import its own layer and the layers below, never one above. A name is a
# package or a top-level module of launcher (launcher.jobs is the repository's jobs/ folder).
LAYERS = [
    ("errors", "files", "jobs"),
    ("config", "rundir"),
    ("distributed", "telemetry", "precision", "optim", "ema", "faults", "data", "summary"),
    ("batch",),
    ("checkpoint",),
    ("validation",),
    ("step",),
    ("train",),
    ("cli", "startup", "report", "plots", "sweep", "__main__"),
]
TRAINER_SIDE = {"launcher.validation.trainer_side"}
VALIDATOR_SIDE = {"launcher.validation.validator", "launcher.validation.supervisor"}


def modules() -> Dict[str, Path]:
    """Dotted module name -> source file, for every module of our packages."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Every module of ours that `name` imports, at the top or inside a function."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .mod import y
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the submodule pkg.mod; `from mod import name` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    assert sum(len(v) for v in graph.values()) > 40, "the graph was not read"  # the test itself works
    assert "launcher.train" in graph["launcher.cli"]  # a function-local import is an edge too
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_function_local_cycle(tmp_path):
    """The checker itself: a circle hidden behind a function-local import is found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    known = {"a", "b"}
    graph = {n: imports(n, tmp_path / f"{n}.py", known) for n in known}
    assert cycles(graph) == [["a", "b"]]


def layer(module: str) -> int:
    """The layer of a module of ours (launcher itself, the package's __init__, sits on top)."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)
    return next(i for i, names in enumerate(LAYERS) if parts[1] in names)


def upward(graph: Dict[str, Set[str]]) -> List[str]:
    """Every import that goes up the layers, as 'a -> b'."""
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                  if b != "launcher" and layer(b) > layer(a))


def test_imports_go_down_the_layers_and_the_validator_never_imports_the_trainer():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    assert all(layer(m) is not None for m in mods)  # every module has its layer: a new package must be placed
    assert upward(graph) == []
    assert "launcher.validation.trainer_side" in graph["launcher.train"]  # the graph was read
    reached, todo = set(), set(VALIDATOR_SIDE)
    while todo:  # everything the validator side imports, directly or not
        m = todo.pop()
        reached.add(m)
        todo |= graph[m] - reached
    assert reached & TRAINER_SIDE == set()


def test_the_layer_check_finds_an_upward_import():
    """The checker itself: checkpoint importing the Trainer would be caught."""
    graph = {"launcher.checkpoint.store": {"launcher.train", "launcher.files"}, "launcher.train": set(),
             "launcher.files": set()}
    assert upward(graph) == ["launcher.checkpoint.store -> launcher.train"]


def test_every_public_class_says_what_it_is(tmp_path):
    """A docstring on every public class of the package and the shipped jobs (the nouns everyone touches:
    EMA, Telemetry, Dist, Env, ...); the checker itself finds a class without one."""
    def undocumented(path: Path) -> List[str]:
        return [f"{path.name}:{node.lineno} {node.name}" for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and ast.get_docstring(node) is None]

    missing = [entry for path in modules().values() for entry in undocumented(path)]
    assert missing == []
    assert len(modules()) > 60  # the package was read
    (tmp_path / "m.py").write_text('class Said:\n    """Yes."""\n\n\nclass Silent:\n    x = 1\n\n\nclass _Private:\n    pass\n')
    assert undocumented(tmp_path / "m.py") == ["m.py:5 Silent"]
