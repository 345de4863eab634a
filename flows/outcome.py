"""How a CLI command ends: its exit code, the run summary it prints, the one-line error it prints.

Exit codes (docs/getting-started.md, "Score your own folder"): 0 finished within the error
budget; 1 over budget, a shard failed or a write failed; 2 bad usage, config, input root or
model; 130 interrupted by Ctrl-C (SIGINT), 143 terminated (SIGTERM), with the ``imgscore rerun``
command that finishes the run.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from imgscore.errors import ErrorBudgetExceeded, ImgscoreError
from imgscore.io import storage
from imgscore.io.storage import AnyPath

if TYPE_CHECKING:
    from types import FrameType

    from prefect.states import State
    from rich.console import Console


ECHO_CHARS = 2000  # an unexpected error's text is cut here: it can hold a whole config (a 1.4 MB class list)


def fail(msg: str, code: int) -> int:
    """Print ``msg`` as one ``imgscore: error:`` line on stderr (cut at :data:`ECHO_CHARS`); return ``code``."""
    if len(msg) > ECHO_CHARS:
        msg = f"{msg[:ECHO_CHARS]}… ({len(msg) - ECHO_CHARS:,} more characters left out)"
    print(f"imgscore: error: {msg}", file=sys.stderr)
    return code


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """One ``key  value`` line each; never wrapped, so paths stay copyable in logs and cron mail.
    A night with nothing new says so instead of listing devices and folders it never used. With
    several models ``scanned`` is images, ``scored``/``failed`` are (image, model) pairs, and a
    ``pairs`` line and ``pairs_per_s`` say so. A run that did not end ``complete`` ends with the
    ``rerun`` line: the command that finishes it."""
    several = len(summary.get("models") or []) > 1
    keys = (
        "run_id",
        "status",
        "scanned",
        "pairs",
        "scored",
        "failed",
        "skipped",
        "already_scored",
        "already_failed",
        "warnings",
        "images_per_s",
        "pairs_per_s",
        "wall_s",
    )
    pair_keys = ("scored", "failed") if several else ()
    rows = [
        (k, f"{summary[k]} (image, model) pairs" if k in pair_keys else summary[k])
        for k in keys
        if k in summary and (several or k not in ("pairs", "pairs_per_s"))
    ]
    if several:  # scanned counts images; the pairs line says how they became pairs
        at = next(i for i, (k, _) in enumerate(rows) if k == "pairs")
        rows[at] = ("pairs", f"{summary['pairs']} (image, model) pairs; models: {', '.join(summary['models'])}")
    if summary.get("known_bad"):
        rows.append(
            (
                "known_bad",
                f"{summary['already_failed']} image(s) failed before with the same bytes, not retried "
                f"(run.retry_failed=true retries them): {summary['known_bad']}",
            )
        )
    devices = ", ".join(summary.get("devices", []))
    rows += [
        ("devices", devices or ("none: nothing new to score" if not summary.get("scanned") else "-")),
        ("workers", len(summary.get("workers", []))),
    ]
    rows += [(k, summary[k]) for k in ("predictions", "errors", "manifest", "report") if summary.get(k)]
    rows += [
        ("drift", f"warning: {w}") for w in summary.get("drift") or []
    ]  # against recent nights (imgscore.report.drift)
    if summary.get("rerun"):  # every status but complete: the command that finishes the run
        rows.append(("rerun", summary["rerun"]))
    for k, v in rows:
        console.print(f"{k:<15} {v}", soft_wrap=True, highlight=False, markup=False)


class Terminated(Exception):
    """SIGTERM reached the CLI (``kill``, systemd, a container stop): the command ends like Ctrl-C,
    with exit 143. Inside a flow run Prefect turns SIGTERM into its ``TerminationSignal`` first
    (the flow records ``interrupted``), then hands the signal back to this handler."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def catch_sigterm():
    """SIGTERM ends the command as Ctrl-C does (:class:`Terminated`); returns the handler it
    replaced (None when not on the main thread, where Python allows no handlers)."""
    import signal

    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        return None


def restore_sigterm(previous) -> None:
    """Put back the SIGTERM handler :func:`catch_sigterm` replaced (nothing when it replaced none)."""
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def interrupted(run_id: str, out_root: AnyPath, exc: BaseException | None = None) -> int:
    """Ctrl-C: exit 130 (128 + SIGINT), SIGTERM: 143, with the command that finishes the run — or,
    when the run had not written its plan yet, the fact that there is nothing to finish."""
    what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
    if not storage.is_file(storage.path(out_root, "runs", run_id, "manifest.json")):
        return fail(f"{what} before run {run_id} was planned; nothing was written, run the command again", code)
    from imgscore.report.build import rerun_command

    return fail(
        f"{what}; run {run_id} is recorded as interrupted; finish it with `{rerun_command(run_id, out_root)}`", code
    )


def flow_outcome(state: State[Any], console: Console, what: str) -> tuple[int, dict[str, Any]]:
    """Exit code and summary from a finished flow run's state (run and rerun alike)."""
    if state.is_completed():
        summary = state.result()
        print_summary(summary, console)
        return 0, summary
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, ErrorBudgetExceeded):
        print_summary(exc.summary, console)
        print(f"imgscore: {exc}", file=sys.stderr)
        return 1, exc.summary
    if isinstance(exc, ImgscoreError):
        return fail(str(exc), exc.exit_code), {}
    return fail(f"{what} failed: {type(exc).__name__}: {exc}", 1), {}
