"""``runner.type=dask``: prefect-dask's ``DaskTaskRunner`` made fit for scoring.

Imported only when a run asks for Dask (``imgscore.runtime.runner.make_task_runner``): importing
prefect-dask and distributed is start-up time a thread-runner run has no use for
(benchmarks/NOTES.md, "Start-up and exit"). Uses
only prefect-dask's public surface (constructor arguments, ``client``, ``submit``,
``duplicate``, the context manager); ``tests/test_compat.py`` pins it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner
from prefect_dask.client import PrefectDaskClient

from imgscore.runtime.compat import drain_prefect_services
from imgscore.runtime.dask_warm import NannyKillToDebug, WarmWorkers, local_cluster_config


class ScoringDaskTaskRunner(DaskTaskRunner):
    """``DaskTaskRunner`` whose workers report to the flow's Prefect API and may fork.

    Two faults seen with a plain ``DaskTaskRunner``, fixed here:

    - Without ``PREFECT_API_URL`` every worker process started a temporary Prefect server of
      its own. Each task run is submitted with the flow's API URL (``api_url``) in its
      serialized settings (the workers then use the flow's server), and a ``LocalCluster``
      started here also gets it in its workers' environment.
    - Worker processes are daemonic, so ``DataLoader(num_workers>0)`` inside them failed
      ("daemonic processes are not allowed to have children"). A ``LocalCluster`` started
      here runs non-daemonic workers (``distributed.worker.daemon=False`` for the runner's
      lifetime, so a restarted worker is non-daemonic too), with the longer comm timeouts and
      the quiet heartbeat of ``imgscore.runtime.dask_warm.local_cluster_config``. Workers of a cluster we do not
      control fall back to decoding in-process (``imgscore.inference.device.loader_workers``).
    """

    def __init__(self, *args: Any, api_url: str | None = None, warm_config: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.api_url = api_url
        self.warm_config = warm_config  # the run's config JSON: workers warm up for its model (WarmWorkers)
        self._warm_registered = False
        self.owns_cluster = not self.address  # prefect-dask starts a LocalCluster on first use
        if self.owns_cluster and api_url:
            self.cluster_kwargs = {
                **self.cluster_kwargs,
                "env": {**self.cluster_kwargs.get("env", {}), "PREFECT_API_URL": api_url},
            }
        self._scoring_stack = contextlib.ExitStack()
        self._used = False

    def duplicate(self) -> ScoringDaskTaskRunner:
        """A fresh copy with the same settings and API URL."""
        if self.address:
            return type(self)(
                address=self.address,
                client_kwargs=self.client_kwargs,
                api_url=self.api_url,
                warm_config=self.warm_config,
            )
        return type(self)(
            cluster_kwargs=self.cluster_kwargs,
            client_kwargs=self.client_kwargs,
            api_url=self.api_url,
            warm_config=self.warm_config,
        )

    @property
    def client(self) -> PrefectDaskClient:
        """The Dask client (prefect-dask creates it, and the cluster, on first use); when it is new
        and ``warm_config`` is set, every worker is warmed for the run's model (:class:`WarmWorkers`)."""
        client = super().client
        if self.warm_config and not self._warm_registered:
            self._warm_registered = True
            n = int(self.cluster_kwargs.get("n_workers") or 1) if self.owns_cluster else 1
            client.register_plugin(WarmWorkers(self.warm_config, n))
        return client

    def __enter__(self) -> ScoringDaskTaskRunner:
        self._scoring_stack.__enter__()
        if self.owns_cluster:
            import dask

            self._scoring_stack.enter_context(dask.config.set(local_cluster_config()))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        """Flush the workers' Prefect logs and events, then stop the cluster we started.

        Shards have committed their part files and the workers' Prefect events are sent, so a
        worker that is slow to exit (interpreter teardown on a busy machine) loses nothing
        when its nanny kills it; that kill is logged at DEBUG instead of on the terminal.
        """
        quiet = None
        if self._used and self.owns_cluster:
            try:
                self.client.run(drain_prefect_services)
                quiet = NannyKillToDebug()
                logging.getLogger("distributed.nanny").addFilter(quiet)
            except Exception as err:  # shutting down anyway; the nanny's kill is the fallback
                self.logger.debug("could not drain Prefect services on the workers: %s", err)
        try:
            super().__exit__(*exc)
        finally:
            self._scoring_stack.__exit__(*exc)
            if quiet is not None:
                logging.getLogger("distributed.nanny").removeFilter(quiet)

    def submit(self, task, parameters, wait_for=None, dependencies=None):  # untyped: TaskRunner.submit is overloaded
        """Submit one task run; its serialized settings carry the flow's API URL."""
        self._used = True
        url = None if PREFECT_API_URL.value() else self.api_url
        guard = temporary_settings(updates={PREFECT_API_URL: url}) if url else contextlib.nullcontext()
        with guard:
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
