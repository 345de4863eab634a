"""Plan a run: stream the scan into the index, cut shards, write the first manifest.

Planning holds no list of the images: the scan's record batches (:mod:`imgscore.images.scan`)
pass through the incremental filter (``run.skip_scored``) into the index writer
(:mod:`imgscore.runstate.index`), which cuts a shard every ``run.shard_size`` rows. Memory is a few
batches and one shard's rows, whatever the number of images; the manifest holds one small
record per shard (:mod:`imgscore.runstate.manifest`).

The caller holds the run's lock (``imgscore.runstate.lock.held``) around planning and scoring.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from upath import UPath

from imgscore.config.schema import Config
from imgscore.errors import InputError, UsageError
from imgscore.images.extensions import no_images_message
from imgscore.images.scan import check_roots_apart, open_scan, scan_threads_for
from imgscore.images.scan_stream import Scan
from imgscore.io import storage
from imgscore.io.parquet import input_root_name, part_dir
from imgscore.io.storage import AnyPath
from imgscore.runstate import lock as run_lock
from imgscore.runstate import migrate
from imgscore.runstate.already_scored import AlreadyScored, AlreadyScoredEach, SkipFilter
from imgscore.runstate.commits import run_dir_of
from imgscore.runstate.incremental import CARRIED_FILE, decode_settings, model_key
from imgscore.runstate.index import INDEX_NAME, IndexWriter, shard_location
from imgscore.runstate.listings import Listings
from imgscore.runstate.manifest import (
    MANIFEST,
    Counts,
    Manifest,
    ShardRecord,
    ShardRef,
    models_id,
    now_iso,
)
from imgscore.runstate.state import RunState


def new_run_id(now: datetime | None = None) -> str:
    """``YYYYMMDDTHHMMSSZ-xxxxxx``: sortable by start time, unique across concurrent runs."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


_STAMPED = re.compile(r"(\d{8})T\d{6}Z-")


def run_date_of(run_id: str, now: datetime) -> str:
    """The ``run_date`` partition (``YYYY-MM-DD``, UTC) of a run: the date in the stamp of a
    :func:`new_run_id` id, so the id and the partition come from one instant — the CLI stamps the
    id, the flow plans seconds later, and a run started at 23:59:59 UTC must not land in the next
    day's partition. ``now`` (aware, UTC) gives the date of a run id chosen by hand (``run.run_id``).
    """
    m = _STAMPED.match(run_id)
    if m is not None:
        try:
            return datetime.strptime(m.group(1), "%Y%m%d").strftime("%Y-%m-%d")
        except ValueError:
            pass  # digits that are no date: a hand-made id
    return now.astimezone(UTC).strftime("%Y-%m-%d")


@dataclass
class RunPlan:
    """A planned (or resumed) run: its shards and the state the flow commits results into."""

    run_id: str
    run_date: str
    run_dir: UPath  # OUT/runs/RUN_ID (run_dir_of): a pathlib.Path locally
    shards: list[ShardRef]
    state: RunState

    @property
    def manifest(self) -> Manifest:
        return self.state.manifest


def shard_refs(manifest: Manifest, run_dir: AnyPath) -> list[ShardRef]:
    """The task-run references of a manifest's shards, pointing at ``run_dir`` (where the run
    lives now: ``output.root`` may have moved since planning)."""
    mkey = manifest.model.get("model_key") or model_key(manifest.model)
    model_id = models_id([m.get("model_id") or "" for m in manifest.scored_models])
    refs = []
    for s in manifest.shards:
        index_file, group = shard_location(manifest.index, s.shard_id)
        refs.append(
            ShardRef(
                run_id=manifest.run_id,
                run_date=manifest.run_date or "",
                run_dir=str(run_dir),
                input_root=manifest.input["root"],
                shard_id=s.shard_id,
                start=s.start,
                stop=s.stop,
                fingerprint=s.fingerprint or "",
                model_key=mkey,
                model_id=model_id,
                index_file=index_file,
                row_group=group,
            )
        )
    return refs


