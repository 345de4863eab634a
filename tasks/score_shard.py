"""The Prefect task ``score_shard``: one shard on this worker's device, or its commit record when done."""

from __future__ import annotations

import json
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run
from prefect.states import Cancelled, Completed, State

from imgscore.config.schema import Config
from imgscore.errors import ShardStopped
from imgscore.inference.score import score_shard
from imgscore.io.storage import AnyPath
from imgscore.runstate import commits
from imgscore.runstate.manifest import ShardRef, ShardResult, stop_requested
from imgscore.runtime.startup import SHARD_STOPPED_MESSAGE


def stopped(run_dir: AnyPath) -> State[Any] | None:
    """For a shard task run: a ``Cancelled`` state when the run is stopping, else None."""
    return Cancelled(message=SHARD_STOPPED_MESSAGE) if stop_requested(run_dir) else None


# A retry of the flow run skips the shards an earlier attempt committed: their commit records
# (JSON, checked against the part files) are the cache. Prefect persists no task result, so
# nothing under output.root is ever unpickled (docs/security.md).
@task(name="score_shard", cache_policy=NO_CACHE, persist_result=False)
def score_shard_task(
    ref: ShardRef, config_json: str, n_on_host: int, inference_json: str = "{}"
) -> ShardResult | State[Any] | None:
    """One shard on this worker's device; see ``imgscore.inference.score.score_shard``. Returns its
    :class:`ShardResult` — in a ``Cached`` state, without scoring, when an earlier attempt of
    the run committed the shard and its part files match (``imgscore.runstate.commits.committed``).

    The config travels as its JSON text: Prefect walks every field of a structured parameter
    looking for futures, for every task run — a third of what a shard cost outside
    ``score_shard`` (benchmarks/NOTES.md, "Run state"); a string is one leaf.
    """
    halt = stopped(ref.run_dir)  # SIGINT/SIGTERM reached the flow: no shard starts
    if halt is not None:
        return halt
    cfg = Config.model_validate_json(config_json)
    done = commits.committed(ref, cfg.output.root)
    if done is not None:
        return Completed(
            name="Cached",
            message=f"shard {ref.shard_id} committed by attempt {done.attempt}; part files checked",
            data=done,
        )
    metadata = {"config": cfg.recorded(), "inference": json.loads(inference_json)}  # on every part file
    try:
        result = score_shard(
            ref, cfg, attempt=int(task_run.run_count or 1), workers_on_host=n_on_host, metadata=metadata
        )
    except ShardStopped:
        return stopped(ref.run_dir)  # abandoned between batches, nothing committed
    get_run_logger().info(  # the task run's log in the Prefect UI: where and how this shard ran
        "shard %d: %s scored, %s failed in %s s on %s by %s (%s %s, %s threads, %s DataLoader workers, batch %s)",
        ref.shard_id,
        result.scored,
        result.failed,
        result.seconds,
        result.device,
        result.worker,
        result.backend,
        result.precision,
        result.threads,
        result.loader_workers,
        result.batch_size,
    )
    return result
