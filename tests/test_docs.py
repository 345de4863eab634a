"""The repository explains itself: every file a docstring, comment, README or docs page names
exists, and every ``imgscore.…`` name they cite can be imported."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [
    REPO / "README.md", REPO / "prefect.yaml", REPO / "pyproject.toml", REPO / "Makefile",
    *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "NOTES.md",
    *sorted(p for d in ("imgscore", "flows", "tasks", "tests", "benchmarks") for p in (REPO / d).glob("*.py")),
]
# A repository path: one of the project's folders, then a file name with an extension we keep.
PATH = re.compile(r"(?<![\w./:-])((?:docs|benchmarks|tests|flows|tasks|configs|imgscore)/[\w./-]*\w\.(?:md|py|yaml|yml|json|toml))\b")
DOTTED = re.compile(r"(?<![\w.])(imgscore\.(?:flows|tasks)\.[A-Za-z_][\w.]*[A-Za-z_0-9])")


def _named(pattern: re.Pattern) -> list[tuple[str, str]]:
    found = set()
    for src in SOURCES:
        for m in pattern.finditer(src.read_text(encoding="utf-8")):
            found.add((m.group(1), src.relative_to(REPO).as_posix()))
    return sorted(found)


def test_the_sources_are_read():
    assert len(SOURCES) > 40 and ("docs/architecture.md", "README.md") in _named(PATH)


def test_every_named_file_exists():
    missing = [f"{where} names {path}" for path, where in _named(PATH) if not (REPO / path).exists()]
    assert missing == []


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 1, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_named_module_or_object_exists():
    missing = []
    for name, where in _named(DOTTED):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{where} names {name}: {exc}")
    assert missing == []
