"""``imgscore rerun RUN_ID``: finish a run — rescore what is not done, keep what is.

The flow ``rerun-failed`` reads the run's manifest (the source of truth) and its recorded
index, takes the run's lock (a second rerun of the same run is refused), removes temp files
that killed writers left, adopts shards that were committed but never recorded, and then
rescores, on the run's task runner:

- every shard not ``complete`` (``pending``/``running`` after a crash, ``failed``), and every
  shard whose part files are missing, corrupt (unreadable footer) or disagree with the manifest —
  the whole shard;
- every image recorded as failed in a ``partial`` shard — only those images; the shard's other
  prediction rows are kept unchanged.

Replacement part files are committed atomically (``tasks/rerun.py``); superseded error rows go
to ``OUT/errors_history/`` with their ``attempt`` numbers, so ``errors/`` holds only the images
that still fail. The rerun uses the run's recorded config; only ``output.root``, ``runner.*``
and ``inference.*`` may differ (``--config FILE`` / ``--set K=V``). Exit codes as for
``imgscore run``: 0 within the error budget, 1 over it or a shard failed, 2 refused (unknown
run, forbidden override, changed model, input folder gone, run locked).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import task_run

from imgscore.flows.artifacts import RunProgressArtifact
from imgscore.flows.runner import make_task_runner
from imgscore.flows.score_images import (
    PROGRESS_HOOKS,
    finish_run,
    record_failed_shard,
    workers_on_host,
)
from imgscore.tasks import lock as run_lock
from imgscore.tasks import manifest as mf
from imgscore.tasks.config import Config, build_config, load_config, parse_override
from imgscore.tasks.errors import (
    ConfigError,
    ErrorBudgetExceeded,
    InputError,
    ModelError,
    UsageError,
)
from imgscore.tasks.plan import RunPlan, load_plan, refresh_index
from imgscore.tasks.rerun import STAGING, archive_errors, rescore_shard
from imgscore.tasks.score import ShardRef

ALLOWED_OVERRIDES = ("output.root", "runner.", "inference.")


def _allowed(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in ALLOWED_OVERRIDES)


def _leaves(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _leaves(v, key + ".") if isinstance(v, dict) else [(key, v)]
    return out


def out_root_of(config_file: Path | None, overrides: list[str]) -> Path:
    """The output root to look for the run in: ``--set output.root``, else the config file's,
    else the default (``outputs``)."""
    root = load_config(config_file).output.root if config_file else Config().output.root
    for item in overrides:
        parts, value = parse_override(item)
        if parts == ["output", "root"]:
            root = Path(str(value))
    return Path(root)


def rerun_config(recorded: dict, config_file: Path | None, overrides: list[str]) -> Config:
    """The run's recorded config with the allowed overrides applied.

    ``--set`` may name only ``output.root``, ``runner.*`` or ``inference.*``; a ``--config`` file
    may hold other keys only with the values the run recorded (so the run's own config file can
    be passed again).

    Raises:
        ConfigError: a forbidden override (named, with the recorded value), or an invalid value.
    """
    base = build_config(recorded)
    file_items: list[str] = []
    if config_file is not None:
        load_config(config_file)  # validates the file and gives its usual errors
        raw = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        for key, value in _leaves(raw):
            item = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            if _allowed(key):
                file_items.append(item)
            elif build_config(recorded, [item]).to_dict() != base.to_dict():
                raise ConfigError(
                    f"{config_file} sets {key} to {value!r} but run {recorded['run']['run_id']} recorded "
                    f"{_get(base.to_dict(), key)!r}; a rerun keeps the run's config (only output.root, runner.* and "
                    "inference.* may change) — start a new run with `imgscore run` to change it"
                )
    for item in overrides:
        parts, _ = parse_override(item)
        key = ".".join(parts)
        if not _allowed(key):
            raise ConfigError(
                f"--set {item!r}: a rerun keeps the run's recorded config; only output.root, runner.* and inference.* "
                f"may be overridden (recorded {key} = {_get(base.to_dict(), key)!r}); start a new run to change {key}"
            )
    return build_config(recorded, [*file_items, *overrides])


def _get(d: dict, dotted: str):
    for p in dotted.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


@task(name="prepare_rerun", cache_policy=NO_CACHE)
def prepare_rerun_task(run_id: str, cfg: Config) -> tuple[RunPlan, list[mf.ShardWork]]:
    """Lock the run, clean leftovers, adopt committed shards, decide the work, refresh the index."""
    out = Path(cfg.output.root)
    run_dir = out / "runs" / run_id
    m = mf.read_manifest(run_dir / "manifest.json")
    run_lock.acquire(run_dir, "imgscore rerun")
    try:
        removed = run_lock.clean_run_temp_files(
            [mf.shard_files(out, m["run_date"], run_id, 0)[0].parent, mf.shard_files(out, m["run_date"], run_id, 0)[1].parent, run_dir]
        )
        _rmtree(run_dir / STAGING)
        adopted = mf.adopt_committed(m, run_dir, out)
        work = mf.plan_rerun(m, out)
        if work:
            fps = refresh_index(run_dir, m["input"]["root"], [w.shard_id for w in work])
            for sid, fp in fps.items():
                m["shards"][sid]["fingerprint"] = fp
        m["status"] = "running"
        m["config"] = cfg.to_dict()
        m["outputs"] = {t: str(mf.shard_files(out, m["run_date"], run_id, 0)[i].parent) for i, t in enumerate(("predictions", "errors"))}
        m.setdefault("reruns", []).append(
            {
                "started_at": datetime.now(UTC).isoformat(),
                "temp_files_removed": removed,
                "adopted_shards": adopted,
                "shards": [{"shard_id": w.shard_id, "images": len(w.only) if w.only is not None else None, "reason": w.reason} for w in work],
            }
        )
        mf.recount(m)
        mf.save(m, run_dir)
    except BaseException:
        run_lock.release(run_dir)
        raise
    return load_plan(run_dir, m), work


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


@task(name="rescore_shard", cache_policy=NO_CACHE)
def rescore_shard_task(ref: ShardRef, only: list[str] | None, config_json: str, base_attempt: int, n_on_host: int, metadata_json: str) -> dict:
    """One shard (or its failed images) on this worker; see ``imgscore.tasks.rerun.rescore_shard``.
    Config and part-file metadata travel as JSON text, as in ``score_shard_task``."""
    cfg, metadata = Config.model_validate_json(config_json), json.loads(metadata_json)
    attempt = base_attempt + int(task_run.run_count or 1)
    return rescore_shard(ref, only, cfg, attempt, workers_on_host=n_on_host, metadata=metadata)


def rescore_all(plan: RunPlan, work: list[mf.ShardWork], cfg: Config) -> list[dict]:
    """Submit one task run per shard of ``work``; fold results into the manifest as they finish.

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
    meta = {"config": cfg.to_dict()}
    sizes = {w.shard_id: len(w.only) if w.only is not None else plan.shards[w.shard_id].stop - plan.shards[w.shard_id].start for w in work}
    progress = RunProgressArtifact.start(  # Prefect UI: percent of this rerun's images done
        plan.manifest, total=sum(sizes.values()), title=f"imgscore rerun of {plan.run_id}"
    )
    done = 0
    futures = {}
    for w in work:
        ref = plan.shards[w.shard_id]
        base = int(plan.manifest["shards"][w.shard_id].get("attempts") or 0)
        futures[shard_task.submit(ref, w.only, cfg.model_dump_json(), base, n_on_host, json.dumps(meta))] = (ref, w, base)
    results = []
    for fut in as_completed(list(futures)):
        ref, w, base = futures[fut]
        try:
            result = fut.result()
        except Exception as exc:  # retries exhausted
            reason = f"{type(exc).__name__}: {exc}"
            attempts = base + cfg.run.shard_retries + 1
            logger.warning("rerun: shard %d failed after %d attempts: %s", ref.shard_id, cfg.run.shard_retries + 1, reason)
            if w.only is None:
                archive_errors(cfg.output.root, ref, base)
                result = record_failed_shard(plan, cfg, ref, reason, attempts)
            else:
                entry = plan.manifest["shards"][ref.shard_id]
                result = {**entry, "attempt": attempts, "reason": reason}
        mf.record_shard(plan.manifest, plan.run_dir, result)
        for hook in PROGRESS_HOOKS:
            hook(plan.manifest, result)
        done += sizes[w.shard_id]
        progress.update(plan.manifest, done=done)
        results.append(result)
    return results


