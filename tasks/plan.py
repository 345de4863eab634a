"""Plan a run: scan, cut the sorted image list into shards, write the index and the manifest.

``runs/RUN_ID/index.parquet`` holds the scanned images with one row group per shard, so a shard
task reads only its own rows; ``runs/RUN_ID/manifest.json`` is the run's source of truth and
starts with every shard ``pending``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from tasks.config import Config
from tasks.parquet_io import part_dir, write_json_atomic
from tasks.scan import ImageEntry, ImageIndex
from tasks.score import ShardRef


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
) -> RunPlan:
    """Cut ``index`` into shards of ``cfg.run.shard_size``, write index.parquet and manifest.json.

    Shard ``i`` covers rows ``[i*shard_size, min((i+1)*shard_size, N))`` of the sorted list, so
    ids are deterministic for a given folder state.
    """
    started = datetime.now(UTC)
    run_id = run_id or cfg.run.run_id or new_run_id(started)
    run_date = started.strftime("%Y-%m-%d")
    out = Path(cfg.output.root)
    run_dir = out / "runs" / run_id
    if (run_dir / "manifest.json").exists():
        from tasks.errors import UsageError

        raise UsageError(f"run {run_id!r} already exists in {out}; use `imgscore rerun {run_id}` or another run.run_id")
    run_dir.mkdir(parents=True, exist_ok=True)
    size = cfg.run.shard_size
    table = index.to_table()
    tmp = run_dir / ".index.parquet.tmp"
    pq.write_table(table, tmp, row_group_size=size, compression="zstd")
    tmp.replace(run_dir / "index.parquet")

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
            )
        )
    index_fp = hashlib.sha256("".join(s.fingerprint for s in shards).encode()).hexdigest()
    manifest = {
        "run_id": run_id,
        "run_date": run_date,
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
        "model": model_info,
        "config": cfg.to_dict(),
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
