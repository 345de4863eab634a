"""Environment defaults applied before Prefect is imported, so users see none of its noise.

- ``PREFECT_SERVER_ANALYTICS_ENABLED=false``: offline, the temporary server's telemetry only
  prints "Failed to send telemetry" and sqlite "database is locked" tracebacks.
- ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120``: time for the temporary server to start.
- Prefect's console handler at WARNING: our CLI prints its own progress and summary; the flow
  and task run logs still reach the Prefect API (and the UI of a real server).
- Expected failures (error budget, a shard that cannot run) without Prefect's traceback on the
  terminal: :class:`ExpectedFailureFilter` (off with ``--verbose``).
Each environment value is a default: a value the user exported wins.
"""

import logging
import os


class ExpectedFailureFilter(logging.Filter):
    """Prefect's engines log the exception that ends a flow or task run at ERROR with its traceback.
    For the failures imgscore expects and reports itself — an ``ImgscoreError`` (error budget, bad
    input or model) or a ``ShardError`` (a shard that cannot run; its reason goes to the manifest)
    — the record drops to INFO without the traceback: it still reaches the Prefect API (the run's
    logs in the UI), not the terminal. So do Prefect's "Crash detected!" records after Ctrl-C.
    Anything else keeps its traceback. Not installed with ``--verbose``."""

    # Ctrl-C: the CLI prints its own line (exit 130 and the rerun command); Prefect's
    # "Crash detected!" records for the flow run and the cancelled task runs are expected then.
    INTERRUPT_MARKERS = ("aborted by an interrupt signal", "cancelled by the task runner")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and any(m in record.getMessage() for m in self.INTERRUPT_MARKERS):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            from imgscore.tasks.errors import ImgscoreError
            from imgscore.tasks.score import ShardError

            if isinstance(exc, ImgscoreError | ShardError):
                record.exc_info, record.exc_text = None, None
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_expected_failures(on: bool = True) -> None:
    """Install (once) or remove :class:`ExpectedFailureFilter` on Prefect's flow-run and task-run loggers."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        lg = logging.getLogger(name)
        mine = [f for f in lg.filters if isinstance(f, ExpectedFailureFilter)]
        if on and not mine:
            lg.addFilter(ExpectedFailureFilter())
        for f in mine if not on else []:
            lg.removeFilter(f)


def apply(verbose: bool = False) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server's first start migrates a new SQLite file: 20 s (Prefect's default) timed
    # out on a busy 2-core machine ("Timed out while attempting to connect to ephemeral Prefect API").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    quiet_expected_failures(on=not verbose)
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
