"""The repository explains itself: every file a docstring, comment, README or docs page names
exists, and every ``imgscore.…`` name they cite can be imported; the docs site's nav lists every
page under docs/, and the README stays a five-minute read whose links land on those pages."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [
    REPO / "README.md",
    REPO / "prefect.yaml",
    REPO / "pyproject.toml",
    REPO / "Makefile",
    REPO / "mkdocs.yml",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "benchmarks" / "NOTES.md",
    *sorted(p for d in ("imgscore", "flows", "tasks", "tests", "benchmarks") for p in (REPO / d).rglob("*.py")),
]
# A repository path: one of the project's folders, then a file name with an extension we keep.
PATH = re.compile(
    r"(?<![\w./:-])((?:docs|benchmarks|tests|flows|tasks|configs|imgscore)/[\w./-]*\w\.(?:md|py|yaml|yml|json|toml))\b"
)
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


def test_the_docs_nav_lists_every_page_and_only_pages_that_exist():
    """mkdocs.yml's nav and docs/*.md agree (``make docs`` builds with --strict, which refuses a
    missing page; a page left out of the nav would build but be unreachable)."""
    import yaml

    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    listed = sorted(page for entry in nav for page in entry.values())
    assert listed == sorted(p.name for p in (REPO / "docs").glob("*.md"))


def test_the_readme_is_short_and_its_links_land():
    """The README gets a newcomer to a first night (set-up, the main command, the concepts, where
    the outputs are); everything else is in docs/. Every relative link in it names a file that exists."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    first_screen = "\n".join(text.splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    assert "imgscore run --config nightly --set input.root=/data/images" in text
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    relative = [link for link in links if "://" not in link]
    assert relative and all((REPO / link).is_file() for link in relative), relative


def test_the_architecture_map_names_every_module():
    """docs/architecture.md's map lists each folder and each module in it: a module added or
    renamed without the map fails here."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    start = text.index("<!-- map:")
    block = text[start : text.index("```\n", text.index("```", start) + 3)]
    missing = []
    for folder in ("flows", "tasks", "imgscore"):
        for p in sorted((REPO / folder).rglob("*.py")):
            rel = p.relative_to(REPO)
            for part in rel.parent.parts[1:]:
                if not re.search(rf"\b{part}/", block):
                    missing.append(f"{rel.parent}/")
            if p.stem != "__init__" and not re.search(rf"\b{p.stem}\b", block):
                missing.append(str(rel))
    assert sorted(set(missing)) == []
