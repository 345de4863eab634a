"""Start-up and teardown of an ``imgscore`` command, in one place and in one order.

:func:`session` is entered once, by ``imgscore.flows.cli.main``; inside it:

1. **environment defaults** (:data:`ENV_DEFAULTS`, and Prefect's console at WARNING unless
   ``--verbose``), set before Prefect is imported; each is a default, a value the user exported
   wins;
2. **logging**: the ``imgscore`` logger, and :class:`ExpectedFailureFilter` on Prefect's run
   loggers, so expected failures reach the terminal as one line of ours, not a traceback;
3. the command does its cheap checks, then :meth:`Session.start_server` launches Prefect's
   temporary server in the background (:mod:`imgscore.runtime.server`), then the command imports
   torch and loads the model while the server boots;
4. :meth:`Session.import_prefect` exports the server's URL as ``PREFECT_API_URL``, imports the
   Prefect side of the command (the flow module) while the server finishes booting, and waits
   until it answers — the one place Prefect gets imported, so importing the CLI imports none of it;
5. on the way out, whatever happened (Ctrl-C included): Prefect's queued logs and events are
   sent, and the server is stopped.

The one start-up timeout is :data:`STARTUP_TIMEOUT_S` (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
overrides it, for our launcher and for Prefect's own).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

from imgscore.runtime.compat import PREFECT_INTERRUPT_MESSAGES, PREFECT_TASK_EXCEPTION_MESSAGE
from imgscore.runtime.server import ServerStartError, TemporaryServer, start_watchdog

if TYPE_CHECKING:  # Prefect is imported by Session.import_prefect, never with this module
    from prefect.server.api.server import SubprocessASGIServer

__all__ = ["ExpectedFailureFilter", "ServerStartError", "Session", "session", "startup_timeout"]

# The temporary server's first start migrates a new SQLite file, which on a busy machine can take
# longer than Prefect's 20 s default (benchmarks/NOTES.md, "Start-up and exit").
STARTUP_TIMEOUT_S = 180.0
ENV_DEFAULTS = {
    # offline, the temporary server's telemetry only prints "Failed to send telemetry"
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's client-side telemetry: its first-run notice on the terminal and ~/.prefect/.sdk_telemetry/
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(int(STARTUP_TIMEOUT_S)),
}
# Our CLI prints its own progress and summary; run logs still reach the Prefect API (and the UI).
QUIET_ENV = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL": "WARNING",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL": "WARNING",
}


def startup_timeout() -> float:
    """Seconds to wait for the temporary server: the environment's value, else :data:`STARTUP_TIMEOUT_S`."""
    try:
        return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", STARTUP_TIMEOUT_S))
    except ValueError:
        return STARTUP_TIMEOUT_S


#: The state message of a shard task run that a SIGINT/SIGTERM stopped (``imgscore.tasks.score_shard.stopped``):
#: Prefect logs its "Finished in state Cancelled(…)" at ERROR; the CLI's own line says the run was interrupted.
SHARD_STOPPED_MESSAGE = "the run is stopping (SIGINT/SIGTERM); not scored"

#: ``extra=`` for a flow-run log record that the CLI's summary repeats (a drift warning): it goes
#: to the Prefect API, not to the terminal, unless ``--verbose``.
IN_SUMMARY = {"imgscore_in_summary": True}


class ExpectedFailureFilter(logging.Filter):
    """Prefect's engines log the exception that ends a flow or task run at ERROR with its traceback.
    For the failures imgscore expects and reports itself — an ``ImgscoreError`` (error budget, bad
    input or model) or a ``ShardError`` (a shard that cannot run; its reason goes to the manifest)
    — the record drops to INFO without the traceback: it still reaches the Prefect API (the run's
    logs in the UI), not the terminal. So do Prefect's "Crash detected!" records after Ctrl-C or SIGTERM
    (matched by their text, :data:`imgscore.runtime.compat.PREFECT_INTERRUPT_MESSAGES`), and a task
    run's "Finished in state Failed('Task run encountered an exception OutputWriteError: …')" for
    those same expected errors (:func:`_expected_task_failure`): a full disk is then one line, not
    one per shard. So do a shard's "Finished in state Cancelled('…')" after Ctrl-C or SIGTERM
    (:data:`SHARD_STOPPED_MESSAGE`) and warnings the CLI's summary repeats (logged with
    :data:`IN_SUMMARY`, e.g. drift). Anything else keeps its traceback. Not installed with ``--verbose``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and (
            any(m in record.getMessage() for m in (*PREFECT_INTERRUPT_MESSAGES, SHARD_STOPPED_MESSAGE))
            or _expected_task_failure(record.getMessage())
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        if record.levelno >= logging.WARNING and getattr(record, "imgscore_in_summary", False):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            from imgscore.errors import ImgscoreError, ShardError

            if isinstance(exc, ImgscoreError | ShardError):
                record.exc_info, record.exc_text = None, None
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _expected_task_failure(message: str) -> bool:
    """Whether ``message`` is Prefect's line for a task run that raised one of imgscore's own
    errors (an ``ImgscoreError`` or ``ShardError`` subclass, by the type name Prefect writes)."""
    head, sep, rest = message.partition(PREFECT_TASK_EXCEPTION_MESSAGE + " ")
    if not sep:
        return False
    from imgscore.errors import ImgscoreError, ShardError, type_names

    return rest.split(":", 1)[0] in type_names(ImgscoreError, ShardError)


VERBOSE_ENV = "IMGSCORE_VERBOSE"  # set by `--verbose`; read where no session exists (a deployment's flow run)


def quiet_unless_verbose() -> None:
    """Install :class:`ExpectedFailureFilter` unless ``--verbose`` asked for tracebacks. Called
    when the flow modules are imported, so a deployment's flow run (``python -m prefect.engine``
    under a worker, no ``imgscore`` session) logs an expected failure as one line too."""
    quiet_expected_failures(on=os.environ.get(VERBOSE_ENV) != "1")


def quiet_expected_failures(on: bool = True) -> None:
    """Install (once) or remove :class:`ExpectedFailureFilter` on Prefect's flow-run and task-run loggers."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        lg = logging.getLogger(name)
        mine = [f for f in lg.filters if isinstance(f, ExpectedFailureFilter)]
        if on and not mine:
            lg.addFilter(ExpectedFailureFilter())
        for f in mine if not on else []:
            lg.removeFilter(f)


