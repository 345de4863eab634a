"""Terminal progress over images while shards finish (rich)."""

from __future__ import annotations

import contextlib
import sys

from flows import score_images


@contextlib.contextmanager
def progress_for(console, enabled: bool = True):
    """Show a rich progress bar (images scored, images/s, errors so far) while the flow runs.

    Off when ``enabled`` is false or stdout is not a terminal.
    """
    if not enabled or not sys.stdout.isatty():
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    state = {"task": None}
    with Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"),
        TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(), console=console, transient=True,
    ) as bar:

        def hook(manifest: dict, result: dict) -> None:
            c = manifest["counts"]
            if state["task"] is None:
                state["task"] = bar.add_task("scoring", total=c["scanned"], rate="-", errors=0)
            t = bar.tasks[0]
            done = c["scored"] + c["failed"]
            rate = f"{done / t.elapsed:.1f}" if t.elapsed else "-"
            bar.update(state["task"], completed=done, rate=rate, errors=c["failed"])

        score_images.PROGRESS_HOOKS.append(hook)
        try:
            yield
        finally:
            score_images.PROGRESS_HOOKS.remove(hook)
