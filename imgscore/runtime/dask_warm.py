"""Dask workers that are ready before the first shard: an early cluster and a warm-up plugin.

A Dask worker process starts bare: on its first shard it imported torch, torchvision, Prefect's
task engine and imgscore, loaded the model and built the backend — most of a short flow's time
on small images (benchmarks/NOTES.md, "Dask workers"), while the flow process had done all of
that already. Two pieces move that work off the critical path:

- :class:`WarmWorkers`, a ``distributed.WorkerPlugin``: on each worker (those there now and any
  that join or restart) a background thread imports what a shard imports, loads the run's model
  into the per-process cache (``imgscore.inference.model.load_model``), folds it and builds its
  backend (ONNX export read from the cache, runtime session) — so the first shard finds it all.
- :class:`EarlyCluster`: ``imgscore run`` with ``runner.type=dask`` (and no ``runner.address``)
  starts its ``LocalCluster`` in a background thread right after the cheap checks, before it
  imports torch and loads the model itself; the workers warm up while the command does its own
  start-up, and the flow's task runner connects to that cluster (:func:`current`). Runs started
  by a deployment start the cluster at their first shard, and the plugin still warms the workers.

Imports only ``distributed`` (never Prefect), so the CLI can start the cluster before Prefect is
imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import WorkerPlugin

if TYPE_CHECKING:
    from distributed import Client, LocalCluster, Worker

    from imgscore.config.running import RunnerConfig
    from imgscore.config.schema import Config

log = logging.getLogger("imgscore")

WARM_STATE: dict[str, Any] = {}  # in a worker process: {"started": t, "finished": t, "error": str} of its warm-up


def warm_process(config_json: str, workers_on_host: int = 1) -> dict[str, Any]:
    """Do in this process what a shard does before its first batch, for ``config_json``'s model.

    Imports torch, torchvision, Prefect's task engine and imgscore's scoring modules; on a CPU
    device, loads the model (cached per process), folds conv-BN when configured and builds the
    backend's forward for this worker's core share. GPU devices are only imported for: which
    GPU is this worker's is decided by its rank when the shard runs. Returns :data:`WARM_STATE`.
    """
    WARM_STATE.update({"started": time.time(), "pid": os.getpid()})
    try:
        import prefect.task_engine  # noqa: F401 - what the first shard task run imports
        import torch

        import imgscore.inference.score  # noqa: F401
        from imgscore.config.schema import Config
        from imgscore.inference.backends.auto import resolve_backend
        from imgscore.inference.backends.factory import make_forward
        from imgscore.inference.device import resolve_device, usable_cores
        from imgscore.inference.model import load_model

        cfg = Config.model_validate_json(config_json)
        inf = cfg.inference
        device = resolve_device(inf.device, 0)
        if device.type == "cpu":
            for i, mcfg in enumerate(cfg.scored_models()):  # several models: each is loaded and warmed
                lm = load_model(
                    mcfg, cfg.preprocess_for(mcfg), device, channels_last=inf.channels_last, cache_dir=inf.cache_dir
                )
                if inf.fold_bn:
                    lm = lm.folded()
                share = inf.num_threads or max(1, usable_cores() // max(1, workers_on_host))
                batch = inf.batch_size if isinstance(inf.batch_size, int) else 32
                backend = resolve_backend(
                    lm, inf.backend, inf.precision, share, batch, inf.cache_dir, inf.channels_last
                )
                fwd = make_forward(lm, backend, inf.precision, share, inf.cache_dir, inf.channels_last)
                with torch.inference_mode():  # first call: kernels/primitives for the input size
                    x = torch.zeros(2, 3, lm.preprocess.crop, lm.preprocess.crop)
                    fwd(x.contiguous(memory_format=torch.channels_last) if fwd.channels_last else x)
                if i == 0:
                    WARM_STATE.update({"model_id": lm.model_id, "backend": backend})
    except Exception as exc:  # the shard will meet (and report) the same problem itself
        WARM_STATE["error"] = f"{type(exc).__name__}: {exc}"
    WARM_STATE["finished"] = time.time()
    return WARM_STATE


class WarmWorkers(WorkerPlugin):
    """Warm every worker for one run's config (:func:`warm_process`) in a background thread, so
    the worker answers the scheduler while it warms and a shard that arrives early simply waits
    on the same import and model-cache locks."""

    name = "imgscore-warm"

    def __init__(self, config_json: str, workers_on_host: int = 1) -> None:
        self.config_json = config_json
        self.workers_on_host = workers_on_host

    def setup(self, worker: Worker) -> None:
        WARM_STATE.clear()
        WARM_STATE["registered"] = time.time()
        threading.Thread(
            target=warm_process, args=(self.config_json, self.workers_on_host), name="imgscore-warm", daemon=True
        ).start()


class EarlyCluster:
    """A ``LocalCluster`` started in a background thread, its workers warmed by :class:`WarmWorkers`.

    The workers are non-daemonic (their DataLoader may fork, as in
    ``imgscore.runtime.dask_runner``) and report to the Prefect API at ``api_url()`` (called in
    the background thread; it blocks until the temporary server's URL is known).
    :meth:`address` waits for the scheduler; :meth:`close` drains the workers' Prefect logs and
    events, then stops the cluster.
    """

    def __init__(self, cluster_kwargs: dict[str, Any], config_json: str, api_url: Callable[[], str | None]) -> None:
        self._kwargs, self._config_json, self._api_url = cluster_kwargs, config_json, api_url
        self._cluster: LocalCluster | None = None
        self._client: Client | None = None
        self._error: BaseException | None = None
        self.started_at = time.perf_counter()
        self.ready_s: float | None = None
        self._thread = threading.Thread(target=self._start, name="imgscore-early-cluster", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            import dask
            from distributed import Client, LocalCluster

            url = self._api_url()
            kwargs = dict(self._kwargs)
            if url:
                kwargs["env"] = {**kwargs.get("env", {}), "PREFECT_API_URL": url}
            with dask.config.set(local_cluster_config()):
                self._cluster = LocalCluster(**kwargs)
            self._client = Client(self._cluster, set_as_default=False)  # never found by distributed.get_client()
            self._client.register_plugin(WarmWorkers(self._config_json, int(kwargs.get("n_workers") or 1)))
            self.ready_s = round(time.perf_counter() - self.started_at, 3)
        except BaseException as exc:  # reported by address(); the run then fails like a cluster that cannot start
            self._error = exc

    def address(self, timeout: float = 600) -> str:
        """The scheduler's address, once the cluster is up.

        Raises:
            RuntimeError: the cluster could not start (the cause is chained).
        """
        self._thread.join(timeout)
        if self._error is not None or self._cluster is None:
            raise RuntimeError(f"the Dask cluster could not start: {self._error}") from self._error
        return self._cluster.scheduler_address

    def close(self) -> None:
        """Drain the workers' Prefect logs and events, then stop the cluster (idempotent)."""
        self._thread.join()
        if self._client is not None:
            from imgscore.runtime.compat import drain_prefect_services

            with contextlib.suppress(Exception):  # shutting down anyway: the nanny's kill is the fallback
                self._client.run(drain_prefect_services)
            with contextlib.suppress(Exception):
                self._client.close()
        if self._cluster is not None:
            quiet = NannyKillToDebug()  # the workers' Prefect logs and events are sent: a slow exit loses nothing
            logging.getLogger("distributed.nanny").addFilter(quiet)
            try:
                with contextlib.suppress(Exception):
                    self._cluster.close()
            finally:
                logging.getLogger("distributed.nanny").removeFilter(quiet)
        self._client = self._cluster = None


#: Comm timeouts for a cluster imgscore starts on this machine (distributed's default is 30 s).
#: Every process of it shares this machine's cores with the scoring, so on a busy machine a
#: worker's heartbeat can outlast the default and print a traceback in a run that ends well
#: (benchmarks/NOTES.md, "Dask workers").
LOCAL_COMM_TIMEOUT = "120s"


def local_cluster_config() -> dict[str, Any]:
    """Dask config for a ``LocalCluster`` imgscore starts (the Nanny hands it to every worker
    process, restarted ones too): non-daemonic workers (their DataLoader may fork), longer comm
    timeouts (:data:`LOCAL_COMM_TIMEOUT`), and this module as a worker preload, whose
    :func:`dask_setup` keeps a failed heartbeat off the terminal."""
    import dask

    preload = [p for p in dask.config.get("distributed.worker.preload", []) or [] if p != __name__]
    return {
        "distributed.worker.daemon": False,
        "distributed.comm.timeouts.connect": LOCAL_COMM_TIMEOUT,
        "distributed.comm.timeouts.tcp": LOCAL_COMM_TIMEOUT,
        "distributed.worker.preload": [*preload, __name__],
    }


class UnderLoadToDebug(logging.Filter):
    """Turns distributed's worker "Failed to communicate with scheduler during heartbeat" (ERROR
    with a traceback, :data:`imgscore.runtime.compat.HEARTBEAT_FAILED_MESSAGE`) into a DEBUG line
    without the traceback: a late heartbeat on a busy machine, which the next one makes good;
    a worker that is really lost fails its shard, and the run says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        from imgscore.runtime.compat import HEARTBEAT_FAILED_MESSAGE

        if record.levelno > logging.DEBUG and record.getMessage().startswith(HEARTBEAT_FAILED_MESSAGE):
            cause = record.exc_info[1] if record.exc_info else None
            record.msg, record.args = (
                f"{HEARTBEAT_FAILED_MESSAGE} ({type(cause).__name__ if cause else 'no cause'}); the next one retries",
                None,
            )
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class NannyKillToDebug(logging.Filter):
    """Turns the nanny's "Worker process still alive after N seconds, killing" into DEBUG: at the
    end of a run, once the workers' Prefect logs and events are sent, a worker slow to exit
    (interpreter teardown on a busy machine) loses nothing when it is killed."""

    def filter(self, record: logging.LogRecord) -> bool:
        from imgscore.runtime.compat import NANNY_KILL_MESSAGE

        if record.levelno == logging.WARNING and NANNY_KILL_MESSAGE in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def dask_setup(worker: Worker) -> None:
    """Worker preload (:func:`local_cluster_config`): install :class:`UnderLoadToDebug` on the
    worker's logger, unless ``--verbose`` (``IMGSCORE_VERBOSE=1``, inherited from the command)."""
    if os.environ.get("IMGSCORE_VERBOSE") == "1":
        return
    lg = logging.getLogger("distributed.worker")
    if not any(isinstance(f, UnderLoadToDebug) for f in lg.filters):
        lg.addFilter(UnderLoadToDebug())


def local_cluster_kwargs(runner_cfg: RunnerConfig) -> dict[str, Any]:
    """``LocalCluster`` arguments for ``runner`` config (as ``imgscore.runtime.runner`` makes them)."""
    return {
        "n_workers": runner_cfg.n_workers,
        "threads_per_worker": runner_cfg.threads_per_worker,
        "processes": True,
        "dashboard_address": None,
    }


_CURRENT: EarlyCluster | None = None


def current() -> EarlyCluster | None:
    """The cluster this process started early for its run (:func:`early_cluster`), if any."""
    return _CURRENT


@contextlib.contextmanager
def early_cluster(cfg: Config, api_url: Callable[[], str | None]) -> Iterator[EarlyCluster]:
    """Start the run's ``LocalCluster`` now (:class:`EarlyCluster`, warmed for ``cfg``), make it
    :func:`current` for the flow's task runner, and stop it when the block ends."""
    global _CURRENT
    early = EarlyCluster(local_cluster_kwargs(cfg.runner), cfg.model_dump_json(), api_url)
    _CURRENT = early
    try:
        yield early
    finally:
        _CURRENT = None
        early.close()
