"""Plan a run: stream the scan into the index, cut shards, write the first manifest.

Planning holds no list of the images: the scan's record batches (:mod:`imgscore.images.scan`)
pass through the incremental filter (``run.skip_scored``) into the index writer
(:mod:`imgscore.runstate.index`), which cuts a shard every ``run.shard_size`` rows. Memory is a few
batches and one shard's rows, whatever the number of images; the manifest holds one small
record per shard (:mod:`imgscore.runstate.manifest`).

The caller holds the run's lock (``imgscore.runstate.lock.held``) around planning and scoring.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from upath import UPath

from imgscore.config.schema import Config
from imgscore.errors import InputError, UsageError
from imgscore.images.scan import (
    Scan,
    check_roots_apart,
    no_images_message,
    open_scan,
    scan_threads_for,
)
from imgscore.io import storage
from imgscore.io.containment import UnsafePathError, create_new, within
from imgscore.io.parquet import input_root_name, part_dir, temp_path
from imgscore.io.storage import AnyPath
from imgscore.runstate import lock as run_lock
from imgscore.runstate import migrate
from imgscore.runstate.commits import check_run_state, run_dir_of, run_folders
from imgscore.runstate.incremental import (
    CARRIED_FILE,
    CARRIED_SCHEMA,
    HASHES_FILE,
    HASHES_SCHEMA,
    AlreadyScored,
    AlreadyScoredEach,
    decode_settings,
    model_key,
)
from imgscore.runstate.index import INDEX_NAME, IndexWriter, shard_location
from imgscore.runstate.manifest import (
    MANIFEST,
    Counts,
    Manifest,
    RunState,
    ShardRecord,
    ShardRef,
    clear_stop,
    load_manifest,
    models_id,
    now_iso,
)


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
                run_id=manifest.run_id, run_date=manifest.run_date or "", run_dir=str(run_dir), input_root=manifest.input["root"],
                shard_id=s.shard_id, start=s.start, stop=s.stop, fingerprint=s.fingerprint or "", model_key=mkey,
                model_id=model_id, index_file=index_file, row_group=group,
            )
        )
    return refs


def load_plan(run_dir: AnyPath) -> RunPlan:
    """An existing run's plan and state (summary + ledger), to write on: a retry or a rerun.
    ``run_dir`` is ``OUT/runs/RUN_ID`` (:func:`run_dir_of`); every path the run state names is
    checked to stay inside ``OUT`` first (``imgscore.runstate.commits.check_run_state``).

    Raises:
        FileNotFoundError: no manifest.json in ``run_dir``.
        UnsafePathError: the run state names a path outside ``OUT`` (exit 2).
    """
    run_dir = storage.path(run_dir)
    clear_stop(run_dir)  # an interrupted run taken up again: its shards may start and commit
    state = RunState.open(run_dir)
    m = state.manifest
    check_run_state(m, storage.parent_of(storage.parent_of(run_dir)), run_dir)
    return RunPlan(m.run_id, m.run_date or "", run_dir, shard_refs(m, run_dir), state)


def _manifest_head(path: Path, limit: int = 65536) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except OSError:
        return ""


def find_retried_run(out_root: AnyPath, flow_run_id: str | None, run_id: str | None, run_count: int) -> str | None:
    """The run id an earlier attempt of this same Prefect flow run planned, or None.

    A retry of a flow run (Prefect UI "Retry", ``prefect flow-run retry``, ``retries=``) calls
    the flow again with the same parameters and the same flow run id: with ``run.run_id`` set we
    look at that run only; without it, at every manifest in ``out_root`` (newest first) — but
    only when ``run_count`` (Prefect's count of this flow run's attempts) says this is a retry.
    """
    if not flow_run_id or (run_id is None and run_count <= 1):
        return None
    if storage.is_remote(out_root):
        runs_url = storage.join(out_root, "runs")
        urls = [storage.join(runs_url, run_id, MANIFEST)] if run_id else sorted(storage.glob(storage.join(runs_url, "*", MANIFEST)), reverse=True)
        for url in urls:
            try:
                if json.loads(storage.read_bytes(url)).get("flow_run_id") == str(flow_run_id):
                    return storage.name_of(storage.parent_of(url))
            except (OSError, ValueError):
                continue
        return None
    runs = Path(out_root) / "runs"
    candidates = [runs / run_id / MANIFEST] if run_id else sorted(runs.glob(f"*/{MANIFEST}"), reverse=True)
    for path in candidates:
        if not within(os.path.realpath(path), os.path.realpath(runs)):
            continue  # a link out of the output root: not a manifest of this root
        if str(flow_run_id) not in _manifest_head(path):
            continue  # the id sits near the top of a manifest: most files are never parsed
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("flow_run_id") == str(flow_run_id):
                return path.parent.name
        except (OSError, ValueError):
            continue
    return None


def resume_plan(out_root: AnyPath, run_id: str, flow_run_id: str | None, input_root: AnyPath | None = None) -> RunPlan | None:
    """The plan of ``run_id`` when this same flow run wrote it (a retry), with the temp files its
    killed attempt left removed; None when the run does not exist yet. Shards whose commit
    records match their part files are not scored again (``imgscore.runstate.commits.committed``).

    ``input_root``: the flow run's ``input.root``; the manifest must name the same folder (the
    manifest is read back from the output root, the flow run's parameters are not).

    Raises:
        UsageError: the run exists but belongs to another flow run (or to none), or its manifest
            names another input folder; UnsafePathError: its run state names a path outside
            ``out_root``.
    """
    run_dir = run_dir_of(out_root, run_id)
    if not storage.exists(storage.path(run_dir, MANIFEST)):
        return None
    m = load_manifest(run_dir)
    if not flow_run_id or m.flow_run_id != str(flow_run_id):
        raise UsageError(f"run {run_id!r} already exists in {out_root}; use `imgscore rerun {run_id}` or another run.run_id")
    recorded = m.input.get("root")
    if input_root is not None and (not recorded or not storage.same_root(recorded, input_root)):
        raise UnsafePathError(f"run {run_id}: manifest.json input.root {recorded!r} is not the flow run's input.root "
                              f"{str(input_root)!r}; the run state was edited — restore it, or start a new run")
    plan = load_plan(run_dir)
    run_lock.clean_run_temp_files(run_folders(out_root, plan.run_date, run_id))
    plan.manifest.outputs = {t: str(part_dir(out_root, t, plan.run_date, run_id)) for t in ("predictions", "errors")}
    return plan


def plan_new_run(cfg: Config, run_id: str, model_info: dict, timings: dict | None = None, flow_run_id: str | None = None,
                 scan: Scan | None = None, models: list[dict] | None = None) -> RunPlan:
    """Scan ``input.root`` into the index, cut shards, write the first manifest.

    Temp files that killed writers left in ``output.root`` (of runs no live process holds) are
    removed first. With ``run.skip_scored`` the images already scored are filtered out of the
    stream and counted in ``already_scored`` (``incremental`` records how); in sha256 mode their
    content hashes go to ``runs/RUN/content_hashes.parquet``. Shard ``i`` covers rows
    ``[i*shard_size, min((i+1)*shard_size, N))`` of the sorted list, so ids are deterministic for
    a given folder state. ``flow_run_id`` lets a Prefect retry of the same flow run find and
    resume this run (:func:`find_retried_run`). ``scan``: an already opened scan (default:
    ``open_scan`` of ``input.root``; benchmarks/scale_plan.py passes synthetic ones).
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
    left_out = check_roots_apart(cfg.input.root, out) if scan is None else None  # output.root inside input.root: not scanned
    storage.make_dirs(run_dir)
    moved = migrate.migrate_output_root(out)  # runs of earlier versions: into today's part-file layout
    removed = run_lock.clean_abandoned_temp_files(out, skip_run=run_id)
    scan = scan or open_scan(cfg.input.root, cfg.input.layout, cfg.input.follow_symlinks, cfg.input.formats,
                             exclude=out if left_out else None)
    threads = scan_threads_for(scan.root, cfg.input.scan_threads)
    infos = [{**m, "decode": model_info["decode"]} for m in models] if models else [model_info]
    skip = None
    if cfg.run.skip_scored:
        each = [AlreadyScored(out, m, scan.root, cfg.run.skip_key, exclude_run=run_id, retry_failed=cfg.run.retry_failed) for m in infos]
        skip = each[0] if len(each) == 1 else AlreadyScoredEach(each, [m.get("name") or "" for m in infos])
    listings = _Listings(run_dir, skip, cfg.run.skip_key)
    scan_s = lookup_s = 0.0
    try:
        with IndexWriter(run_dir, cfg.run.shard_size, n_models=len(infos)) as index:
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

    mkey = model_key(model_info)
    models = [{**m, "model_key": model_key(m)} for m in infos]
    incremental = {"skip_scored": False}
    if skip is not None:
        incremental = {"skip_scored": True, "skip_key": cfg.run.skip_key, "model_key": mkey, "prior_runs": skip.prior_runs,
                       "already_scored": skip.already_scored, "already_failed": skip.already_failed,
                       "retry_failed": cfg.run.retry_failed, "files_hashed": skip.hashed, "lookup_s": round(lookup_s, 4)}
        if skip.already_failed:
            incremental["carried"] = {"file": CARRIED_FILE, **listings.carried_summary}
    run_date = run_date_of(run_id, started)
    n = index.rows
    pairs = sum(s.pairs for s in index.shards)  # (image, model) pairs to score
    timings = {**(timings or {}), "scan_s": round(scan_s, 3), "plan_s": round(time.perf_counter() - t0, 3), "scan_threads": threads}
    if removed:
        timings["temp_files_removed"] = removed
    if moved.runs:
        timings["layout_migrated_runs"] = len(moved.runs)
    manifest = Manifest(
        run_id=run_id,
        run_date=run_date,
        flow_run_id=flow_run_id,
        status="running",
        created_at=started.isoformat(),
        updated_at=now_iso(),
        input={"root": input_root_name(scan.root), "layout": scan.layout, "classes": scan.classes,
               **({"output_root_left_out": left_out} if left_out else {})},
        counts=Counts(scanned=n, pairs=pairs, skipped=len(scan.skipped), already_scored=skip.already_scored if skip else 0,
                      already_failed=skip.already_failed if skip else 0, pending=pairs),
        skipped=scan.skipped,
        model={**model_info, "model_key": mkey},
        models=models if len(models) > 1 or "name" in models[0] else [],
        config=cfg.recorded(),
        incremental=incremental,
        index=index.info(),
        shards=[
            ShardRecord(shard_id=s.shard_id, start=s.start, stop=s.stop, images=s.stop - s.start, pairs=s.pairs, fingerprint=s.fingerprint)
            for s in index.shards
        ],
        outputs={t: str(part_dir(out, t, run_date, run_id)) for t in ("predictions", "errors", *(("embeddings",) if cfg.output.embeddings else ()))},
        timings={**timings, "planned_at_s": round(time.time(), 3)},
    )
    state = RunState.create(run_dir, manifest)
    return RunPlan(run_id, run_date, run_dir, shard_refs(manifest, run_dir), state)


