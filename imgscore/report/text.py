"""Text shared by the report's renderers: numbers as shown, and exceptions in one line."""

from __future__ import annotations

import math

NA = "n/a"  # shown for accuracy when folder labels cannot be paired with model classes


def fmt(v: object, digits: int = 3) -> str:
    """A number as the report shows it: floats with ``digits`` decimals, "–" for None or NaN,
    anything else as ``str``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (matplotlib's parse errors span several), at most 300 characters."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else repr(exc)}"