def plan_new_run(
    cfg: Config,
    run_id: str,
    model_info: dict[str, Any],
    timings: dict[str, Any] | None = None,
    flow_run_id: str | None = None,
    scan: Scan | None = None,
    models: list[dict[str, Any]] | None = None,
) -> RunPlan:
    """Scan ``input.root`` into the index, cut shards, write the first manifest.

    Temp files that killed writers left in ``output.root`` (of runs no live process holds) are
    removed first. With ``run.skip_scored`` the images already scored are filtered out of the
    stream and counted in ``already_scored`` (``incremental`` records how); in sha256 mode their
    content hashes go to ``runs/RUN/content_hashes.parquet``. Shard ``i`` covers rows
    ``[i*shard_size, min((i+1)*shard_size, N))`` of the sorted list, so ids are deterministic for
    a given folder state. ``flow_run_id`` lets a Prefect retry of the same flow run find and
    resume this run (:func:`imgscore.runstate.resume.find_retried_run`). ``scan``: an already
    opened scan (default: ``open_scan`` of ``input.root``; benchmarks/scale_plan.py passes
    synthetic ones).
    ``models``: every model the run scores (``name`` + ``LoadedModel.info()``), default
    ``[model_info]``; each shard then holds images × models (image, model) pairs.

    ``output.root`` inside ``input.root`` is left out of the scan (recorded in the manifest's
    ``input.output_root_left_out``); the two the same folder is refused.

    Raises:
        UsageError: a run with this id already exists; InputError: bad root or no images;
            ConfigError: output.root is input.root.
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    model_info = {**model_info, "decode": decode_settings(cfg.input)}  # part of the skip_scored key
    out = cfg.output.root
    run_dir = run_dir_of(out, run_id)
    if storage.exists(storage.path(run_dir, MANIFEST)):
        raise UsageError(f"run {run_id!r} already exists in {out}; use `imgscore rerun {run_id}` or another run.run_id")
    left_out = check_roots_apart(cfg.input.root, out) if scan is None and cfg.input.root is not None else None
    storage.make_dirs(run_dir)
    moved = migrate.migrate_output_root(out)  # runs of earlier versions: into today's part-file layout
    removed = run_lock.clean_abandoned_temp_files(out, skip_run=run_id)
    scan = scan or open_scan(
        input_root_of(cfg),
        cfg.input.layout,
        cfg.input.follow_symlinks,
        cfg.input.formats,
        exclude=out if left_out else None,
    )
    infos = [{**m, "decode": model_info["decode"]} for m in models] if models else [model_info]
    skip = _skip_filter(cfg, infos, scan.root, run_id) if cfg.run.skip_scored else None
    planned = _stream_into_index(cfg, scan, skip, run_dir, len(infos))
    planned.left_out = left_out
    timings = _plan_timings(timings, planned, time.perf_counter() - t0, removed, len(moved.runs))
    manifest = _first_manifest(cfg, run_id, model_info, infos, planned, started, timings, flow_run_id)
    state = RunState.create(run_dir, manifest)
    return RunPlan(run_id, manifest.run_date or "", run_dir, shard_refs(manifest, run_dir), state)


def input_root_of(cfg: Config) -> AnyPath:
    """``input.root``, which a run needs.

    Raises:
        InputError: it is not set (the CLI refuses this before; a flow run from Python may not).
    """
    if cfg.input.root is None:
        raise InputError("input.root is not set; pass --set input.root=/path/to/images or set it in the config")
    return cfg.input.root


def _skip_filter(cfg: Config, infos: list[dict[str, Any]], input_root: AnyPath, run_id: str) -> SkipFilter:
    """``run.skip_scored``'s filter over earlier runs into ``output.root``: one per model, joined
    when the run scores several (:class:`~imgscore.runstate.already_scored.AlreadyScoredEach`)."""
    run = cfg.run
    each = [
        AlreadyScored(cfg.output.root, m, input_root, run.skip_key, exclude_run=run_id, retry_failed=run.retry_failed)
        for m in infos
    ]
    return each[0] if len(each) == 1 else AlreadyScoredEach(each, [m.get("name") or "" for m in infos])


@dataclass
class _Planned:
    """What planning found: the scan (root, layout, classes, skipped files), the incremental
    filter (or None), the index streamed from them, and how: seconds scanning and in the filter,
    the scan's threads, the images the failure ledger carried (by error type and by run), and
    ``output.root``'s place inside ``input.root`` (None: outside)."""

    scan: Scan
    skip: SkipFilter | None
    index: IndexWriter
    scan_s: float
    lookup_s: float
    threads: int
    carried: dict[str, Any]
    left_out: str | None = None