class _Listings:
    """The files planning writes beside the index as the scan streams through the incremental
    filter: ``content_hashes.parquet`` (sha256 mode) and ``already_failed.parquet`` (images
    carried by the failure ledger), each temp-then-rename at the end; and what was carried,
    counted per error type and per run that recorded the failure (for the manifest)."""

    def __init__(self, run_dir: AnyPath, skip: AlreadyScored | AlreadyScoredEach | None, skip_key: str):
        self.run_dir, self.skip = run_dir, skip
        self.remote = storage.is_remote(run_dir)  # an object store: each file built in memory, one PUT at the end
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.files: dict[str, object] = {}
        self.schemas = {}
        if skip is not None:
            if skip_key == "sha256":
                self.schemas[HASHES_FILE] = HASHES_SCHEMA
            self.schemas[CARRIED_FILE] = CARRIED_SCHEMA
        self.by_type: dict[str, int] = {}
        self.by_run: dict[str, int] = {}

    def _tmp(self, name: str) -> UPath:
        return temp_path(storage.path(self.run_dir, name))

    def _open(self, name: str) -> None:
        # created new: a symlink planted at the name is not written through
        f = pa.BufferOutputStream() if self.remote else os.fdopen(create_new(self._tmp(name)), "wb")
        self.files[name] = f
        self.writers[name] = pq.ParquetWriter(f, self.schemas[name], compression="zstd")

    def _put(self, name: str, table: pa.Table) -> None:
        if name not in self.schemas or table.num_rows == 0:
            return
        if name not in self.writers:
            self._open(name)
        self.writers[name].write_table(table)

    def write(self) -> None:
        """Take what the filter produced since the last call and append it."""
        if HASHES_FILE in self.schemas:
            self._put(HASHES_FILE, self.skip.take_hashes())
        carried = self.skip.take_carried()
        for col, counts in (("error_type", self.by_type), ("failed_run_id", self.by_run)):
            for row in pc.value_counts(carried[col]).to_pylist() if carried.num_rows else []:
                counts[row["values"]] = counts.get(row["values"], 0) + row["counts"]
        self._put(CARRIED_FILE, carried)

    @property
    def carried_summary(self) -> dict:
        return {"by_error_type": dict(sorted(self.by_type.items(), key=lambda kv: -kv[1])),
                "by_run": dict(sorted(self.by_run.items(), reverse=True))}

    def close(self) -> None:
        if HASHES_FILE in self.schemas and HASHES_FILE not in self.writers:  # sha256 mode: written even when empty
            self._open(HASHES_FILE)
        for name, w in self.writers.items():
            w.close()
            if self.remote:
                storage.write_bytes(storage.join(self.run_dir, name), self.files[name].getvalue().to_pybytes())
                continue
            self.files[name].close()
            self._tmp(name).replace(self.run_dir / name)
        self.writers, self.files = {}, {}

    def abort(self) -> None:
        for name, w in self.writers.items():
            w.close()
            if not self.remote:
                self.files[name].close()
                self._tmp(name).unlink(missing_ok=True)
        self.writers, self.files = {}, {}

