"""The scoring flow: lock → plan → score shards on the task runner → finish.

The flow reads like a table of contents; the work is in ``tasks/``. Tasks pass references
(shard refs, config as JSON text, counts), never images, tensors or models. Each finished shard
is committed into the run state by :meth:`imgscore.runstate.state.RunState.commit` (O(1): a
ledger line, not a manifest rewrite); docs/architecture.md draws the whole run.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from pyarrow import ArrowException

from imgscore.config.flow_params import flow_config
from imgscore.config.running import DriftConfig, RunConfig
from imgscore.config.schema import Config
from imgscore.errors import (
    DriftExceeded,
    ErrorBudgetExceeded,
    OutputWriteError,
)
from imgscore.flows import notify
from imgscore.flows.artifacts import RunProgressArtifact, publish_run_report
from imgscore.flows.ending import recorded_ending, shards_stop_on_signal
from imgscore.inference.commit import commit_failed_shard
from imgscore.inference.score import read_shard_entries
from imgscore.io import object_store, storage
from imgscore.io.storage import AnyPath
from imgscore.report import drift
from imgscore.report.build import rerun_command
from imgscore.report.drift_result import DriftComparison
from imgscore.runstate import lock as run_lock
from imgscore.runstate.commits import run_dir_of
from imgscore.runstate.incremental import CARRIED_FILE, decode_settings
from imgscore.runstate.manifest import Manifest, ShardRef, ShardResult, now_iso
from imgscore.runstate.plan import RunPlan, new_run_id
from imgscore.runstate.resume import find_retried_run
from imgscore.runtime import progress
from imgscore.runtime.runner import ConfiguredTaskRunner, workers_on_host
from imgscore.runtime.startup import IN_SUMMARY, quiet_unless_verbose
from imgscore.tasks.plan import effective_config, inference_metadata, plan_task
from imgscore.tasks.score_shard import score_shard_task

quiet_unless_verbose()  # expected failures are one line in a deployment worker's log too


def choose_run_id(cfg: Config) -> str:
    """``run.run_id``; on a retry of this flow run, the run its first attempt planned; else new."""
    found = find_retried_run(cfg.output.root, flow_run.get_id(), cfg.run.run_id, flow_run.get_run_count())
    return found or cfg.run.run_id or new_run_id()


def record_failed_shard(plan: RunPlan, cfg: Config, ref: ShardRef, reason: str, attempts: int) -> ShardResult:
    """A shard that could not run after its retries: one errors row per image, state ``failed``."""
    return commit_failed_shard(
        ref,
        read_shard_entries(ref),
        cfg.output.root,
        plan.manifest.model,
        reason,
        attempts,
        metadata={"config": cfg.recorded(), "inference": inference_metadata(plan)},  # as score_shard's parts
        models=plan.manifest.scored_models,
    )


def score_all(plan: RunPlan, cfg: Config) -> list[ShardResult]:
    """Submit one task run per shard and commit results into the run state as they finish."""
    logger = get_run_logger()
    shard_task = score_shard_task.with_options(retries=cfg.run.shard_retries, retry_delay_seconds=1)
    n_on_host = workers_on_host(cfg)
    config_json = cfg.model_dump_json()
    inference_json = json.dumps(inference_metadata(plan))
    futures = {shard_task.submit(ref, config_json, n_on_host, inference_json): ref for ref in plan.shards}
    artifact = RunProgressArtifact.start(plan.manifest.to_progress(), total=plan.manifest.total_pairs)  # Prefect UI
    results = []
    with shards_stop_on_signal(plan.run_dir, futures):  # SIGINT/SIGTERM: no shard starts or commits after it
        for fut in as_completed(list(futures)):
            ref = futures[fut]
            try:
                # a task run that returned a State ends in it: result() is its data (a Cached commit record) or raises
                result = cast(ShardResult, fut.result())
            except OutputWriteError:
                raise  # the disk (or quota, or file system) failed: every other shard would too
            except Exception as exc:  # retries exhausted: recorded as a failed shard, others go on
                reason = f"{type(exc).__name__}: {exc}"
                logger.warning("shard %d failed after %d attempts: %s", ref.shard_id, cfg.run.shard_retries + 1, reason)
                result = record_failed_shard(plan, cfg, ref, reason, cfg.run.shard_retries + 1)
            record = plan.state.commit(result)
            progress.notify(plan.manifest, record)
            artifact.update(plan.manifest.to_progress())
            results.append(result)
    return results


def over_budget(failed: int, scanned: int, budget: RunConfig) -> str | None:
    """Why ``failed`` of ``scanned`` (image, model) pairs this run took on is over the error
    budget, or None (with one model, pairs are images; with two, an image that fails to
    decode is two failed pairs of two).

    Over means the rate exceeds ``run.max_error_rate`` *and* at least ``run.min_errors`` images
    failed: 1 corrupt image of 1 new is a ``partial`` night, not a failed one; 300 of 1,000 fails.
    Images carried as ``already_scored`` or ``already_failed`` are not part of either number.
    """
    rate = failed / scanned if scanned else 0.0
    if rate > budget.max_error_rate and failed >= budget.min_errors:
        return (
            f"error rate {rate:.2%} > run.max_error_rate {budget.max_error_rate:.2%} ({failed} failed, run.min_errors "
            f"{budget.min_errors})"
        )
    return None


def finish_run(
    plan: RunPlan,
    budget: RunConfig,
    wall_s: float,
    out_root: AnyPath,
    scored_now: int | None = None,
    drift_cfg: DriftConfig | None = None,
) -> dict[str, Any]:
    """Final counts, status and timings into the manifest; the summary the CLI prints.
    ``out_root``: the flow run's ``output.root`` (report.html goes under it, never where the
    manifest's recorded config says). ``drift_cfg``: the run compared with recent nights
    (``imgscore.report.drift``); its warnings go into the summary (``drift``), the artifacts and
    the log, and fail the run only with ``drift.fail``.

    ``scored_now``: (image, model) pairs this flow run scored (a rerun's), for the rates; default
    every scored pair of the run. ``scanned`` counts images; ``pairs``, ``scored`` and ``failed``
    count (image, model) pairs (the same numbers with one model). ``pairs_per_s`` is scored pairs
    per wall-clock second; ``images_per_s`` is that in images (pairs × images / pairs: with two
    models on every image, half of it).

    Raises:
        ErrorBudgetExceeded: over the budget (:func:`over_budget`) or a shard failed; everything
            that could be scored is already written.
        DriftExceeded: a drift threshold was crossed and ``drift.fail`` is on.
    """
    m = plan.manifest.recount()
    c = m.counts
    pairs = m.total_pairs  # (image, model) pairs: the budget's denominator (images with one model)
    failed_shards = [s.shard_id for s in m.shards if s.state == "failed"]
    if failed_shards:
        why: str | None = f"{len(failed_shards)} shard(s) failed (error rate {_rate(m):.2%})"
    else:
        why = over_budget(c.failed, pairs, budget)
    m.drift = compare_drift(out_root, m, drift_cfg)
    drifted = m.drift.get("warnings") or []
    fail_on_drift = bool(drifted) and drift_cfg is not None and drift_cfg.fail
    m.status = "failed" if why or fail_on_drift else ("partial" if c.failed else "complete")
    m.reason = why or (f"drift: {drifted[0]}" if fail_on_drift else None)
    _record_timings(m, wall_s, c.scored if scored_now is None else scored_now)
    plan.state.save()
    summary = run_summary(plan, budget, wall_s, out_root)
    # report.html + summary/markdown artifacts; never raises (a failure is logged as a warning)
    summary["report"] = publish_run_report(out_root, plan.run_id)
    if why:
        raise ErrorBudgetExceeded(
            f"run {plan.run_id} over its error budget: {why}; errors are in {m.outputs['errors']}", summary
        )
    if fail_on_drift:
        raise DriftExceeded(f"run {plan.run_id} drifted from recent nights (drift.fail is on): {drifted[0]}", summary)
    return summary


def _rate(m: Manifest) -> float:
    """The run's failed share of its (image, model) pairs."""
    return m.counts.failed / m.total_pairs if m.total_pairs else 0.0


def _record_timings(m: Manifest, wall_s: float, scored: int) -> None:
    """The run's throughput and end into ``m.timings``, and what each worker's backend ran into
    ``m.inference["used"]``; ``scored``: the (image, model) pairs the rates count."""
    used = sorted({(s.backend, s.precision) for s in m.shards if s.backend})
    m.inference["used"] = [{"backend": b, "precision": p} for b, p in used]  # per worker (auto resolves per machine)
    pairs = m.total_pairs
    per_image = m.total_images / pairs if pairs else 1.0  # several models: a pair is 1/n of an image's work
    m.timings.update(
        {
            "wall_s": round(wall_s, 3),
            "shard_seconds": round(sum(s.seconds or 0 for s in m.shards), 3),
            "images_per_s": round(scored * per_image / wall_s, 2) if wall_s else None,
            "pairs_per_s": round(scored / wall_s, 2) if wall_s else None,
            "ended_at": now_iso(),
        }
    )


def run_summary(plan: RunPlan, budget: RunConfig, wall_s: float, out_root: AnyPath) -> dict[str, Any]:
    """The summary of a finished run as the CLI prints it and the flow returns it: status,
    counts, the budget, throughput, where it ran, its output folders (those that exist), and —
    unless it is ``complete`` — the ``rerun`` command that finishes it."""
    m = plan.manifest
    c = m.counts
    summary = {
        "run_id": plan.run_id,
        "status": m.status,
        **{k: getattr(c, k) for k in ("scanned", "scored", "failed", "skipped", "already_scored", "already_failed")},
        "models": [x.get("name") or x.get("arch") for x in m.scored_models],
        "pairs": m.total_pairs,
        "error_rate": round(_rate(m), 6),
        "max_error_rate": budget.max_error_rate,
        "min_errors": budget.min_errors,
        "failed_shards": [s.shard_id for s in m.shards if s.state == "failed"],
        "warnings": sum(sum(s.warnings.values()) for s in m.shards),  # Pillow warnings, counted per shard
        "images_per_s": m.timings["images_per_s"],
        "pairs_per_s": m.timings["pairs_per_s"],
        "wall_s": round(wall_s, 2),
        "devices": sorted({s.device for s in m.shards if s.device}),
        "workers": sorted({s.worker for s in m.shards if s.worker}),
        "manifest": str(storage.path(plan.run_dir, "manifest.json")),
        "drift": m.drift.get("warnings") or [],
        # a night with nothing new writes no part files (on a bucket: no object under the prefix)
        **{k: v for k, v in m.outputs.items() if storage.path(v).is_dir()},
    }
    if m.status != "complete":  # every other status comes with the command that finishes the run
        summary["rerun"] = rerun_command(plan.run_id, out_root)
    if c.already_failed:
        summary["known_bad"] = str(storage.path(plan.run_dir, CARRIED_FILE))
    return summary


def compare_drift(out_root: AnyPath, m: Manifest, drift_cfg: DriftConfig | None) -> dict[str, Any]:
    """The run against recent nights (``imgscore.report.drift.compare``), as the manifest keeps it:
    ``baseline_runs``, ``psi`` and ``warnings`` (each also logged as a warning on the flow run);
    {} when off. With several models each is compared with its own recent nights (its rows
    only): ``models`` holds each one's, the top-level numbers are the first model's, and
    ``warnings`` all of them, each prefixed with its model's name. A comparison that cannot be
    made is logged, never raised (it must not cost the night's results)."""
    if drift_cfg is None or not drift_cfg.enabled:
        return {}
    models = m.scored_models
    out: dict[str, Any] = {}
    for model in models:
        try:
            d = drift.compare(storage.display(out_root), m.to_dict(), drift_cfg, model)
        except (OSError, ValueError, ArrowException) as exc:
            get_run_logger().warning("drift: not compared with recent nights (%s: %s)", type(exc).__name__, exc)
            return {}
        name = model.get("name") or model.get("arch")
        warnings = [f"{name}: {w}" for w in d.warnings] if len(models) > 1 else d.warnings
        for w in warnings:  # the CLI's summary prints them: on the terminal only with --verbose
            get_run_logger().warning("drift: %s", w, extra=IN_SUMMARY)
        psi = d.classes.psi if isinstance(d, DriftComparison) else None
        one = {"baseline_runs": d.baseline.runs, "psi": psi, "warnings": warnings}
        if not out:
            out = dict(one)
        else:
            out["warnings"] = out["warnings"] + warnings
        if len(models) > 1:
            out.setdefault("models", {})[name] = one  # each model against its own recent nights
    return out


def skip_scored_guard(cfg: Config, run_id: str) -> contextlib.AbstractContextManager[object]:
    """With ``run.skip_scored``, hold the lock of (input folder, model) for the run: a second run
    on the same folder with the same model at the same time would plan before the first wrote
    anything and score everything again, so it is refused (exit 2) naming the first
    (``imgscore.runstate.lock.folder_held``). Without it, nothing is held."""
    if not cfg.run.skip_scored or cfg.input.root is None:
        return contextlib.nullcontext()
    return run_lock.folder_held(cfg.output.root, cfg.input.root, scoring_identity(cfg), f"imgscore run {run_id}")


def scoring_identity(cfg: Config) -> str:
    """What the folder lock is keyed on besides the folder: the models, preprocessing and decode
    settings (the ``skip_scored`` key's parts, as configured)."""
    return (
        "".join(m.model_dump_json() for m in cfg.scored_models())
        + cfg.preprocess.model_dump_json()
        + json.dumps(decode_settings(cfg.input), sort_keys=True)
    )


@flow(
    name="score-images",
    log_prints=False,
    task_runner=ConfiguredTaskRunner(),
    on_failure=[notify.notify_hook],
    on_crashed=[notify.notify_hook],
    on_completion=[notify.notify_hook],
)
def score_images(config: dict[str, Any] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """Score every image under ``config['input']['root']`` and write Parquet part files.

    The task runner is the one ``config['runner']`` names (``imgscore.runtime.runner``), however
    the flow run was started. Its state hooks send ``notify.*`` notifications (``imgscore.flows.notify``).

    Args:
        config: a resolved config (``Config.to_dict()``), e.g. from ``configs/nightly.yaml``.
        config_file: instead of ``config``, a JSON file holding it: how ``imgscore run`` passes a
            config too large for a flow-run parameter (``imgscore.config.flow_params.flow_parameters``).

    Returns:
        The run summary (run_id, counts, throughput, output folders).

    The manifest ends ``complete``, ``partial`` or ``failed``; ``interrupted`` after SIGINT or
    SIGTERM and ``crashed`` after anything unexpected (``imgscore.flows.ending``). The flow
    run's state hooks send ``notify.*`` notifications (``imgscore.flows.notify``).

    Raises:
        ErrorBudgetExceeded: over the error budget or a shard failed (flow run Failed).
        OutputWriteError: a write under output.root failed (disk full, …): the run is ``crashed``.
        UsageError: bad config, input root or model, or the run id is taken (nothing is scored).
        RunLockedError: another live process is writing this run, or (``run.skip_scored``)
            scoring this folder with this model.
    """
    t0 = time.perf_counter()
    cfg = flow_config(config, config_file)
    object_store.configure(cfg.storage.settings())  # object-store roots: options, retries, timeouts of this run
    run_id = choose_run_id(cfg)
    notify.remember_run(run_id, cfg.output.root)
    with run_lock.held(run_dir_of(cfg.output.root, run_id), "imgscore run"), skip_scored_guard(cfg, run_id):
        plan = plan_task(cfg, run_id)
        try:
            with recorded_ending(plan, cfg.output.root, t0):
                score_all(plan, effective_config(cfg, plan))
                return finish_run(plan, cfg.run, time.perf_counter() - t0, cfg.output.root, drift_cfg=cfg.drift)
        finally:
            plan.state.close()
