"""The flow ``rerun-failed`` (``imgscore rerun RUN_ID``): finish a run — rescore what is not done, keep what is.

It holds the run's lock for its whole body (a second rerun of the same run is refused), reads
the run state (summary + ledger), removes temp files that killed writers left, adopts shards
that were committed but never recorded, and then rescores, on the runner the config names:

- every shard not ``complete`` (``pending``/``running`` after a crash, ``failed``), and every
  shard whose part files are missing, corrupt (unreadable footer) or disagree with the manifest —
  the whole shard;
- every image recorded as failed in a ``partial`` shard — only those images; the shard's other
  prediction rows are kept unchanged.

Choosing, scoring and merging are ``imgscore.tasks.manifest.plan_rerun`` and
``imgscore.tasks.rerun.rescore_shard``; superseded error rows go to ``OUT/errors_history/`` with
their ``attempt`` numbers, so ``errors/`` holds only the images that still fail. Exit codes as
for ``imgscore run``: 0 within the error budget, 1 over it or a shard failed, 2 refused (unknown
run, forbidden override, changed model, input folder gone, run locked).
"""

from __future__ import annotations

import json
import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import task_run

from imgscore.flows import notify, progress
from imgscore.flows.artifacts import RunProgressArtifact
from imgscore.flows.ending import recorded_ending, shards_stop_on_signal, stopped
from imgscore.flows.runner import ConfiguredTaskRunner
from imgscore.flows.score_images import (
    effective_config,
    finish_run,
    inference_metadata,
    record_failed_shard,
    workers_on_host,
)
from imgscore.flows.startup import quiet_unless_verbose
from imgscore.tasks import layout, storage
from imgscore.tasks import lock as run_lock
from imgscore.tasks import manifest as mf
from imgscore.tasks.config import Config, flow_config
from imgscore.tasks.errors import ErrorBudgetExceeded, OutputWriteError, ShardStopped
from imgscore.tasks.index import refresh_shards
from imgscore.tasks.plan import RunPlan, load_plan, run_dir_of, shard_refs
from imgscore.tasks.rerun import archive_errors, rescore_shard
from imgscore.tasks.runstate import ShardRef, ShardResult, now_iso

quiet_unless_verbose()  # expected failures are one line in a deployment worker's log too


@task(name="prepare_rerun", cache_policy=NO_CACHE, persist_result=False)
def prepare_rerun_task(run_id: str, cfg: Config) -> tuple[RunPlan, list[mf.ShardWork]]:
    """Clean leftovers, adopt committed shards, decide the work, refresh the index (the caller
    holds the run's lock)."""
    out = cfg.output.root
    layout.migrate_output_root(out, held_run=run_id)  # runs of earlier versions (this one included): today's layout
    plan = load_plan(run_dir_of(out, run_id))
    m = plan.manifest
    removed = run_lock.clean_run_temp_files(mf.run_folders(out, plan.run_date, run_id))
    adopted = mf.adopt_committed(m, plan.run_dir, out)
    work = mf.plan_rerun(m, out)
    if work:
        for sid, fp in refresh_shards(plan.run_dir, m.index, m.input["root"], [w.shard_id for w in work]).items():
            m.shards[sid].fingerprint = fp  # the images as they are now (a fixed file has a new size and mtime)
        plan.shards = shard_refs(m, plan.run_dir)
    m.status, m.reason = "running", None
    m.config = cfg.recorded()
    m.outputs = {t: str(storage.parent_of(mf.shard_files(out, m.run_date, run_id, 0)[i])) for i, t in enumerate(("predictions", "errors"))}
    m.reruns.append(
        {
            "started_at": now_iso(),
            "temp_files_removed": removed,
            "adopted_shards": adopted,
            "shards": [{"shard_id": w.shard_id, "images": len(w.only) if w.only is not None else None, "reason": w.reason} for w in work],
        }
    )
    m.recount()
    plan.state.save()
    return plan, work


