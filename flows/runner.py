"""Task runner for a run: Prefect's thread pool, or Dask through prefect-dask."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from tasks.config import RunnerConfig


def make_task_runner(cfg: RunnerConfig):
    """``thread``: a ThreadPoolTaskRunner of ``n_workers`` threads (1 by default: on a CPU-only
    machine one shard at a time uses every core through torch's own threads).
    ``dask``: a ``prefect_dask.DaskTaskRunner`` on ``address``, or on a LocalCluster of
    ``n_workers`` processes with ``threads_per_worker`` threads each."""
    if cfg.type == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.n_workers)
    from prefect_dask import DaskTaskRunner

    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": cfg.n_workers, "threads_per_worker": cfg.threads_per_worker, "processes": True, "dashboard_address": None}
    )
