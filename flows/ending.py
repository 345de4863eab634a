"""How a run that does not finish still says so: ``interrupted`` and ``crashed`` in its manifest.

Both flows wrap their scoring in :func:`recorded_ending`. Whatever ends the block other than its
own finish — Ctrl-C (``KeyboardInterrupt``), ``SIGTERM`` (Prefect's ``TerminationSignal``, which
a worker sends to cancel a flow run), a write that fails (disk full), any unexpected exception —
is written into the manifest before it propagates: status ``interrupted`` or ``crashed``, a
one-line ``reason``, the counts of what was done, and ``report.html`` of that. A run killed
with ``-9`` writes nothing; readers report it ``abandoned`` because its lock owner is gone
(:func:`imgscore.runstate.manifest.observed_status`).

On SIGINT or SIGTERM the flows stop their shards first (:func:`stop_shards`): the run is marked
stopping, shards not started never start, shards in flight are abandoned at their next batch
(nothing of them is committed), and once they have let go the manifest adopts every commit record
on disk — so its counts, report.html and the notification are the rows on disk.

A failing write becomes one :class:`~imgscore.errors.OutputWriteError` line that names the
file, the OS error and the ``imgscore rerun`` command (no traceback without ``--verbose``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import signal
import time
from collections.abc import Iterable, Iterator
from typing import Any

from imgscore.errors import ErrorBudgetExceeded, OutputWriteError
from imgscore.flows import notify
from imgscore.flows.artifacts import publish_run_report
from imgscore.io.storage import AnyPath
from imgscore.report.build import rerun_command
from imgscore.report.text import one_line
from imgscore.runstate.commits import adopt_committed
from imgscore.runstate.manifest import RunStatus, now_iso, request_stop
from imgscore.runstate.plan import RunPlan

log = logging.getLogger("imgscore")


def _signal_name(exc: BaseException) -> str:
    sig = getattr(exc, "signal", None)
    if sig is None:
        return "SIGINT (Ctrl-C)"
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def end_abnormally(plan: RunPlan, status: RunStatus, reason: str, t0: float, out_root: AnyPath) -> str | None:
    """Write ``status`` (``interrupted`` or ``crashed``) and ``reason`` into the run's manifest,
    then report.html of what was done so far. Shards whose commit record was written but whose
    result had not reached the flow yet are adopted first (as ``imgscore rerun`` would), so the
    counts are what is on disk. The ending is also handed to this process's notifications
    (``notify.remember_ending``). Never raises.

    Returns:
        None when the manifest was written; else what became of the status, one clause: when
        manifest.json cannot be rewritten (the disk that failed), the ending is appended to the
        run's ledger (``RunState.record_ending``), which readers replay; only when that fails too
        do readers see the run ``abandoned``.
    """
    notify.remember_ending(plan.run_id, status, reason)
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
        if plan.state.record_ending(status, reason):
            return f"the {status} status is recorded in the run's ledger (manifest.json could not be rewritten)"
        return f"the {status} status could not be written to its manifest ({one_line(exc)})"
    publish_run_report(out_root, plan.run_id, artifacts=False)  # never raises
    return None


def _is_interrupt(exc: BaseException) -> bool:
    from prefect.exceptions import TerminationSignal

    return isinstance(exc, KeyboardInterrupt | TerminationSignal)


STOP_WAIT_S = 60.0  # longest wait for shards in flight to let go after a signal (one batch each, normally)


def stop_shards(run_dir: AnyPath, futures: Iterable[Any], wait_s: float = STOP_WAIT_S) -> None:
    """After SIGINT/SIGTERM: mark the run stopping (``imgscore.runstate.manifest.request_stop``),
    cancel the shard task runs that have not started (thread runner: they never start; on Dask
    they start, see the mark and end ``Cancelled``), and wait up to ``wait_s`` seconds for the
    ones in flight, which are abandoned at their next batch or before their commit. A second
    Ctrl-C ends the wait. Never raises."""
    try:
        request_stop(run_dir)
    except OSError as exc:  # the disk that failed: shards may still commit; a rerun adopts them
        log.warning("run at %s: could not mark it stopping (%s)", run_dir, one_line(exc))
    futures = list(futures)
    for fut in futures:
        wrapped = getattr(fut, "wrapped_future", None)
        if isinstance(wrapped, concurrent.futures.Future):
            wrapped.cancel()  # False for a running one: it stops at its next batch
    deadline = time.monotonic() + wait_s
    for fut in futures:
        try:
            fut.wait(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # a cancelled future, a failed task run: it has let go
            continue
        except BaseException:  # a second Ctrl-C: stop waiting
            return


@contextlib.contextmanager
def shards_stop_on_signal(run_dir: AnyPath, futures: Iterable[Any]) -> Iterator[None]:
    """Around a flow's loop over its shard futures: on SIGINT/SIGTERM, :func:`stop_shards`, then
    let the signal propagate to :func:`recorded_ending`, which adopts what was committed."""
    try:
        yield
    except BaseException as exc:
        if _is_interrupt(exc):
            stop_shards(run_dir, futures)
        raise


@contextlib.contextmanager
def recorded_ending(plan: RunPlan, out_root: AnyPath, t0: float) -> Iterator[None]:
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
            note = end_abnormally(plan, "interrupted", f"{_signal_name(exc)} at {now_iso()}", t0, out_root)
            if note:
                log.warning("run %s: %s", plan.run_id, note)
            raise
        reason = str(exc) if isinstance(exc, OutputWriteError) else one_line(exc)
        note = end_abnormally(plan, "crashed", reason, t0, out_root)
        if isinstance(exc, OutputWriteError):  # the note joins the one line (no warning printed beside it)
            raise OutputWriteError(
                f"run {plan.run_id} crashed: {exc}; nothing is half-written (temp files removed, committed shards kept)"
                f"{'; ' + note if note else ''}; fix it (free space), then finish the run with "
                f"`{rerun_command(plan.run_id, out_root)}`",
                exc.path,
                exc.errno,
            ) from None
        if note:
            log.warning("run %s: %s", plan.run_id, note)
        raise
