"""Imports inside ``ptfast`` flow one way: no module reaches itself again through ptfast imports.

Every ``import`` / ``from ... import`` of a ptfast module counts, wherever it stands: at module level, inside a
function (a lazy import only postpones a cycle), under ``if TYPE_CHECKING:``. ``from pkg import name`` counts as an
import of ``pkg.name`` when that is a module, else of ``pkg``. Importing a submodule also runs its packages'
``__init__``; that implicit step is not an edge (a package's ``__init__`` may import its own submodules).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

Edges = dict[str, dict[str, int]]  # module -> {imported module: line of the first such import}


def modules(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``package_dir`` (a package's ``__init__`` is the package)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.func`` -> ``a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The known modules ``module`` imports anywhere in its file, with the line of the first import of each."""
    found: dict[str, int] = {}
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [_owner(alias.name, known) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.append(full if full in known else _owner(base, known))
        for target in targets:
            if target is not None and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph(package_dir: Path) -> Edges:
    known = modules(package_dir)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: Edges) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each group of modules that import each other, shortest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:
        start = min(group)
        # Breadth-first inside the group: the shortest way from start back to start.
        paths = {start: [start]}
        queue = [start]
        cycle = None
        while queue and cycle is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    cycle = [*paths[v], start]
                    break
                if w in group and w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
        found.append(cycle)
    return sorted(found, key=len)


def describe(cycle: list[str], graph: Edges) -> str:
    steps = [f"{a} -> {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " ; ".join(steps)


def test_ptfast_has_no_import_cycles() -> None:
    graph = import_graph(ROOT / "ptfast")
    assert len(graph) > 50, sorted(graph)  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles in ptfast (move the shared piece to the lower module):\n" + "\n".join(
        describe(c, graph) for c in found
    )


def test_the_checker_finds_lazy_relative_and_type_checking_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg import a\n",
        "a.py": "def f():\n    from pkg.b import g\n    return g\n",  # lazy import
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\ndef g(): pass\n",
        "c.py": "from .sub import d\n",  # relative, names a submodule
        "sub/__init__.py": "",
        "sub/d.py": "from .. import c\n",  # relative, two levels up
        "e.py": "import pkg.sub.d\n",  # no cycle: e is imported by nobody
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg.c"] == {"pkg.sub.d": 1} and graph["pkg.sub.d"] == {"pkg.c": 1}
    found = cycles(graph)
    assert found == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.sub.d", "pkg.c"]], found
    assert describe(found[0], graph) == "pkg.a -> pkg.b (line 2) ; pkg.b -> pkg.a (line 3)"
