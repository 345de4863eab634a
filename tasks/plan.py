"""Plan a run: scan, cut the sorted image list into shards, write the index and the manifest.

``runs/RUN_ID/index.parquet`` holds the scanned images with one row group per shard, so a shard
task reads only its own rows; ``runs/RUN_ID/manifest.json`` is the run's source of truth and
starts with every shard ``pending``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from imgscore.tasks import lock as run_lock
from imgscore.tasks.config import Config
from imgscore.tasks.incremental import HASHES_FILE, model_key, split_already_scored
from imgscore.tasks.parquet_io import part_dir, write_json_atomic
from imgscore.tasks.scan import INDEX_SCHEMA, ImageEntry, ImageIndex, _entry, entries_from_table
from imgscore.tasks.score import ShardRef


def new_run_id(now: datetime | None = None) -> str:
    """``YYYYMMDDTHHMMSSZ-xxxxxx``: sortable by start time, unique across concurrent runs."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def shard_fingerprint(entries: list[ImageEntry]) -> str:
    """sha256 over the shard's (image_path, size, mtime_ns) rows: changes when any file changes."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.image_path}\t{e.size}\t{e.mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class RunPlan:
    run_id: str
    run_date: str
    run_dir: Path
    shards: list[ShardRef]
    manifest: dict


def plan_run(
    cfg: Config,
    index: ImageIndex,
    model_info: dict,
    run_id: str | None = None,
    timings: dict | None = None,
    already_scored: int = 0,
    flow_run_id: str | None = None,
    incremental: dict | None = None,
    content_hashes: pa.Table | None = None,
) -> RunPlan:
    """Cut ``index`` into shards of ``cfg.run.shard_size``, write index.parquet and manifest.json.

    Shard ``i`` covers rows ``[i*shard_size, min((i+1)*shard_size, N))`` of the sorted list, so
    ids are deterministic for a given folder state. ``index`` holds only the images this run
    scores: with ``run.skip_scored`` the images already scored are left out of it and counted in
    ``already_scored`` (``incremental`` records how they were found; ``content_hashes``, in
    sha256 mode, is written to ``runs/RUN/content_hashes.parquet``). ``flow_run_id`` lets a
    Prefect retry of the same flow run find and resume this run (:func:`resume_plan`).

    Raises:
        UsageError: a run with this id already exists in ``output.root``.
    """
    started = datetime.now(UTC)
    run_id = run_id or cfg.run.run_id or new_run_id(started)
    run_date = started.strftime("%Y-%m-%d")
    out = Path(cfg.output.root)
    run_dir = out / "runs" / run_id
    if (run_dir / "manifest.json").exists():
        from imgscore.tasks.errors import UsageError

        raise UsageError(f"run {run_id!r} already exists in {out}; use `imgscore rerun {run_id}` or another run.run_id")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_lock.acquire(run_dir, "imgscore run")  # released by the flow when it ends (tasks/lock.py)
    try:
        return _write_plan(cfg, index, model_info, run_id, run_date, run_dir, started, timings, already_scored, flow_run_id, incremental, content_hashes)
    except BaseException:
        run_lock.release(run_dir)
        raise


def _write_plan(cfg, index, model_info, run_id, run_date, run_dir, started, timings, already_scored, flow_run_id, incremental, content_hashes) -> RunPlan:
    out = Path(cfg.output.root)
    size = cfg.run.shard_size
    table = index.to_table()
    tmp = run_dir / ".index.parquet.tmp"
    pq.write_table(table, tmp, row_group_size=size, compression="zstd")
    tmp.replace(run_dir / "index.parquet")
    if content_hashes is not None:
        tmp = run_dir / f".{HASHES_FILE}.tmp"
        pq.write_table(content_hashes, tmp, compression="zstd")
        tmp.replace(run_dir / HASHES_FILE)
    mkey = model_key(model_info)

    shards: list[ShardRef] = []
    for sid, start in enumerate(range(0, len(index.entries), size)):
        stop = min(start + size, len(index.entries))
        shards.append(
            ShardRef(
                run_id=run_id,
                run_date=run_date,
                run_dir=str(run_dir),
                input_root=str(index.root),
                shard_id=sid,
                start=start,
                stop=stop,
                fingerprint=shard_fingerprint(index.entries[start:stop]),
                model_key=mkey,
            )
        )
    index_fp = hashlib.sha256("".join(s.fingerprint for s in shards).encode()).hexdigest()
    manifest = {
        "run_id": run_id,
        "run_date": run_date,
        "flow_run_id": flow_run_id,
        "status": "running",
        "created_at": started.isoformat(),
        "updated_at": started.isoformat(),
        "input": {"root": str(index.root), "layout": index.layout, "classes": index.classes},
        "counts": {
            "scanned": len(index.entries),
            "scored": 0,
            "failed": 0,
            "skipped": len(index.skipped),
            "already_scored": already_scored,
        },
        "skipped": index.skipped,
        "model": {**model_info, "model_key": mkey},
        "config": cfg.to_dict(),
        "incremental": incremental or {"skip_scored": False},
        "index": {"file": "index.parquet", "fingerprint": index_fp, "images": len(index.entries), "shard_size": size},
        "shards": [
            {
                "shard_id": s.shard_id,
                "start": s.start,
                "stop": s.stop,
                "images": s.stop - s.start,
                "fingerprint": s.fingerprint,
                "state": "pending",
                "attempts": 0,
                "scored": 0,
                "failed": 0,
                "files": [],
            }
            for s in shards
        ],
        "outputs": {
            "predictions": str(part_dir(out, "predictions", run_date, run_id)),
            "errors": str(part_dir(out, "errors", run_date, run_id)),
        },
        "timings": {**(timings or {}), "planned_at_s": round(time.time(), 3)},
    }
    write_json_atomic(manifest, run_dir / "manifest.json")
    return RunPlan(run_id, run_date, run_dir, shards, manifest)


def load_plan(run_dir: str | Path, manifest: dict | None = None) -> RunPlan:
    """Rebuild a run's :class:`RunPlan` from its ``manifest.json`` (for a retry or a rerun).

    ``run_dir`` is where the run lives now (``output.root`` may have moved since planning); the
    shard refs point there. Raises ``FileNotFoundError`` when there is no manifest.
    """
    run_dir = Path(run_dir)
    if manifest is None:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    mkey = (manifest.get("model") or {}).get("model_key") or model_key(manifest.get("model") or {})
    shards = [
        ShardRef(
            run_id=manifest["run_id"],
            run_date=manifest["run_date"],
            run_dir=str(run_dir),
            input_root=manifest["input"]["root"],
            shard_id=s["shard_id"],
            start=s["start"],
            stop=s["stop"],
            fingerprint=s["fingerprint"],
            model_key=mkey,
        )
        for s in manifest["shards"]
    ]
    return RunPlan(manifest["run_id"], manifest["run_date"], run_dir, shards, manifest)


def resume_plan(out_root: str | Path, flow_run_id: str | None, run_id: str | None, run_count: int = 2) -> RunPlan | None:
    """The plan this same Prefect flow run wrote on an earlier attempt (its lock taken), or None.

    A retry of a flow run (Prefect UI "Retry", ``prefect flow-run retry``, ``retries=``) calls
    the flow again with the same parameters and the same flow run id: with ``run.run_id`` set
    we look at that run only; without it, at every manifest in ``out_root`` — but only when
    ``run_count`` (Prefect's count of this flow run's attempts) says this is a retry.

    Raises:
        RunLockedError: the run is being written by another live process.
    """
    if not flow_run_id or (run_id is None and run_count <= 1):
        return None
    runs = Path(out_root) / "runs"
    candidates = [runs / run_id / "manifest.json"] if run_id else sorted(runs.glob("*/manifest.json"), reverse=True)
    for path in candidates:
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if m.get("flow_run_id") == str(flow_run_id):
            run_lock.acquire(path.parent, "imgscore run (retry)")
            run_lock.clean_run_temp_files(_run_folders(out_root, m))
            return load_plan(path.parent, m)
    return None


def _run_folders(out_root: str | Path, m: dict) -> list[Path]:
    return [part_dir(out_root, t, m["run_date"], m["run_id"]) for t in ("predictions", "errors", "errors_history")] + [
        Path(out_root) / "runs" / m["run_id"]
    ]


def plan_new_run(cfg: Config, index: ImageIndex, model_info: dict, timings: dict, flow_run_id: str | None = None) -> RunPlan:
    """Plan a fresh run: clean temp files that killed writers left in ``output.root`` (of runs no
    live process holds), drop already-scored images when ``run.skip_scored`` is on
    (:mod:`imgscore.tasks.incremental`), then :func:`plan_run` (which takes the run's lock).

    Raises:
        UsageError: the run id exists; RunLockedError: never for a fresh id.
    """
    out = Path(cfg.output.root)
    removed = run_lock.clean_abandoned_temp_files(out)
    already, incremental, hashes = 0, {"skip_scored": False}, None
    if cfg.run.skip_scored:
        t0 = time.perf_counter()
        skip = split_already_scored(index, out, model_info, cfg.run.skip_key)
        index, already, hashes = skip.index, skip.already_scored, skip.hashes
        incremental = {
            "skip_scored": True,
            "skip_key": cfg.run.skip_key,
            "model_key": model_key(model_info),
            "prior_runs": skip.prior_runs,
            "already_scored": already,
            "files_hashed": skip.hashed,
            "lookup_s": round(time.perf_counter() - t0, 4),
        }
    timings = {**timings, "temp_files_removed": removed} if removed else timings
    return plan_run(
        cfg, index, model_info, timings=timings, already_scored=already, flow_run_id=flow_run_id, incremental=incremental, content_hashes=hashes
    )


def result_storage_path(out_root: str | Path) -> Path:
    """Where Prefect persists shard task results and cache records: ``OUT/_prefect/results``
    (absolute; ``_`` keeps it out of every table's glob)."""
    return (Path(out_root) / "_prefect" / "results").resolve()


def shard_cache_key(ref: ShardRef) -> str:
    """Prefect cache key of a shard task run: sha256 over run id, shard id and rows, the shard's
    content fingerprint (path, size, mtime of each image) and the model key (``model_id`` +
    resolved preprocessing). A flow-run retry gets the same key for every unchanged shard, so a
    completed shard's persisted result is reused; another run, a changed file or checkpoint, or
    other preprocessing give another key. Failed and crashed task runs store no result, so
    they are never cache hits."""
    blob = json.dumps([ref.run_id, ref.shard_id, ref.start, ref.stop, ref.fingerprint, ref.model_key])
    return "imgscore-shard-" + hashlib.sha256(blob.encode()).hexdigest()


def refresh_index(run_dir: str | Path, input_root: str | Path, shard_ids: list[int]) -> dict[int, str]:
    """Re-stat the images of ``shard_ids`` and rewrite ``index.parquet`` atomically.

    A file fixed since the run (a truncated JPEG replaced) then gets a prediction row with its
    current size and mtime, which later incremental runs compare against. The image list and the
    one-row-group-per-shard layout are unchanged; a file that is gone now gets a ``scan_error``.

    Returns:
        shard id → its new fingerprint (:func:`shard_fingerprint`), for the given shards.
    """
    run_dir = Path(run_dir)
    pf = pq.ParquetFile(run_dir / "index.parquet")
    wanted = set(shard_ids)
    fps: dict[int, str] = {}
    tmp = run_dir / f".index.parquet.{os.getpid()}.tmp"
    with pq.ParquetWriter(tmp, INDEX_SCHEMA, compression="zstd") as w:
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g)
            if g in wanted:
                root = str(input_root)
                fresh = [_entry(os.path.join(root, e.rel), root, e.label, e.label_name) for e in entries_from_table(t)]
                t = ImageIndex(Path(root), "flat", [], fresh).to_table()
                fps[g] = shard_fingerprint(fresh)
            w.write_table(t, row_group_size=max(1, t.num_rows))
    os.replace(tmp, run_dir / "index.parquet")
    return fps
