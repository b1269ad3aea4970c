"""The package's import graph: no cycles between modules, and lower layers never import higher
ones.

The graph is read from the source with :mod:`ast`, so it sees every ``import`` statement,
those inside functions and methods included (an import deferred into a function to dodge a
cycle is still a cycle of the design). Importing ``a.b.c`` also runs the ``__init__`` of the
packages ``a.b`` on the way, so those count as edges too, except the packages that enclose the
importing module itself (they are already being initialised when it runs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "xai_serve"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` (first at ``line`` of ``source``)."""

    source: str
    target: str
    line: int


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_names(node: ast.AST, package: str, modules: Mapping[str, Path]) -> Iterator[str]:
    """The dotted names an import statement loads (the module a name is taken from, or the
    submodule when the name is one)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            parts = package.split(".")
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join([*parts, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        for alias in node.names:
            full = f"{base}.{alias.name}"
            yield full if full in modules else base


def _nearest_module(name: str, modules: Mapping[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> dict[str, dict[str, Edge]]:
    """``{module: {imported module: Edge}}`` for the package at ``root``, within it only."""
    modules = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    packages = {_module_name(p, root) for p in root.rglob("__init__.py")}
    graph: dict[str, dict[str, Edge]] = {m: {} for m in modules}
    for module, path in modules.items():
        package = module if module in packages else module.rpartition(".")[0]
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for name in _imported_names(node, package, modules):
                target = _nearest_module(name, modules)
                if target is None:
                    continue
                # The packages on the way to the target run their __init__ first.
                chain = target.split(".")
                for i in range(1, len(chain) + 1):
                    step = ".".join(chain[:i])
                    if step != module and step not in own_packages and step in modules:
                        graph[module].setdefault(step, Edge(module, step, node.lineno))
    return graph


def _strongly_connected(graph: Mapping[str, Mapping[str, Edge]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _path(graph: Mapping[str, Mapping[str, Edge]], start: str, goal: str) -> list[Edge] | None:
    """The shortest chain of imports from ``start`` to ``goal`` (breadth first)."""
    previous: dict[str, Edge | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child, edge in sorted(graph[node].items()):
                if child in previous:
                    continue
                previous[child] = edge
                if child == goal:
                    chain = []
                    step: Edge | None = edge
                    while step is not None:
                        chain.append(step)
                        step = previous[step.source]
                    return chain[::-1]
                following.append(child)
        frontier = following
    return None


def describe_cycles(graph: Mapping[str, Mapping[str, Edge]]) -> list[str]:
    """One line per import cycle: a shortest cycle through each strongly connected component,
    with the line of each import."""
    lines = []
    for component in _strongly_connected(graph):
        members = set(component)
        inner = {m: {t: e for t, e in graph[m].items() if t in members} for m in component}
        best: list[Edge] | None = None
        for first in component:
            for edge in inner[first].values():
                back = _path(inner, edge.target, first)
                if back is not None and (best is None or len(back) + 1 < len(best)):
                    best = [edge, *back]
        assert best is not None
        hops = " -> ".join(f"{e.source} (line {e.line})" for e in best)
        lines.append(f"{hops} -> {best[0].source}   [component: {', '.join(component)}]")
    return lines


def without(
    graph: Mapping[str, Mapping[str, Edge]], dropped: set[tuple[str, str]]
) -> dict[str, dict[str, Edge]]:
    return {m: {t: e for t, e in out.items() if (m, t) not in dropped} for m, out in graph.items()}


# Known imports that close a cycle, each to be removed by moving the code it needs into a lower
# module. The list may only shrink: an entry whose import no longer exists, or that no longer
# closes a cycle, fails test_allowed_cycle_edges_are_still_needed until it is deleted here; any
# other cycle fails test_no_import_cycles. (An allowed edge hides every cycle through it, so
# each entry names one import, never a whole module.)
ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, Edge]]:
    return import_graph(PACKAGE_DIR)


def test_no_import_cycles(graph: dict[str, dict[str, Edge]]) -> None:
    cycles = describe_cycles(without(graph, set(ALLOWED_CYCLE_EDGES)))
    assert not cycles, "import cycles between modules of xai_serve:\n" + "\n".join(cycles)


def test_allowed_cycle_edges_are_still_needed(graph: dict[str, dict[str, Edge]]) -> None:
    stale = []
    for source, target in ALLOWED_CYCLE_EDGES:
        if target not in graph.get(source, {}):
            stale.append(f"{source} -> {target}: no longer imported")
        elif _path(graph, target, source) is None:
            stale.append(f"{source} -> {target}: no longer closes a cycle")
    assert not stale, "remove from ALLOWED_CYCLE_EDGES:\n" + "\n".join(stale)


def _in(module: str, layer: str) -> bool:
    name = f"{PACKAGE}.{layer}"
    return module == name or module.startswith(name + ".")


# (lower layer, the layers it must not import): a lower floor never imports a higher one.
_TOP = ("cli", "client", "runner", "demo", "bench")
LAYERS = [
    ("ops", ("explainers", "models", "serving", "integrations", "viz", *_TOP)),
    ("explainers", ("serving", "models", "integrations", "viz", *_TOP)),
    ("models", ("serving", "integrations", "viz", *_TOP)),
    ("concepts", ("serving", "models", "integrations", "viz", *_TOP)),
    ("imaging", ("explainers", "models", "serving", "integrations", "viz", *_TOP)),
    ("viz", ("serving", "integrations", *_TOP)),
    ("serving", ("integrations", *_TOP)),
    ("client", ("serving", "integrations", "cli", "runner", "demo", "bench")),
    # adapters to engines (Ray Serve) sit on the server's pieces, below the commands
    ("integrations", _TOP),
]


@pytest.mark.parametrize(("lower", "higher"), LAYERS, ids=[low for low, _ in LAYERS])
def test_lower_layers_do_not_import_higher_ones(
    graph: dict[str, dict[str, Edge]], lower: str, higher: tuple[str, ...]
) -> None:
    wrong = [
        f"{edge.source} (line {edge.line}) imports {edge.target}"
        for module, out in graph.items()
        if _in(module, lower) and not _entry_point(module)
        for edge in out.values()
        if any(_in(edge.target, h) for h in higher)
    ]
    assert not wrong, f"{PACKAGE}.{lower} must not import {', '.join(higher)}:\n" + "\n".join(wrong)


def _entry_point(module: str) -> bool:
    """``python -m`` entry points (``__main__`` modules) sit above everything, the CLI too."""
    return module.rpartition(".")[2] == "__main__"


def test_nothing_imports_the_cli(graph: dict[str, dict[str, Edge]]) -> None:
    users = [
        f"{edge.source} (line {edge.line})"
        for module, out in graph.items()
        if not _in(module, "cli") and not _entry_point(module)
        for edge in out.values()
        if _in(edge.target, "cli") or _entry_point(edge.target)
    ]
    assert not users, (
        f"{PACKAGE}.cli and the __main__ modules are the top layer; imported by: "
        + ", ".join(users)
    )


def _private_owner(dotted: str) -> str | None:
    """The module or package whose private part ``dotted`` names (``a.b._c.d`` -> ``a.b``), or
    None when it names nothing private (dunder names are not private)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].startswith("_") and not parts[i].startswith("__"):
            return ".".join(parts[:i])
    return None


