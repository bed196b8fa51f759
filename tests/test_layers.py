"""The package's layers: imports run only downward, and no module imports itself back through a cycle.

The order is written once, here, lowest first; a module may import modules of its own layer or of a lower one.
The import graph is built with ``ast`` from every ``import`` and ``from ... import`` in the package (module level,
inside functions and under ``TYPE_CHECKING`` alike), so a lazy import that runs back up the stack counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import segfromxai

PACKAGE = Path(segfromxai.__file__).parent
NAME = "segfromxai"

LAYERS: list[tuple[str, ...]] = [
    ("version", "params", "fileio", "registry"),  # the base: imports nothing of the package
    ("ops",),
    ("io",),
    ("models",),
    ("explainers",),
    ("stages",),
    ("recipe",),
    ("run",),
    ("quality",),
    ("student",),
    ("cli", "options", "catalog", "__init__", "__main__"),  # the top: the CLI and the package's front door
]


def module_name(path: Path, package: Path = PACKAGE, name: str = NAME) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([name, *parts])


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: Path = PACKAGE, name: str = NAME) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    files = {module_name(p, package, name): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            out |= {t for t in targets if t in files and t != mod}
        graph[mod] = out
    return graph


def layer_of(module: str, name: str = NAME) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    for i, members in enumerate(LAYERS):
        if parts[0] in members:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def upward_imports(graph: dict[str, set[str]], name: str = NAME) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if layer_of(b, name) > layer_of(a, name))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer():
    for mod in import_graph():
        layer_of(mod)


def test_imports_run_only_downward():
    up = upward_imports(import_graph())
    assert not up, "imports that run up a layer:\n" + "\n".join(up)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / NAME
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


@pytest.mark.parametrize("text", ["from ..run.pipeline import label_batch\n",
                                  "def f():\n    from ..run import pipeline\n",
                                  "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from segfromxai.run.pipeline import x\n"])
def test_an_upward_import_is_caught_known_answer(tmp_path, text):
    root = _fake_package(tmp_path, {"__init__.py": "", "ops/__init__.py": "", "ops/masks.py": text,
                                    "run/__init__.py": "", "run/pipeline.py": "from ..ops.masks import clean\n"})
    graph = import_graph(root)
    assert upward_imports(graph) == ["segfromxai.ops.masks -> segfromxai.run.pipeline"]
    assert cycles(graph) == [["segfromxai.ops.masks", "segfromxai.run.pipeline"]]


def test_a_sideways_cycle_is_caught_known_answer(tmp_path):
    root = _fake_package(tmp_path, {"__init__.py": "", "run/__init__.py": "", "run/a.py": "from . import b\n",
                                    "run/b.py": "from .c import x\n", "run/c.py": "from .a import y\n"})
    graph = import_graph(root)
    assert upward_imports(graph) == []
    assert cycles(graph) == [["segfromxai.run.a", "segfromxai.run.b", "segfromxai.run.c"]]


def test_subpackages_say_what_they_hold_and_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init.relative_to(PACKAGE)}: its docstring must say what it may import"


def test_no_module_over_500_lines():
    long = [f"{p.relative_to(PACKAGE)} ({n})" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 500]
    assert not long, "modules over 500 lines: " + ", ".join(long)
