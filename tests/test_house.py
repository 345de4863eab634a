"""The house rules a newcomer relies on, checked: small modules, short functions, one path type.

- No module over 400 lines and no function over 60 (its docstring counted), unless a comment
  line starting ``# kept whole:`` right above the ``def`` (or in a module's first 30 lines)
  says why it reads better as one piece.
- Only the storage layer (``imgscore/io/``) asks whether a root is local or remote: everyone
  else calls a storage function that does the right thing for both.
- Paths are annotated with the one path type (``UPath``, or ``AnyPath`` where a caller may pass
  a str or a pathlib.Path), never ``Path | str``. The one exception is a root's configured value
  (``RootValue``: a local folder as a Path, a URL as text), a named alias that says so.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE = [p for d in ("imgscore", "flows", "tasks", "benchmarks") for p in sorted((REPO / d).rglob("*.py"))]
MAX_MODULE, MAX_FUNCTION = 400, 60
MARK = "# kept whole:"


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name


def long_modules(paths: list[Path] = CODE) -> list[str]:
    found = []
    for p in paths:
        lines = p.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_MODULE and not any(line.startswith(MARK) for line in lines[:30]):
            found.append(f"{_rel(p)}: {len(lines)} lines")
    return found


def long_functions(paths: list[Path] = CODE) -> list[str]:
    found = []
    for p in paths:
        text = p.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if length > MAX_FUNCTION and not lines[first - 2].strip().startswith(MARK):
                found.append(f"{_rel(p)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_modules_and_functions_are_small():
    assert long_modules() == [], f"split by concern, or say why with a '{MARK}' comment"
    assert long_functions() == [], f"split into named steps, or say why with a '{MARK}' comment above the def"


def test_only_the_storage_layer_tells_local_from_remote():
    outside = [
        f"{_rel(p)}:{i}"
        for p in CODE
        if not _rel(p).startswith("imgscore/io/")
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bis_remote\b", line)
    ]
    assert outside == [], "call a storage function that does the right thing for both kinds of root"


def test_one_path_type_in_annotations():
    found = [
        f"{_rel(p)}:{i}"
        for p in CODE
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\b(Path \| str|str \| Path)\b", line) and not line.startswith("RootValue: TypeAlias")
    ]
    assert found == [], "annotate UPath, or imgscore.io.storage.AnyPath where a str or pathlib.Path may come in"


def test_the_size_checks_see_what_they_should(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION))
    long_fn, marked = tmp_path / "long_fn.py", tmp_path / "marked.py"
    long_fn.write_text(f'def f():\n    """Doc."""\n{body}\n')
    marked.write_text(f"{MARK} one table, row by row\ndef f():\n{body}\n    return 0\n")
    assert [f.split(" ")[1] for f in long_functions([long_fn, marked])] == ["f:"]
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * (MAX_MODULE + 1))
    assert long_modules([big]) == ["big.py: 401 lines"]
