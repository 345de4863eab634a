"""Every private part of another library imgscore relies on, each behind one small adapter.

Each adapter is used in one place and pinned by a contract test (``tests/test_compat.py``) that
fails when an upgrade changes what it relies on; ``pyproject.toml`` pins the minor versions they
were written for (Prefect 3.9, prefect-dask 0.3, distributed 2026.8). To upgrade: raise the pin,
run ``pytest tests/test_compat.py``, and fix the adapter the failing test names.

Nothing here imports Prefect, Dask or torch at module level: the start-up code imports this
module before Prefect may be imported.
"""

from __future__ import annotations

import atexit
import sys
import threading

# -------------------------------------------------------------------- Prefect's temporary server

#: The uvicorn application and the environment Prefect 3.9's ``SubprocessASGIServer`` starts its
#: temporary API server with (``prefect/server/api/server.py``, ``_run_uvicorn_command``; the
#: ``PREFECT__SERVER_*`` variables are private). imgscore launches the same server itself, from a
#: helper process, so that it boots while this process imports torch (``imgscore.runtime.server``).
PREFECT_SERVER_APP = "prefect.server.api.server:create_app"
PREFECT_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def prefect_server_command(python: str, prefect_dir: str, port: int) -> list[str]:
    """The temporary server's command line, as ``SubprocessASGIServer`` builds it, plus a 3 s
    graceful-shutdown limit (uvicorn otherwise waits for this process's open connections)."""
    return [
        python,
        "-m",
        "uvicorn",
        "--app-dir",
        prefect_dir,
        "--factory",
        PREFECT_SERVER_APP,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
        "--timeout-graceful-shutdown",
        "3",
    ]


def prefect_server_env(environ: dict[str, str], settings_env: dict[str, str]) -> dict[str, str]:
    """The temporary server's environment: ours, Prefect's current settings
    (``Settings.to_environment_variables(exclude_unset=True)``, public) and the private markers."""
    return {**environ, **PREFECT_SERVER_ENV, **settings_env}


#: The host of the base URL Prefect's client gives an API served in-process (an ASGI app, no
#: socket: ``prefect/client/orchestration/__init__.py``); no other process can reach it.
PREFECT_IN_PROCESS_API_HOST = "ephemeral-prefect"


# ------------------------------------------------------------------ Prefect's log and event queues


def drain_prefect_services(timeout: float = 30.0) -> None:
    """Send this process's queued Prefect logs and events now (``APILogWorker`` and
    ``EventsWorker``'s ``drain_all``, an internal of ``prefect._internal.concurrency``).

    Used on each Dask worker before its cluster closes (its nanny otherwise kills it while it
    sends them from exit handlers, and the last task-run events are lost) and before the
    temporary server stops (logging's own exit handler would send the last logs to a server
    already gone, and wait 5 s for it). Runs in a plain thread: inside an event loop
    ``drain_all`` returns an un-awaited coroutine instead of draining.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    def drain() -> None:
        for service in (APILogWorker, EventsWorker):
            service.drain_all(timeout=timeout)

    t = threading.Thread(target=drain, name="imgscore-drain-prefect", daemon=True)
    t.start()
    t.join(2 * timeout + 5)


# ------------------------------------------------------------------ log messages filtered by text

#: Prefect's messages for a run ended by Ctrl-C or SIGTERM: the flow run's state messages
#: (``prefect/states.py``) and a task run cancelled with it (``prefect/task_engine.py``).
PREFECT_INTERRUPT_MESSAGES = (
    "aborted by an interrupt signal",
    "cancelled by the task runner",
    "aborted by a termination signal",
)

#: Prefect's state message for a task run that raised (``prefect/task_engine.py``), followed by
#: `` ExceptionType: message`` in the ERROR record "Finished in state Failed('…')".
PREFECT_TASK_EXCEPTION_MESSAGE = "Task run encountered an exception"

#: Prefect's state message for a flow run that raised (``prefect/flow_engine.py``), followed by
#: `` ExceptionType: message``; the notification's ``message`` starts after it.
PREFECT_FLOW_EXCEPTION_MESSAGE = "Flow run encountered an exception:"

#: distributed's nanny, when a worker process outlives its close (``distributed/nanny.py``).
NANNY_KILL_MESSAGE = "still alive after"

#: distributed's worker when one heartbeat to the scheduler times out (``Worker.heartbeat`` in
#: ``distributed/worker.py``, logged with ``logger.exception``: ERROR and a traceback). The next
#: heartbeat normally gets through; on a busy machine the run still ends well.
HEARTBEAT_FAILED_MESSAGE = "Failed to communicate with scheduler during heartbeat"


# ---------------------------------------------------------------------------- interpreter exit


def run_exit_handlers() -> None:
    """Run the ``atexit`` handlers now, once (``atexit._run_exitfuncs``, private but present
    since Python 3.0), so the caller can ``os._exit`` without the interpreter's teardown of
    torch and Prefect modules (seconds of work for nothing: benchmarks/NOTES.md, "Start-up and
    exit") and still stop the temporary server, close a Dask cluster and join multiprocessing
    children."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


# -------------------------------------------------------------------- torch's DataLoader SIGCHLD handler


def no_dataloader_sigchld_handler() -> None:
    """Keep torch from installing its DataLoader SIGCHLD handler in this process.

    torch installs it (``torch/utils/data/_utils/signal_handling.py``, ``_set_SIGCHLD_handler``,
    guarded by the private ``_SIGCHLD_handler_set``) when a multi-worker DataLoader is first
    iterated on the main thread. From then on a DataLoader worker of *any* loader in the process
    that exits with an error raises ``RuntimeError`` in the main thread, wherever it is — while the
    flow waits on its shards — so one dead worker of one shard ended the whole run as crashed.
    Each loader still finds its own dead workers (it checks their status while it waits for a
    batch) and the shard fails and is retried as designed (``imgscore.inference.loader``).
    """
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True
