"""Result files: JSON under benchmarks/results/ (or wherever a smoke run writes)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchmarks.common.paths import RESULTS


def write_json(data: Any, name: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented JSON to ``name`` (a bare file name lands in ``RESULTS``); returns the path."""
    path = RESULTS / name if isinstance(name, str) else Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def public(d: Any) -> Any:
    """``d`` without the keys that start with ``_`` (kept in memory for comparisons, never written), at any depth."""
    if isinstance(d, dict):
        return {k: public(v) for k, v in d.items() if not k.startswith("_")}
    if isinstance(d, list):
        return [public(v) for v in d]
    return d