def finish_rerun(plan: RunPlan, cfg: Config, results: list[dict], wall_s: float) -> dict:
    """Status, counts and the rerun's record into the manifest; the summary (as ``finish_run``).

    Raises:
        ErrorBudgetExceeded: the run is still over ``run.max_error_rate`` or a shard failed.
    """
    timings = dict(plan.manifest["timings"])  # the first run's timings stay; this rerun's go in "reruns"
    rescored = sum(r.get("rescored", 0) for r in results)

    def note(summary: dict) -> None:
        plan.manifest["timings"] = timings
        plan.manifest["reruns"][-1].update(
            {"finished_at": datetime.now(UTC).isoformat(), "wall_s": round(wall_s, 3), "images_rescored": rescored, "status": plan.manifest["status"]}
        )
        mf.save(plan.manifest, plan.run_dir)
        summary.update({"rescored": rescored, "rescored_shards": [r["shard_id"] for r in results]})

    try:
        summary = finish_run(plan, cfg.run.max_error_rate, wall_s)
    except ErrorBudgetExceeded as exc:
        note(exc.summary)
        raise
    note(summary)
    return summary


@flow(name="rerun-failed", log_prints=False)
def rerun_failed(run_id: str, config: dict) -> dict:
    """Rescore a run's unfinished shards and failed images, committing replacement part files.

    Args:
        run_id: the run to finish, under ``config['output']['root']/runs/``.
        config: the run's recorded config with allowed overrides (:func:`rerun_config`).

    Returns:
        The run summary (as ``score-images`` returns) plus ``rescored`` (images scored now) and
        ``rescored_shards``.

    Raises:
        ErrorBudgetExceeded: still over ``run.max_error_rate`` or a shard failed (flow run Failed).
        RunLockedError: another live process is writing this run.
    """
    t0 = time.perf_counter()
    cfg = Config.model_validate(config)
    plan, work = prepare_rerun_task(run_id, cfg)
    try:
        results = rescore_all(plan, work, cfg)
        return finish_rerun(plan, cfg, results, time.perf_counter() - t0)
    finally:
        _rmtree(plan.run_dir / STAGING)
        run_lock.release(plan.run_dir)


