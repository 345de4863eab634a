"""The Prefect tasks of a rerun: ``prepare_rerun`` (what to rescore) and ``rescore_shard``."""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run
from prefect.states import State

from imgscore.config.schema import Config
from imgscore.errors import ShardStopped
from imgscore.io import storage
from imgscore.io.containment import check_run_date
from imgscore.runstate import commits, migrate
from imgscore.runstate import lock as run_lock
from imgscore.runstate.commits import run_dir_of
from imgscore.runstate.index import refresh_shards
from imgscore.runstate.manifest import ShardRef, ShardResult, now_iso
from imgscore.runstate.plan import RunPlan, shard_refs
from imgscore.runstate.rerun_plan import rescore_shard
from imgscore.runstate.resume import load_plan
from imgscore.tasks.score_shard import stopped


@task(name="prepare_rerun", cache_policy=NO_CACHE, persist_result=False)
def prepare_rerun_task(run_id: str, cfg: Config) -> tuple[RunPlan, list[commits.ShardWork]]:
    """Clean leftovers, adopt committed shards, decide the work, refresh the index (the caller
    holds the run's lock)."""
    out = cfg.output.root
    migrate.migrate_output_root(out, held_run=run_id)  # runs of earlier versions (this one included): today's layout
    plan = load_plan(run_dir_of(out, run_id))
    m = plan.manifest
    removed = run_lock.clean_run_temp_files(commits.run_folders(out, plan.run_date, run_id))
    adopted = commits.adopt_committed(m, plan.run_dir, out)
    work = commits.plan_rerun(m, out)
    if work:
        for sid, fp in refresh_shards(plan.run_dir, m.index, m.input["root"], [w.shard_id for w in work]).items():
            m.shards[sid].fingerprint = fp  # the images as they are now (a fixed file has a new size and mtime)
        plan.shards = shard_refs(m, plan.run_dir)
    m.status, m.reason = "running", None
    m.config = cfg.recorded()
    parts = commits.shard_files(out, check_run_date(m.run_date, "run_date"), run_id, 0)
    m.outputs = {t: str(storage.parent_of(parts[i])) for i, t in enumerate(("predictions", "errors"))}
    m.reruns.append(
        {
            "started_at": now_iso(),
            "temp_files_removed": removed,
            "adopted_shards": adopted,
            "shards": [
                {"shard_id": w.shard_id, "images": len(w.only) if w.only is not None else None, "reason": w.reason}
                for w in work
            ],
        }
    )
    m.recount()
    plan.state.save()
    return plan, work


@task(name="rescore_shard", cache_policy=NO_CACHE, persist_result=False)
def rescore_shard_task(
    ref: ShardRef, only: list[str] | None, config_json: str, base_attempt: int, n_on_host: int, metadata_json: str
) -> ShardResult | State[Any] | None:
    """One shard (or its failed images) on this worker; see ``imgscore.runstate.rerun_plan.rescore_shard``.
    Config and part-file metadata travel as JSON text, as in ``score_shard_task``."""
    halt = stopped(ref.run_dir)  # SIGINT/SIGTERM reached the flow: no shard starts
    if halt is not None:
        return halt
    cfg, metadata = Config.model_validate_json(config_json), json.loads(metadata_json)
    attempt = base_attempt + int(task_run.run_count or 1)
    try:
        return rescore_shard(ref, only, cfg, attempt, workers_on_host=n_on_host, metadata=metadata)
    except ShardStopped:
        return stopped(ref.run_dir)  # abandoned between batches, nothing committed
