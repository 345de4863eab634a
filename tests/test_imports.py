"""No new import cycles among imgscore's modules.

A cycle makes import order matter (a name imported from a half-initialised module is missing)
and hides which layer depends on which. Every ``import``/``from … import`` of an ``imgscore``
module counts, inside functions too: a deferred import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"imgscore": "imgscore", "imgscore.flows": "flows", "imgscore.tasks": "tasks", "imgscore.configs": "configs"}

# The cycles the code has today; each is to be broken by moving the shared piece into a lower
# module. Listed so that a new cycle, or a module joining one of these, fails here.
KNOWN = [
    {"imgscore.tasks.containment", "imgscore.tasks.parquet_io", "imgscore.tasks.storage"},
    {"imgscore.tasks.objscan", "imgscore.tasks.scan"},
    {"imgscore.flows.dask_runner", "imgscore.flows.dask_warm", "imgscore.flows.runner", "imgscore.flows.score_images"},
]


def import_graph() -> dict[str, set[str]]:
    """module → the imgscore modules it imports (dotted names, from the source tree)."""
    files = {}
    for pkg, folder in PACKAGES.items():
        for p in (REPO / folder).glob("*.py"):
            files[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("imgscore"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in files and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(comp)
    return found


def test_the_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_new_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "imgscore.tasks.storage" in graph["imgscore.tasks.plan"]  # the graph is read
    new = [sorted(c) for c in cycles(graph) if c not in KNOWN]
    assert new == [], "a new import cycle: move the shared piece into a module both can import"