def private_imports(root: Path) -> list[tuple[str, str, int]]:
    """``(importing module, imported dotted name, line)`` for every import of a private module
    or name (``_x``) from outside the module or package that holds it."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        is_package = path.name == "__init__.py"
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                names = [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                owner = _private_owner(name)
                if owner is None or not owner.startswith(root.name):
                    continue
                if module != owner and not module.startswith(owner + "."):
                    found.append((module, name, node.lineno))
    return found


# Known imports of another module's private helper, each to be removed by making the helper
# public in a module both sides may import. The list may only shrink, as ALLOWED_CYCLE_EDGES.
ALLOWED_PRIVATE_IMPORTS: dict[tuple[str, str], str] = {}


def test_private_helpers_stay_in_their_module() -> None:
    found = private_imports(PACKAGE_DIR)
    wrong = [
        f"{module} (line {line}) imports {name}"
        for module, name, line in found
        if (module, name) not in ALLOWED_PRIVATE_IMPORTS
    ]
    assert not wrong, "private helpers imported from outside their module:\n" + "\n".join(wrong)
    stale = sorted(set(ALLOWED_PRIVATE_IMPORTS) - {(m, n) for m, n, _ in found})
    assert not stale, f"no longer imported: remove from ALLOWED_PRIVATE_IMPORTS: {stale}"


# --------------------------------------------------------------------------------------------
# The checker itself: it must see what it is meant to catch
# --------------------------------------------------------------------------------------------


def _write_package(root: Path, files: Mapping[str, str]) -> Path:
    pkg = root / "pkg"
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return pkg


def test_checker_sees_private_imports(tmp_path: Path) -> None:
    pkg = _write_package(
        tmp_path,
        {
            "__init__.py": "from pkg import _c\n",
            "_c.py": "X = 1\n",
            "a.py": "from pkg._c import X\n\ndef _helper():\n    return X\n",
            "b.py": "from pkg.a import _helper, __doc__\n",
            "sub/__init__.py": "",
            "sub/_p.py": "Y = 2\n",
            "sub/q.py": "from . import _p\nfrom ._p import Y\n",
            "other/__init__.py": "",
            "other/x.py": "def f():\n    from pkg.sub._p import Y\n    return Y\n",
        },
    )
    # pkg/_c.py is private to pkg, which holds a.py; sub/_p.py to pkg.sub only.
    assert private_imports(pkg) == [
        ("pkg.b", "pkg.a._helper", 1),
        ("pkg.other.x", "pkg.sub._p.Y", 2),
    ]


def test_checker_sees_cycles_through_imports_inside_functions(tmp_path: Path) -> None:
    pkg = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "def f():\n    from pkg.high import g\n    return g\n",
            "high.py": "from . import low\n\ndef g():\n    return low\n",
            "sub/__init__.py": "from pkg.sub.leaf import h\n",
            "sub/leaf.py": "def h():\n    import pkg.other\n",
            "other.py": "class C:\n    def m(self):\n        from .sub import leaf\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.low"]["pkg.high"].line == 2
    assert graph["pkg.high"]["pkg.low"].line == 1
    # Importing pkg.sub.leaf from outside pkg.sub runs pkg/sub/__init__.py too.
    assert set(graph["pkg.other"]) == {"pkg.sub", "pkg.sub.leaf"}
    assert set(graph["pkg.sub.leaf"]) == {"pkg.other"}
    cycles = describe_cycles(graph)
    assert len(cycles) == 2, cycles
    assert any("pkg.high (line 1) -> pkg.low" in c or "pkg.low (line 2)" in c for c in cycles)
    assert any("pkg.other" in c and "pkg.sub.leaf" in c for c in cycles)
    assert not describe_cycles(
        without(
            graph,
            {("pkg.low", "pkg.high"), ("pkg.other", "pkg.sub"), ("pkg.other", "pkg.sub.leaf")},
        )
    )