@task(name="rescore_shard", cache_policy=NO_CACHE, persist_result=False)
def rescore_shard_task(ref: ShardRef, only: list[str] | None, config_json: str, base_attempt: int, n_on_host: int, metadata_json: str) -> ShardResult:
    """One shard (or its failed images) on this worker; see ``imgscore.tasks.rerun.rescore_shard``.
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


def rescore_all(plan: RunPlan, work: list[mf.ShardWork], cfg: Config) -> list[ShardResult]:
    """Submit one task run per shard of ``work``; commit results into the run state as they finish.

    A shard that still cannot run after ``run.shard_retries`` retries is recorded as ``failed``
    (whole-shard work) or stays ``partial`` with its earlier rows (failed-images work).

    Publishes the progress artifact ``rerun-failed-progress`` as ``score_all`` publishes
    ``score-images-progress`` (created at start, updated per finished shard): percent of the
    images this rerun rescores (a whole shard's images, or only its failed ones), whatever
    their outcome; 100 % at once when there is nothing to rescore.
    """
    logger = get_run_logger()
    shard_task = rescore_shard_task.with_options(retries=cfg.run.shard_retries, retry_delay_seconds=1)
    n_on_host = workers_on_host(cfg)
    meta = json.dumps({"config": cfg.recorded(), "inference": inference_metadata(plan)})
    sizes = {w.shard_id: len(w.only) if w.only is not None else plan.shards[w.shard_id].stop - plan.shards[w.shard_id].start for w in work}
    artifact = RunProgressArtifact.start(  # Prefect UI: percent of this rerun's images done
        plan.manifest.to_progress(), total=sum(sizes.values()), title=f"imgscore rerun of {plan.run_id}"
    )
    done = 0
    futures = {}
    for w in work:
        ref = plan.shards[w.shard_id]
        base = plan.manifest.shards[w.shard_id].attempts
        futures[shard_task.submit(ref, w.only, cfg.model_dump_json(), base, n_on_host, meta)] = (ref, w, base)
    results = []
    with shards_stop_on_signal(plan.run_dir, futures):  # SIGINT/SIGTERM: no shard starts or commits after it
        for fut in as_completed(list(futures)):
            ref, w, base = futures[fut]
            try:
                result = fut.result()
            except OutputWriteError:
                raise  # the disk (or quota, or file system) failed: every other shard would too
            except Exception as exc:  # retries exhausted
                reason = f"{type(exc).__name__}: {exc}"
                attempts = base + cfg.run.shard_retries + 1
                logger.warning("rerun: shard %d failed after %d attempts: %s", ref.shard_id, cfg.run.shard_retries + 1, reason)
                if w.only is None:
                    archive_errors(cfg.output.root, ref, base)
                    result = record_failed_shard(plan, cfg, ref, reason, attempts)
                else:  # its earlier rows stand; the attempts and the reason are recorded
                    result = plan.manifest.shards[ref.shard_id].unchanged(attempts, reason)
            record = plan.state.commit(result)
            progress.notify(plan.manifest, record)
            done += sizes[w.shard_id]
            artifact.update(plan.manifest.to_progress(), done=done)
            results.append(result)
    return results


def finish_rerun(plan: RunPlan, cfg: Config, results: list[ShardResult], wall_s: float) -> dict:
    """Status, counts and the rerun's record into the manifest; the summary (as ``finish_run``).

    Raises:
        ErrorBudgetExceeded: the run is still over ``run.max_error_rate`` or a shard failed.
    """
    m = plan.manifest
    timings = dict(m.timings)  # the first run's timings stay; this rerun's go in "reruns"
    rescored = sum(r.rescored or 0 for r in results)

    def note(summary: dict) -> None:
        m.timings = timings
        m.reruns[-1].update({"finished_at": now_iso(), "wall_s": round(wall_s, 3), "images_rescored": rescored, "status": m.status})
        plan.state.save()
        summary.update({"rescored": rescored, "rescored_shards": [r.shard_id for r in results]})

    try:
        summary = finish_run(plan, cfg.run, wall_s, cfg.output.root, scored_now=rescored, drift_cfg=cfg.drift)
    except ErrorBudgetExceeded as exc:
        note(exc.summary)
        raise
    note(summary)
    return summary


@flow(name="rerun-failed", log_prints=False, task_runner=ConfiguredTaskRunner(), **notify.HOOKS)
def rerun_failed(run_id: str, config: dict | None = None, config_file: str | None = None) -> dict:
    """Rescore a run's unfinished shards and failed images, committing replacement part files.

    The task runner is the one ``config['runner']`` names (``imgscore.flows.runner``).

    Args:
        run_id: the run to finish, under ``config['output']['root']/runs/``.
        config: the run's recorded config with allowed overrides (``imgscore.tasks.config.rerun_config``).
        config_file: instead of ``config``, a JSON file holding it (``imgscore.tasks.config.flow_parameters``).

    Returns:
        The run summary (as ``score-images`` returns) plus ``rescored`` (images scored now) and
        ``rescored_shards``.

    Raises:
        ErrorBudgetExceeded: still over the error budget or a shard failed (flow run Failed).
        OutputWriteError: a write under output.root failed (disk full, …): the run is ``crashed``.
        RunLockedError: another live process is writing this run.
    """
    t0 = time.perf_counter()
    cfg = flow_config(config, config_file)
    storage.configure(cfg.storage.settings())
    notify.remember_run(run_id, cfg.output.root)
    with run_lock.held(run_dir_of(cfg.output.root, run_id), "imgscore rerun"):
        plan, work = prepare_rerun_task(run_id, cfg)
        cfg = effective_config(cfg, plan)  # the precision the run's start settled on (canary)
        try:
            with recorded_ending(plan, cfg.output.root, t0):
                results = rescore_all(plan, work, cfg)
                return finish_rerun(plan, cfg, results, time.perf_counter() - t0)
        finally:
            plan.state.close()