class Session:
    """One command's Prefect session: whether and when the temporary server starts, the moment
    Prefect is imported, and the teardown. ``manage_server=False`` (library use, tests) leaves
    the server to Prefect: :meth:`import_prefect` then only imports."""

    def __init__(self, verbose: bool = False, manage_server: bool = True) -> None:
        self.verbose = verbose
        self.manage_server = manage_server
        self.server: TemporaryServer | None = None
        self._fallback: SubprocessASGIServer | None = None  # Prefect's own server, when Prefect was imported first

    @property
    def temporary_api_url(self) -> str | None:
        """The URL of the temporary server this session started (None: none, or not known yet);
        tells it from a configured server that other shells can reach."""
        return self.server.url if self.server is not None else None

    def start_server(self) -> None:
        """Launch the temporary server in the background now, if this command will need one.

        Returns at once. Does nothing when ``PREFECT_API_URL`` is in the environment, when
        Prefect is already imported (:meth:`import_prefect` then starts Prefect's own
        ``SubprocessASGIServer``), or when the session does not manage the server. Idempotent.
        """
        if (
            not self.manage_server
            or self.server is not None
            or os.environ.get("PREFECT_API_URL")
            or "prefect" in sys.modules
        ):
            return
        self.server = TemporaryServer.launch(verbose=self.verbose)

    def export_api_url(self) -> str | None:
        """Export the temporary server's URL as ``PREFECT_API_URL`` (blocks until the launcher has
        read Prefect's settings); call before Prefect is imported. None: no temporary server."""
        if self.server is None:
            return None
        url = self.server.read_url(timeout=startup_timeout())
        if url:
            os.environ["PREFECT_API_URL"] = url
        return url

    def import_prefect(self, module: str) -> ModuleType:
        """Import ``module`` (the Prefect side of the command) with the server's URL in place, and
        return it once the server answers.

        Raises:
            ServerStartError: the temporary server did not come up.
        """
        self.start_server()
        url = self.export_api_url()
        mod = importlib.import_module(module)  # overlaps the server's last seconds of booting
        if url and self.server is not None:  # a URL comes only from a server this session launched
            self.server.wait_ready(startup_timeout())
        elif self.manage_server and self.server is None:
            self._use_prefects_own_server()
        return mod

    def _use_prefects_own_server(self) -> None:
        """Prefect was imported before the session could launch a server (a library call): start
        Prefect's own temporary server now, under the watchdog, unless an API is configured."""
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

        if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
            return
        from prefect.server.api.server import SubprocessASGIServer

        start_watchdog()
        fallback = SubprocessASGIServer()  # the per-process instance that get_client() reuses
        fallback.start()
        self._fallback = fallback

    def close(self) -> None:
        """Send queued Prefect logs and events, stop the temporary server (idempotent)."""
        if self.server is not None:
            self.server.stop()


@contextlib.contextmanager
def session(verbose: bool = False) -> Iterator[Session]:
    """The command's start-up and teardown, in order (module docstring)."""
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    was_verbose = os.environ.get(VERBOSE_ENV)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # the flow modules keep their tracebacks (quiet_unless_verbose)
    if not verbose:
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
    quiet_expected_failures(on=not verbose)
    ours = logging.getLogger("imgscore")
    if not ours.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(h)
    ours.setLevel(logging.DEBUG if verbose else logging.WARNING)
    s = Session(verbose)
    try:
        yield s
    finally:
        s.close()
        if was_verbose is None:
            os.environ.pop(VERBOSE_ENV, None)
        else:
            os.environ[VERBOSE_ENV] = was_verbose
