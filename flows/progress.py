"""Terminal progress over images while shards finish (rich)."""

from __future__ import annotations

import contextlib
import sys
import time

from imgscore.flows import score_images


def progress_fields(manifest: dict, now: float | None = None) -> dict:
    """What the bar shows after a shard finished, from the run's manifest.

    Returns:
        ``{total, done, errors, rate}``: images in the run's shards, images finished (scored +
        failed), failed images so far, and images per second since the run was planned
        (``manifest["timings"]["planned_at_s"]``, wall-clock seconds), as text (``-`` before
        any time has passed).
    """
    c = manifest["counts"]
    total = sum(s.get("images", 0) for s in manifest.get("shards", [])) or c.get("scanned", 0)
    done = min(c.get("scored", 0) + c.get("failed", 0), total) if total else c.get("scored", 0) + c.get("failed", 0)
    started = (manifest.get("timings") or {}).get("planned_at_s")
    elapsed = (now if now is not None else time.time()) - started if started else None
    rate = f"{done / elapsed:.1f}" if elapsed and elapsed > 0 else "-"
    return {"total": total, "done": done, "errors": c.get("failed", 0), "rate": rate}


def make_hook(bar):
    """A ``PROGRESS_HOOKS`` callback that drives ``bar`` (a rich ``Progress``); adds its task lazily."""
    state = {"task": None}

    def hook(manifest: dict, result: dict) -> None:
        f = progress_fields(manifest)
        if state["task"] is None:
            state["task"] = bar.add_task("scoring", total=f["total"], rate="-", errors=0)
        bar.update(state["task"], total=f["total"], completed=f["done"], rate=f["rate"], errors=f["errors"])

    hook.state = state
    return hook


def _bar(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"),
        TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(), console=console, transient=True,
    )


@contextlib.contextmanager
def progress_for(console, enabled: bool = True):
    """Show a rich progress bar (images done of total, images/s, errors so far) while the flow runs.

    Off when ``enabled`` is false (``--quiet``) or stdout is not a terminal (pipes, cron, CI), so
    logs stay free of control characters. The bar appears when the first shard finishes.
    """
    if not enabled or not sys.stdout.isatty():
        yield
        return
    with _bar(console) as bar:
        hook = make_hook(bar)
        score_images.PROGRESS_HOOKS.append(hook)
        try:
            yield
        finally:
            score_images.PROGRESS_HOOKS.remove(hook)
