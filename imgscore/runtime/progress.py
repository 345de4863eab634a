"""Progress while shards finish: who listens, and the terminal's rich bar.

The flows call :func:`notify` after each shard is committed; whoever wants to know registers a
listener with :func:`listening` for as long as it wants (the CLI's bar, :func:`progress_for`).
This module imports no flow: dependencies run from the flows and the CLI to it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from imgscore.runstate.manifest import Manifest, ShardRecord

if TYPE_CHECKING:  # rich is imported when a bar is shown, not with this module
    from rich.console import Console
    from rich.progress import Progress, TaskID

Listener = Callable[[Manifest, ShardRecord], None]
_LISTENERS: list[Listener] = []
_LOCK = threading.Lock()


def listeners() -> list[Listener]:
    """The listeners registered now (a copy)."""
    with _LOCK:
        return list(_LISTENERS)


def notify(manifest: Manifest, record: ShardRecord) -> None:
    """Tell every listener that ``record``'s shard was committed into ``manifest``."""
    for listener in listeners():
        listener(manifest, record)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    """Register ``listener`` for the ``with`` block."""
    with _LOCK:
        _LISTENERS.append(listener)
    try:
        yield listener
    finally:
        with _LOCK:
            _LISTENERS.remove(listener)


def progress_fields(manifest: Manifest, now: float | None = None) -> dict:
    """What the bar shows after a shard finished, from the run's manifest — O(1).

    Returns:
        ``{total, done, errors, rate}``: (image, model) pairs in the run's shards (with one model,
        images), pairs finished (scored + failed), failed pairs so far, and images per second since the run was planned
        (``manifest.timings["planned_at_s"]``, wall-clock seconds), as text (``-`` before any
        time has passed).
    """
    c = manifest.counts
    total = manifest.total_pairs  # (image, model) pairs: with one model, images
    done = min(c.scored + c.failed, total) if total else c.scored + c.failed
    started = manifest.timings.get("planned_at_s")
    elapsed = (now if now is not None else time.time()) - started if started else None
    rate = f"{done / elapsed:.1f}" if elapsed and elapsed > 0 else "-"
    return {"total": total, "done": done, "errors": c.failed, "rate": rate}


def make_hook(bar: Progress) -> Listener:
    """A listener that drives ``bar`` (a rich ``Progress``); adds its task lazily."""
    task: TaskID | None = None

    def hook(manifest: Manifest, record: ShardRecord | None) -> None:
        nonlocal task
        f = progress_fields(manifest)
        if task is None:
            task = bar.add_task("scoring", total=f["total"], rate="-", errors=0)
        bar.update(task, total=f["total"], completed=f["done"], rate=f["rate"], errors=f["errors"])

    return hook


def _bar(console: Console) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@contextlib.contextmanager
def progress_for(console: Console, enabled: bool = True) -> Iterator[None]:
    """Show a rich progress bar (images done of total, images/s, errors so far) while the flow runs.

    Off when ``enabled`` is false (``--quiet``) or stdout is not a terminal (pipes, cron, CI), so
    logs stay free of control characters. The bar appears when the first shard finishes.
    """
    if not enabled or not sys.stdout.isatty():
        yield
        return
    with _bar(console) as bar, listening(make_hook(bar)):
        yield