def _preflight(cfg: Config, manifest: dict, run_dir: Path) -> None:
    """Refuse before Prefect starts: run locked, input folder gone, or a model other than the run's."""
    held = run_lock.read_lock(run_dir)
    if held is not None and not run_lock.is_stale(held):
        raise run_lock.RunLockedError(f"run {manifest['run_id']} is locked by {run_lock.describe(held, run_dir)}")
    root = manifest["input"]["root"]
    if not Path(root).is_dir():
        raise InputError(f"run {manifest['run_id']} scored {root!r}, which is no longer a folder; restore it to rerun the run")
    import torch

    from imgscore.tasks.device import resolve_device
    from imgscore.tasks.model import load_model

    device = resolve_device(cfg.inference.device) if cfg.runner.type == "thread" else torch.device("cpu")
    lm = load_model(cfg.model, cfg.preprocess, device, channels_last=cfg.inference.channels_last)
    was = manifest["model"]["model_id"]
    if lm.model_id != was:
        raise ModelError(
            f"model.checkpoint {cfg.model.checkpoint} changed since run {manifest['run_id']} (model_id {was[:12]}… → {lm.model_id[:12]}…); "
            "a rerun must use the run's model: restore the checkpoint, or start a new run with `imgscore run`"
        )


def main(args) -> int:
    """``imgscore rerun RUN_ID [--config FILE] [--set K=V]...``; returns the exit code (0, 1, 2)."""
    from rich.console import Console

    from imgscore.flows.cli import flow_outcome, interrupted
    from imgscore.flows.progress import progress_for
    from imgscore.flows.server_guard import guard

    out = out_root_of(args.config, args.overrides)
    run_dir = out / "runs" / args.run_id
    if not (run_dir / "manifest.json").is_file():
        runs = sorted(p.name for p in (out / "runs").glob("*"))
        raise UsageError(
            f"run {args.run_id!r} not found: no {run_dir / 'manifest.json'}; pass the output root it was written to "
            "with --set output.root=PATH (" + (("latest runs there: " + ", ".join(runs[-5:])) if runs else f"no runs under {out}") + ")"
        )
    manifest = mf.read_manifest(run_dir / "manifest.json")
    cfg = rerun_config(manifest["config"], args.config, [*args.overrides, f"output.root={out}"])
    _preflight(cfg, manifest, run_dir)
    console = Console()
    todo = mf.plan_rerun(manifest, out)
    if not todo and manifest.get("status") == "complete":
        console.print(f"run {args.run_id} is complete: every shard is committed and no image is recorded as failed; nothing to rescore")
        return 0
    console.print(f"[bold]rerun {args.run_id}[/]: {len(todo)} shard(s) to rescore ({cfg.runner.type} runner) …")
    flow_fn = rerun_failed.with_options(task_runner=make_task_runner(cfg.runner))
    guard()  # temporary Prefect server stopped even if this process is killed
    try:
        with progress_for(console, enabled=not args.quiet):
            state = flow_fn(args.run_id, cfg.to_dict(), return_state=True)
    except KeyboardInterrupt:
        return interrupted(args.run_id, out)
    code, summary = flow_outcome(state, console, f"rerun of {args.run_id}")
    if code == 0:
        console.print(f"rescored {summary.get('rescored', 0)} image(s) in {len(summary.get('rescored_shards', []))} shard(s)")
    return code
