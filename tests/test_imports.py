"""No new import cycles among imgscore's modules.

A cycle makes import order matter (a name imported from a half-initialised module is missing)
and hides which layer depends on which. Every ``import``/``from … import`` of an ``imgscore``
module counts, inside functions too: a deferred import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Installed name → folder (pyproject.toml's package-dir): the library under imgscore/, flows/ and tasks/ at the root.
PACKAGES = {"imgscore": "imgscore", "imgscore.flows": "flows", "imgscore.tasks": "tasks", "imgscore.configs": "configs"}

# Cycles allowed to remain: none. Listed here only with the plan that breaks them.
KNOWN: list[set[str]] = []


def import_graph() -> dict[str, set[str]]:
    """module → the imgscore modules it imports (dotted names, from the source tree)."""
    files = {}
    for pkg, folder in PACKAGES.items():
        for p in (REPO / folder).rglob("*.py"):
            parts = p.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            files[".".join((pkg, *parts))] = files.get(".".join((pkg, *parts)), p)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module
                and node.module.startswith("imgscore")
            ):
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module for a in node.names
                ]
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
    assert len(graph) > 40 and "imgscore.io.storage" in graph["imgscore.runstate.plan"]  # the graph is read
    new = [sorted(c) for c in cycles(graph) if c not in KNOWN]
    assert new == [], "a new import cycle: move the shared piece into a module both can import"


def test_layers_point_down():
    """flows/ (the Prefect flows and the CLI) → tasks/ (the Prefect tasks) → the library under
    imgscore/; the library never imports a flow or a task, and a task never imports a flow."""
    graph = import_graph()
    upward = sorted(
        f"{mod} → {dep}"
        for mod, deps in graph.items()
        for dep in deps
        if (
            not mod.startswith(("imgscore.flows", "imgscore.tasks"))
            and dep.startswith(("imgscore.flows", "imgscore.tasks"))
        )
        or (mod.startswith("imgscore.tasks") and dep.startswith("imgscore.flows"))
    )
    assert upward == []
