"""How a run that does not finish still says so: ``interrupted`` and ``crashed`` in its manifest.

Both flows wrap their scoring in :func:`recorded_ending`. Whatever ends the block other than its
own finish — Ctrl-C (``KeyboardInterrupt``), ``SIGTERM`` (Prefect's ``TerminationSignal``, which
a worker sends to cancel a flow run), a write that fails (disk full), any unexpected exception —
is written into the manifest before it propagates: status ``interrupted`` or ``crashed``, a
one-line ``reason``, the counts of what was done, and ``report.html`` of that. A run killed
with ``-9`` writes nothing; readers report it ``abandoned`` because its lock owner is gone
(:func:`imgscore.tasks.runstate.observed_status`).

A failing write becomes one :class:`~imgscore.tasks.errors.OutputWriteError` line that names the
file, the OS error and the ``imgscore rerun`` command (no traceback without ``--verbose``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from imgscore.flows.artifacts import publish_run_report
from imgscore.tasks.errors import ErrorBudgetExceeded, OutputWriteError
from imgscore.tasks.manifest import adopt_committed
from imgscore.tasks.plan import RunPlan
from imgscore.tasks.report import one_line, rerun_command
from imgscore.tasks.runstate import now_iso

log = logging.getLogger("imgscore")


def _signal_name(exc: BaseException) -> str:
    sig = getattr(exc, "signal", None)
    if sig is None:
        return "SIGINT (Ctrl-C)"
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def end_abnormally(plan: RunPlan, status: str, reason: str, t0: float, out_root: str | Path) -> None:
    """Write ``status`` (``interrupted`` or ``crashed``) and ``reason`` into the run's manifest,
    then report.html of what was done so far. Shards whose commit record was written but whose
    result had not reached the flow yet are adopted first (as ``imgscore rerun`` would), so the
    counts are what is on disk. Never raises: a manifest that cannot be written (the disk that
    failed) is one warning line, and readers then see the run ``abandoned``."""
    try:
        adopt_committed(plan.manifest, plan.run_dir, out_root)
    except Exception as exc:  # a record or part file that cannot be read: the rerun sorts it out
        log.debug("run %s: committed shards not adopted at its end (%s)", plan.run_id, one_line(exc))
    m = plan.manifest.recount()
    m.status, m.reason = status, reason
    ended = {"wall_s": round(time.perf_counter() - t0, 3), "ended_at": now_iso()}
    if m.reruns:  # a rerun's ending is its own; the first run's timings stay
        m.reruns[-1].update({**ended, "status": status, "reason": reason})
    else:
        m.timings.update(ended)
    try:
        plan.state.save()
    except Exception as exc:
        log.warning("run %s: the %s status could not be written to its manifest (%s)", plan.run_id, status, one_line(exc))
        return
    publish_run_report(out_root, plan.run_id, artifacts=False)  # never raises


def _is_interrupt(exc: BaseException) -> bool:
    from prefect.exceptions import TerminationSignal

    return isinstance(exc, KeyboardInterrupt | TerminationSignal)


@contextlib.contextmanager
def recorded_ending(plan: RunPlan, out_root: str | Path, t0: float) -> Iterator[None]:
    """Record in the manifest whatever ends the block abnormally, then let it propagate (module
    docstring). The error budget's own ending (``ErrorBudgetExceeded``, status ``failed``) is
    written by the finish step and passes through.

    Raises:
        OutputWriteError: a write failed; the message adds that nothing is half-written and the
            rerun command.
    """
    try:
        yield
    except ErrorBudgetExceeded:
        raise
    except BaseException as exc:
        if _is_interrupt(exc):
            end_abnormally(plan, "interrupted", f"{_signal_name(exc)} at {now_iso()}", t0, out_root)
            raise
        reason = str(exc) if isinstance(exc, OutputWriteError) else one_line(exc)
        end_abnormally(plan, "crashed", reason, t0, out_root)
        if isinstance(exc, OutputWriteError):
            raise OutputWriteError(
                f"run {plan.run_id} crashed: {exc}; nothing is half-written (temp files removed, committed shards kept); "
                f"fix it (free space), then finish the run with `{rerun_command(plan.run_id, out_root)}`",
                exc.path, exc.errno,
            ) from None
        raise
