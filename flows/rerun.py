"""The flow ``rerun-failed`` (``imgscore rerun RUN_ID``): finish a run — rescore what is not done, keep what is.

It holds the run's lock for its whole body (a second rerun of the same run is refused), reads
the run state (summary + ledger), removes temp files that killed writers left, adopts shards
that were committed but never recorded, and then rescores, on the runner the config names:

- every shard not ``complete`` (``pending``/``running`` after a crash, ``failed``), and every
  shard whose part files are missing, corrupt (unreadable footer) or disagree with the manifest —
  the whole shard;
- every image recorded as failed in a ``partial`` shard — only those images; the shard's other
  prediction rows are kept unchanged.

Choosing, scoring and merging are ``imgscore.runstate.commits.plan_rerun`` and
``imgscore.runstate.rerun_plan.rescore_shard``; superseded error rows go to ``OUT/errors_history/`` with
their ``attempt`` numbers, so ``errors/`` holds only the images that still fail. Exit codes as
for ``imgscore run``: 0 within the error budget, 1 over it or a shard failed, 2 refused (unknown
run, forbidden override, changed model, input folder gone, run locked).
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from imgscore.config.flow_params import flow_config
from imgscore.config.schema import Config
from imgscore.errors import ErrorBudgetExceeded, OutputWriteError
from imgscore.flows import notify
from imgscore.flows.artifacts import RunProgressArtifact
from imgscore.flows.ending import recorded_ending, shards_stop_on_signal
from imgscore.flows.score_images import finish_run, record_failed_shard
from imgscore.io import object_store
from imgscore.runstate import commits
from imgscore.runstate import lock as run_lock
from imgscore.runstate.commits import run_dir_of
from imgscore.runstate.manifest import ShardResult, now_iso
from imgscore.runstate.plan import RunPlan
from imgscore.runstate.rerun_plan import archive_errors
from imgscore.runtime import progress
from imgscore.runtime.runner import ConfiguredTaskRunner, workers_on_host
from imgscore.runtime.startup import quiet_unless_verbose
from imgscore.tasks.plan import effective_config, inference_metadata
from imgscore.tasks.rerun import prepare_rerun_task, rescore_shard_task

quiet_unless_verbose()  # expected failures are one line in a deployment worker's log too


def rescore_all(plan: RunPlan, work: list[commits.ShardWork], cfg: Config) -> list[ShardResult]:
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
    sizes = {
        w.shard_id: len(w.only) if w.only is not None else plan.shards[w.shard_id].stop - plan.shards[w.shard_id].start
        for w in work
    }
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
                # a task run that returned a State ends in it: result() is its data or raises (Cancelled)
                result = cast(ShardResult, fut.result())
            except OutputWriteError:
                raise  # the disk (or quota, or file system) failed: every other shard would too
            except Exception as exc:  # retries exhausted
                reason = f"{type(exc).__name__}: {exc}"
                attempts = base + cfg.run.shard_retries + 1
                logger.warning(
                    "rerun: shard %d failed after %d attempts: %s", ref.shard_id, cfg.run.shard_retries + 1, reason
                )
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


def finish_rerun(plan: RunPlan, cfg: Config, results: list[ShardResult], wall_s: float) -> dict[str, Any]:
    """Status, counts and the rerun's record into the manifest; the summary (as ``finish_run``).

    Raises:
        ErrorBudgetExceeded: the run is still over ``run.max_error_rate`` or a shard failed.
    """
    m = plan.manifest
    timings = dict(m.timings)  # the first run's timings stay; this rerun's go in "reruns"
    rescored = sum(r.rescored or 0 for r in results)

    def note(summary: dict[str, Any]) -> None:
        m.timings = timings
        m.reruns[-1].update(
            {"finished_at": now_iso(), "wall_s": round(wall_s, 3), "images_rescored": rescored, "status": m.status}
        )
        plan.state.save()
        summary.update({"rescored": rescored, "rescored_shards": [r.shard_id for r in results]})

    try:
        summary = finish_run(plan, cfg.run, wall_s, cfg.output.root, scored_now=rescored, drift_cfg=cfg.drift)
    except ErrorBudgetExceeded as exc:
        note(exc.summary)
        raise
    note(summary)
    return summary


@flow(
    name="rerun-failed",
    log_prints=False,
    task_runner=ConfiguredTaskRunner(),
    on_failure=[notify.notify_hook],
    on_crashed=[notify.notify_hook],
    on_completion=[notify.notify_hook],
)
def rerun_failed(run_id: str, config: dict[str, Any] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """Rescore a run's unfinished shards and failed images, committing replacement part files.

    The task runner is the one ``config['runner']`` names (``imgscore.runtime.runner``).

    Args:
        run_id: the run to finish, under ``config['output']['root']/runs/``.
        config: the run's recorded config with allowed overrides (``imgscore.config.rerun.rerun_config``).
        config_file: instead of ``config``, a JSON file holding it (``imgscore.config.flow_params.flow_parameters``).

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
    object_store.configure(cfg.storage.settings())
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
