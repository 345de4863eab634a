"""Task runners for a run: Prefect's thread pool, or Dask through prefect-dask.

``runner.type=thread`` runs shards on a ``ThreadPoolTaskRunner`` in the flow process.
``runner.type=dask`` runs them on Dask worker processes (:class:`ScoringDaskTaskRunner`): a
``distributed.LocalCluster`` of ``runner.n_workers`` processes that the flow starts and stops,
or an existing scheduler at ``runner.address``.

The scoring flow is decorated with :class:`ConfiguredTaskRunner`, which builds one of those from
the run's own ``config.runner`` when the first shard is submitted — so a run started by a
deployment (``prefect deploy``, ``imgscore serve``) uses Dask exactly like ``imgscore run``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.server_guard import drain_prefect_services
from tasks.config import RunnerConfig

try:
    from prefect_dask import DaskTaskRunner
except ImportError:  # pragma: no cover - prefect-dask is a dependency; kept importable without it
    DaskTaskRunner = None  # type: ignore[assignment,misc]


def flow_api_url() -> str | None:
    """The Prefect API this flow run talks to, as a URL other processes can reach.

    ``PREFECT_API_URL`` when set (a real server, or the test harness). Without it Prefect started
    a temporary server for this process; its URL is read from the flow run's client. ``None``
    outside a flow run, or for an in-process API that no other process can reach.
    """
    configured = PREFECT_API_URL.value()
    if configured:
        return configured
    ctx = FlowRunContext.get()
    client = getattr(ctx, "client", None)
    if client is None:
        return None
    url = str(client.api_url).rstrip("/")
    return None if "ephemeral-prefect" in url else url  # an in-process ASGI app has no address


class _NannyKillToDebug(logging.Filter):
    """Turns the nanny's "Worker process still alive after N seconds, killing" into DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "still alive after" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


if DaskTaskRunner is not None:

    class ScoringDaskTaskRunner(DaskTaskRunner):
        """``DaskTaskRunner`` whose workers report to the flow's Prefect API and may fork.

        Two field faults on plain ``DaskTaskRunner`` (CASES.md, Orchestration), fixed here:

        - Without ``PREFECT_API_URL`` every worker process started a temporary Prefect server of
          its own. Each task run is submitted with the flow's API URL in its serialized settings
          (the workers then use the flow's server), and a ``LocalCluster`` started here also gets
          it in its workers' environment.
        - Worker processes are daemonic, so ``DataLoader(num_workers>0)`` inside them failed
          ("daemonic processes are not allowed to have children"). A ``LocalCluster`` started
          here runs non-daemonic workers (``distributed.worker.daemon=False`` for the runner's
          lifetime, so a restarted worker is non-daemonic too). Workers of a cluster we do not
          control fall back to decoding in-process (``tasks.device.loader_workers``).
        """

        @property
        def client(self):  # noqa: D401 - property of the parent class
            """The Dask client; starts the ``LocalCluster`` on first use (inside the flow run)."""
            if self._client is None and self._cluster is None and not self.address:
                import dask

                self._owns_cluster = True
                self._exit_stack.enter_context(dask.config.set({"distributed.worker.daemon": False}))
                url = flow_api_url()
                if url:
                    env = {**self.cluster_kwargs.get("env", {}), "PREFECT_API_URL": url}
                    self.cluster_kwargs = {**self.cluster_kwargs, "env": env}
            return super().client

        def __exit__(self, *exc: Any) -> None:
            """Flush the workers' Prefect logs and events, then stop the cluster we started.

            Shards have committed their part files and the workers' Prefect events are sent, so a
            worker that is slow to exit (interpreter teardown on a busy machine) loses nothing
            when its nanny kills it; that kill is logged at DEBUG instead of on the terminal.
            """
            quiet = None
            if self._client is not None and getattr(self, "_owns_cluster", False):
                try:
                    self._client.run(drain_prefect_services)
                    quiet = _NannyKillToDebug()
                    logging.getLogger("distributed.nanny").addFilter(quiet)
                except Exception as err:  # shutting down anyway; the nanny's kill is the fallback
                    self.logger.debug("could not drain Prefect services on the workers: %s", err)
            try:
                super().__exit__(*exc)
            finally:
                if quiet is not None:
                    logging.getLogger("distributed.nanny").removeFilter(quiet)

        def submit(self, task, parameters, wait_for=None, dependencies=None):
            """Submit one task run; its serialized settings carry the flow's API URL."""
            url = None if PREFECT_API_URL.value() else flow_api_url()
            guard = temporary_settings(updates={PREFECT_API_URL: url}) if url else contextlib.nullcontext()
            with guard:
                return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)


def make_task_runner(cfg: RunnerConfig) -> TaskRunner:
    """The task runner for ``runner`` config.

    ``thread``: a ``ThreadPoolTaskRunner`` of ``n_workers`` threads (1 by default: on a CPU-only
    machine one shard at a time uses every core through torch's own threads).
    ``dask``: a :class:`ScoringDaskTaskRunner` on ``address``, or on a ``LocalCluster`` of
    ``n_workers`` processes with ``threads_per_worker`` threads each (no dashboard). Shards are
    the unit of work; each worker process loads the model once.
    """
    if cfg.type == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.n_workers)
    if DaskTaskRunner is None:  # pragma: no cover
        from tasks.errors import ConfigError

        raise ConfigError("runner.type=dask needs prefect-dask: pip install prefect-dask")
    if cfg.address:
        return ScoringDaskTaskRunner(address=cfg.address)
    return ScoringDaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.n_workers,
            "threads_per_worker": cfg.threads_per_worker,
            "processes": True,
            "dashboard_address": None,
        }
    )


class ConfiguredTaskRunner(TaskRunner):
    """A task runner chosen by the flow run's own ``config.runner`` parameter.

    A flow's task runner is fixed when the flow is decorated, but a deployment's runs carry
    their configuration as parameters. This runner reads ``parameters["config"]["runner"]`` of
    the current flow run when the first task is submitted, builds the runner
    :func:`make_task_runner` would, and hands every submission to it; it stops that runner
    (and any ``LocalCluster``) when the flow run ends. Outside a flow run, or with no ``config``
    parameter, the default ``RunnerConfig()`` (one thread) is used.
    """

    def __init__(self) -> None:
        super().__init__()
        self._inner: TaskRunner | None = None
        self._stack = contextlib.ExitStack()

    @property
    def inner(self) -> TaskRunner | None:
        """The runner in use, once the first task has been submitted."""
        return self._inner

    def duplicate(self) -> ConfiguredTaskRunner:
        """A fresh, unstarted copy (Prefect duplicates the flow's runner for each flow run)."""
        return type(self)()

    def _resolve(self) -> TaskRunner:
        if self._inner is None:
            ctx = FlowRunContext.get()
            raw: Any = (getattr(ctx, "parameters", None) or {}).get("config") or {}
            runner_raw = raw.get("runner", {}) if isinstance(raw, dict) else {}
            self._inner = self._stack.enter_context(make_task_runner(RunnerConfig.model_validate(runner_raw)))
        return self._inner

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        """Submit to the runner that ``config.runner`` names (built on first use)."""
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        return self._resolve().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    def __enter__(self) -> ConfiguredTaskRunner:
        super().__enter__()
        self._stack.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._stack.__exit__(*exc)
        finally:
            self._inner = None
            self._stack = contextlib.ExitStack()
            super().__exit__(*exc)
