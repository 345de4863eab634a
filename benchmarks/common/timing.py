"""Timing several ways of doing the same work fairly on a shared machine."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence


def interleaved(
    fns: Sequence[Callable[[], object]],
    repeats: int,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[float]:
    """Best wall seconds of each of ``fns``, timed in turn ``repeats`` times inside ``context()``
    (e.g. ``torch.inference_mode``): a change of load then hits every way alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns, strict=True):
            t0 = time.perf_counter()
            with context():
                fn()
            t.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def rate(n: int, seconds: float) -> float:
    """``n / seconds``, two decimals (images per second)."""
    return round(n / seconds, 2)
