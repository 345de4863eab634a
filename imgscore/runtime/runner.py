"""Task runners for a run: Prefect's thread pool, or Dask through prefect-dask.

``runner.type=thread`` runs shards on a ``ThreadPoolTaskRunner`` in the flow process.
``runner.type=dask`` runs them on Dask worker processes
(:class:`imgscore.runtime.dask_runner.ScoringDaskTaskRunner`, imported only then): a
``distributed.LocalCluster`` of ``runner.n_workers`` processes that the flow starts and stops,
or an existing scheduler at ``runner.address``.

Both flows (``score-images``, ``rerun-failed``) are decorated with :class:`ConfiguredTaskRunner`,
which builds one of those from the run's own ``config.runner`` when the first shard is
submitted. That is the only way a runner is chosen: a run started by ``imgscore run``, by a
deployment (``prefect deploy``, ``imgscore serve``) or by ``prefect flow-run retry`` uses the
runner its config names.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from imgscore.config.flow_params import raw_flow_config
from imgscore.config.running import RunnerConfig
from imgscore.config.schema import Config
from imgscore.errors import ConfigError
from imgscore.runtime.compat import PREFECT_IN_PROCESS_API_HOST


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
    return None if PREFECT_IN_PROCESS_API_HOST in url else url  # an in-process ASGI app has no address


def make_task_runner(cfg: RunnerConfig, warm_config: str | None = None) -> TaskRunner:
    """The task runner for ``runner`` config.

    ``thread``: a ``ThreadPoolTaskRunner`` of ``n_workers`` threads (1 by default: on a CPU-only
    machine one shard at a time uses every core through torch's own threads).
    ``dask``: a :class:`ScoringDaskTaskRunner` on ``address``, or on a ``LocalCluster`` of
    ``n_workers`` processes with ``threads_per_worker`` threads each (no dashboard) — the one
    ``imgscore run`` already started for this run when there is one
    (:func:`imgscore.runtime.dask_warm.current`). Shards are the unit of work; each worker process
    loads the model once, before its first shard when ``warm_config`` (the run's config JSON)
    is given (:mod:`imgscore.runtime.dask_warm`). Built inside the flow run, so the Dask workers
    get the flow's API URL (:func:`flow_api_url`).
    """
    if cfg.type == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.n_workers)
    try:  # importing prefect-dask and distributed costs start-up time: only for Dask runs (benchmarks/NOTES.md)
        from imgscore.runtime.dask_runner import ScoringDaskTaskRunner
    except ImportError as exc:  # pragma: no cover - prefect-dask is a dependency
        raise ConfigError(
            f"runner.type=dask needs prefect-dask and distributed ({exc}); pip install prefect-dask"
        ) from None
    url = flow_api_url()
    if cfg.address:
        return ScoringDaskTaskRunner(address=cfg.address, api_url=url, warm_config=warm_config)
    from imgscore.runtime import dask_warm

    early = dask_warm.current()
    if early is not None:  # started by the CLI before the flow, its workers warmed already
        return ScoringDaskTaskRunner(address=early.address(), api_url=url)
    return ScoringDaskTaskRunner(
        cluster_kwargs=dask_warm.local_cluster_kwargs(cfg), api_url=url, warm_config=warm_config
    )


class ConfiguredTaskRunner(TaskRunner[PrefectFuture[Any]]):
    """A task runner chosen by the flow run's own ``config.runner`` parameter.

    A flow's task runner is fixed when the flow is decorated, but a deployment's runs carry
    their configuration as parameters. This runner reads ``parameters["config"]["runner"]`` (or
    the file ``parameters["config_file"]`` names: ``imgscore.config.flow_params.flow_parameters``) of
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
            params = getattr(ctx, "parameters", None) or {}
            raw: Any = raw_flow_config(params) if params.get("config_file") else (params.get("config") or {})
            runner_raw = raw.get("runner", {}) if isinstance(raw, dict) else {}
            rc = RunnerConfig.model_validate(runner_raw)
            warm = json.dumps(raw) if isinstance(raw, dict) and raw.get("model") and rc.warm_workers else None
            self._inner = self._stack.enter_context(make_task_runner(rc, warm_config=warm))
        return self._inner

    def submit(self, task, parameters, wait_for=None, dependencies=None):  # untyped: TaskRunner.submit is overloaded
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


def workers_on_host(cfg: Config) -> int:
    """How many scoring processes share this machine's cores (for torch thread counts)."""
    return cfg.runner.n_workers if cfg.runner.type == "dask" and not cfg.runner.address else 1
