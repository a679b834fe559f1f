"""No import circles inside the ``hyperlit`` package, counted at module granularity.

Every module's imports are read from its source with ``ast`` (module-level and function-level, relative imports
resolved), so an import hidden inside a function to dodge a circle still counts. Edges go to the module named by the
import (``from hyperlit.files import a1111`` -> ``hyperlit.files.a1111``; ``from hyperlit.files import read_file`` ->
``hyperlit.files``); the implicit run of a parent package's ``__init__`` is not an edge, as in import-linter.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import hyperlit

Graph = Mapping[str, Iterable[str]]


def package_modules(package: object = hyperlit) -> dict[str, tuple[Path, bool]]:
    """Every module of ``package``: name -> (source file, is a package)."""
    found = {package.__name__: (Path(package.__file__), True)}
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin is not None, info.name
        found[info.name] = (Path(spec.origin), info.ispkg)
    return found


def imported_modules(name: str, source: Path, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` imports anywhere in its source."""
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()

    def closest_known(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), filename=str(source))):
        if isinstance(node, ast.Import):
            targets.update(filter(None, (closest_known(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = (
                importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                if node.level
                else (node.module or "")
            )
            for alias in node.names:
                # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod.
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else closest_known(base)
                if target:
                    targets.add(target)
    targets.discard(name)
    return targets


def import_graph(package: object = hyperlit) -> dict[str, set[str]]:
    modules = package_modules(package)
    known = set(modules)
    return {name: imported_modules(name, source, is_pkg, known) for name, (source, is_pkg) in modules.items()}


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one holds at least one cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def one_cycle(graph: Graph, component: list[str]) -> list[str]:
    """A concrete circle through ``component``'s first module, as a path that returns to where it started."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth-first, so the circle shown is a shortest one through `start`
        following = []
        for node in frontier:
            for succ in sorted(graph.get(node, ())):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if succ in members and succ not in parent:
                    parent[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def describe(graph: Graph, component: list[str]) -> str:
    return " -> ".join(one_cycle(graph, component))


# --- the cycle finder itself -------------------------------------------------------------------------------


def test_cycle_finder_reports_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}, "f": {"g"}, "g": {"f"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["f", "g"]]
    assert describe(graph, ["a", "b", "c"]) == "a -> b -> c -> a"
    assert describe(graph, ["f", "g"]) == "f -> g -> f"


def test_cycle_finder_accepts_a_graph_without_cycles() -> None:
    diamond = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}
    assert strongly_connected(diamond) == []


def test_import_parser_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "from . import sibling\n"
        "from .sub import thing\n"
        "from ..top import name\n"
        "import pkg.deep.leaf as leaf\n"
        "def later():\n"
        "    from pkg.other import helper\n"
        "    import outside\n"
    )
    known = {"pkg", "pkg.a", "pkg.a.sibling", "pkg.a.sub", "pkg.top", "pkg.deep", "pkg.other", "pkg.a.mod"}
    assert imported_modules("pkg.a.mod", source, False, known) == {
        "pkg.a.sibling",
        "pkg.a.sub",
        "pkg.top",
        "pkg.deep",
        "pkg.other",
    }


# --- the hyperlit package ----------------------------------------------------------------------------------


def test_graph_covers_the_package() -> None:
    graph = import_graph()
    assert {"hyperlit.hypernetwork", "hyperlit.files", "hyperlit.files.a1111", "hyperlit.cli"} <= set(graph)
    # Spot checks that the parser sees real edges, so an empty graph cannot pass the cycle test below.
    assert "hyperlit.files.content" in graph["hyperlit.files.a1111"]
    assert "hyperlit.files" in graph["hyperlit.cli"]


def test_model_module_imports_no_file_format_code() -> None:
    graph = import_graph()
    reachable, todo = set(), ["hyperlit.hypernetwork"]
    while todo:
        for succ in graph[todo.pop()]:
            if succ not in reachable:
                reachable.add(succ)
                todo.append(succ)
    # The model sits at the bottom of the layers: only hyperlit.io may lie below it, never a file codec.
    assert reachable <= {"hyperlit", "hyperlit.io"}, reachable


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = [describe(graph, c) for c in strongly_connected(graph)]
    assert not cycles, "import cycles in hyperlit:\n" + "\n".join(cycles)