def _stream_into_index(cfg: Config, scan: Scan, skip: SkipFilter | None, run_dir: UPath, n_models: int) -> _Planned:
    """Stream ``scan``'s batches through ``skip`` (when given) into the run's index, writing the
    listings beside it (:class:`~imgscore.runstate.listings.Listings`). Memory: a few batches
    and one shard's rows.

    Raises:
        InputError: the scan found no image at all. Anything the scan, the filter or a write
            raises propagates after the index folder and the listings are removed (nothing of a
            run that was not planned stays).
    """
    threads = scan_threads_for(scan.root, cfg.input.scan_threads)
    listings = Listings(run_dir, skip, cfg.run.skip_key)
    scan_s = lookup_s = 0.0
    try:
        with IndexWriter(run_dir, cfg.run.shard_size, n_models=n_models) as index:
            batches = scan.batches(threads)
            while True:
                t = time.perf_counter()
                batch = next(batches, None)
                scan_s += time.perf_counter() - t
                if batch is None:
                    break
                if skip is not None:
                    t = time.perf_counter()
                    batch = skip.filter(batch)
                    listings.write()
                    lookup_s += time.perf_counter() - t
                index.write(batch)
            if scan.images == 0:
                raise InputError(no_images_message(scan.root, cfg.input.formats))
    except BaseException:
        listings.abort()
        storage.delete_tree(storage.path(run_dir, INDEX_NAME))  # nothing of a run that was not planned
        raise
    listings.close()
    return _Planned(scan, skip, index, scan_s, lookup_s, threads, listings.carried_summary)


def _plan_timings(
    timings: dict[str, Any] | None, planned: _Planned, plan_s: float, removed: int, migrated: int
) -> dict[str, Any]:
    """The manifest's ``timings`` at planning: the caller's, then scanning and planning seconds,
    the scan's threads, and the temp files removed and runs migrated first (when any)."""
    timings = {
        **(timings or {}),
        "scan_s": round(planned.scan_s, 3),
        "plan_s": round(plan_s, 3),
        "scan_threads": planned.threads,
    }
    if removed:
        timings["temp_files_removed"] = removed
    if migrated:
        timings["layout_migrated_runs"] = migrated
    return timings


def _incremental_record(cfg: Config, planned: _Planned, mkey: str) -> dict[str, Any]:
    """The manifest's ``incremental`` section: how ``run.skip_scored`` chose the images."""
    skip = planned.skip
    if skip is None:
        return {"skip_scored": False}
    incremental = {
        "skip_scored": True,
        "skip_key": cfg.run.skip_key,
        "model_key": mkey,
        "prior_runs": skip.prior_runs,
        "already_scored": skip.already_scored,
        "already_failed": skip.already_failed,
        "retry_failed": cfg.run.retry_failed,
        "files_hashed": skip.hashed,
        "lookup_s": round(planned.lookup_s, 4),
    }
    if skip.already_failed:
        incremental["carried"] = {"file": CARRIED_FILE, **planned.carried}
    return incremental


def _first_manifest(
    cfg: Config,
    run_id: str,
    model_info: dict[str, Any],
    infos: list[dict[str, Any]],
    planned: _Planned,
    started: datetime,
    timings: dict[str, Any],
    flow_run_id: str | None,
) -> Manifest:
    """The run's first manifest: its facts, counts, models, recorded config and every shard's record."""
    scan, skip, index = planned.scan, planned.skip, planned.index
    mkey = model_key(model_info)
    models = [{**m, "model_key": model_key(m)} for m in infos]
    run_date = run_date_of(run_id, started)
    pairs = sum(s.pairs for s in index.shards)  # (image, model) pairs to score
    tables = ("predictions", "errors", *(("embeddings",) if cfg.output.embeddings else ()))
    return Manifest(
        run_id=run_id,
        run_date=run_date,
        flow_run_id=flow_run_id,
        status="running",
        created_at=started.isoformat(),
        updated_at=now_iso(),
        input={
            "root": input_root_name(scan.root),
            "layout": scan.layout,
            "classes": scan.classes,
            **({"output_root_left_out": planned.left_out} if planned.left_out else {}),
        },
        counts=Counts(
            scanned=index.rows,
            pairs=pairs,
            skipped=len(scan.skipped),
            already_scored=skip.already_scored if skip else 0,
            already_failed=skip.already_failed if skip else 0,
            pending=pairs,
        ),
        skipped=scan.skipped,
        model={**model_info, "model_key": mkey},
        models=models if len(models) > 1 or "name" in models[0] else [],
        config=cfg.recorded(),
        incremental=_incremental_record(cfg, planned, mkey),
        index=index.info(),
        shards=[
            ShardRecord(
                shard_id=s.shard_id,
                start=s.start,
                stop=s.stop,
                images=s.stop - s.start,
                pairs=s.pairs,
                fingerprint=s.fingerprint,
            )
            for s in index.shards
        ],
        outputs={t: str(part_dir(cfg.output.root, t, run_date, run_id)) for t in tables},
        timings={**timings, "planned_at_s": round(time.time(), 3)},
    )
