"""Read and update ``runs/RUN_ID/manifest.json`` — the run's source of truth.

"Done" for a shard means its part files are committed and its state is recorded here (a
Prefect cache hit alone is not enough). Only the flow process writes the manifest; shard task
runs write their own ``shards/SSSSS.json`` state files, which the flow folds in.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from imgscore.tasks.parquet_io import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    part_dir,
    part_name,
    write_json_atomic,
)

_LOCK = threading.Lock()


def manifest_path(out_root: str | Path, run_id: str) -> Path:
    """``OUT/runs/RUN_ID/manifest.json``."""
    return Path(out_root) / "runs" / run_id / "manifest.json"


def read_manifest(path: str | Path) -> dict:
    """The manifest at ``path`` as a dict. Raises ``FileNotFoundError`` / ``ValueError``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def recount(manifest: dict) -> dict:
    """Recompute ``counts`` from the shard entries: scanned = scored + failed + pending."""
    shards = manifest["shards"]
    c = manifest["counts"]
    c["scored"] = sum(s.get("scored", 0) for s in shards)
    c["failed"] = sum(s.get("failed", 0) for s in shards if s["state"] in ("complete", "partial")) + sum(
        s["images"] for s in shards if s["state"] == "failed"
    )
    c["pending"] = sum(s["images"] for s in shards if s["state"] in ("pending", "running"))
    return manifest


def record_shard(manifest: dict, run_dir: str | Path, result: dict) -> dict:
    """Fold a finished shard's state record (from ``score_shard``) into the manifest and save it."""
    with _LOCK:
        entry = manifest["shards"][result["shard_id"]]
        entry.update(
            {
                "state": result["state"],
                "attempts": result.get("attempt", entry.get("attempts", 0)),
                "scored": result["scored"],
                "failed": result["failed"],
                "failed_images": result.get("failed_images", []),
                "files": result.get("files", []),
                "device": result.get("device"),
                "worker": result.get("worker"),
                "seconds": result.get("seconds"),
                "warnings": result.get("warnings", {}),
                "reason": result.get("reason"),
            }
        )
        recount(manifest)
        manifest["updated_at"] = datetime.now(UTC).isoformat()
        write_json_atomic(manifest, Path(run_dir) / "manifest.json")
        return manifest


def save(manifest: dict, run_dir: str | Path) -> None:
    """Stamp ``updated_at`` and write ``run_dir/manifest.json`` atomically."""
    with _LOCK:
        manifest["updated_at"] = datetime.now(UTC).isoformat()
        write_json_atomic(manifest, Path(run_dir) / "manifest.json")


def check_part(path: str | Path, schema: pa.Schema, rows: int | None = None) -> str | None:
    """Why the part file at ``path`` is not a good commit, or None when it is.

    Reads only the footer: a missing file, a corrupt or truncated footer ("magic bytes not found"),
    a schema other than ``schema`` (names and types), or a row count other than ``rows`` (when
    given) are reported.
    """
    p = Path(path)
    if not p.is_file():
        return "missing"
    try:
        meta = pq.read_metadata(p)
        got = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    if [(f.name, f.type) for f in got] != [(f.name, f.type) for f in schema]:
        return "schema differs from the current one"
    if rows is not None and meta.num_rows != rows:
        return f"holds {meta.num_rows} rows, the shard record says {rows}"
    return None


def shard_files(out_root: str | Path, run_date: str, run_id: str, shard_id: int) -> tuple[Path, Path]:
    """(predictions part, errors part) paths of a shard under ``out_root``."""
    name = part_name(shard_id)
    return (
        part_dir(out_root, "predictions", run_date, run_id) / name,
        part_dir(out_root, "errors", run_date, run_id) / name,
    )


def check_shard(out_root: str | Path, run_date: str, run_id: str, record: dict) -> str | None:
    """Why a shard record (manifest entry or ``score_shard`` result) is not backed by good part
    files under ``out_root``, or None when both files match its ``scored``/``failed`` counts."""
    pred, err = shard_files(out_root, run_date, run_id, record["shard_id"])
    why = check_part(pred, PREDICTIONS_SCHEMA, record.get("scored"))
    if why:
        return f"predictions {pred.name}: {why}"
    why = check_part(err, ERRORS_SCHEMA, record.get("failed"))
    if why:
        return f"errors {err.name}: {why}"
    return None


@dataclass
class ShardWork:
    """What a rerun does for one shard: ``only`` the listed images (a partial shard whose other
    rows are kept), or the whole shard when ``only`` is None."""

    shard_id: int
    only: list[str] | None
    reason: str


def adopt_committed(manifest: dict, run_dir: str | Path, out_root: str | Path) -> list[int]:
    """Fold into ``manifest`` the shards whose commit record ``shards/SSSSS.json`` exists and whose
    part files match it, but which the manifest does not show as finished — or, for a ``partial``
    shard, whose record is from a later attempt (a run or rerun was killed between the shard's
    commit and the manifest update). Returns their ids; saves nothing.
    """
    adopted = []
    for entry in manifest["shards"]:
        if entry["state"] == "complete":
            continue
        p = Path(run_dir) / "shards" / f"{entry['shard_id']:05d}.json"
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if rec.get("fingerprint") != entry.get("fingerprint") or rec.get("state") not in ("complete", "partial"):
            continue
        if entry["state"] == "partial" and int(rec.get("attempt") or 0) <= int(entry.get("attempts") or 0):
            continue  # the record the manifest already holds; a later attempt's record is adopted
        if check_shard(out_root, manifest["run_date"], manifest["run_id"], rec) is None:
            entry.update(
                {
                    "state": rec["state"],
                    "attempts": max(int(rec.get("attempt") or 1), int(entry.get("attempts") or 0)),
                    "scored": rec["scored"],
                    "failed": rec["failed"],
                    "failed_images": rec.get("failed_images", []),
                    "files": [str(f) for f in shard_files(out_root, manifest["run_date"], manifest["run_id"], entry["shard_id"])],
                    "device": rec.get("device"),
                    "worker": rec.get("worker"),
                    "seconds": rec.get("seconds"),
                    "warnings": rec.get("warnings", {}),
                    "reason": None,
                }
            )
            adopted.append(entry["shard_id"])
    recount(manifest)
    return adopted


def plan_rerun(manifest: dict, out_root: str | Path) -> list[ShardWork]:
    """Which shards a rerun rescores, and how.

    - ``complete`` with good part files: nothing.
    - ``partial`` with good part files and every failed image named: only those images; the
      shard's other prediction rows are kept as they are.
    - anything else — ``pending``, ``running``, ``failed``, or a part file missing, corrupt
      (footer unreadable), of another schema or with the wrong row count: the whole shard.
    """
    work = []
    for e in manifest["shards"]:
        bad = check_shard(out_root, manifest["run_date"], manifest["run_id"], e) if e["state"] in ("complete", "partial") else None
        if e["state"] == "complete" and bad is None:
            continue
        if e["state"] == "partial" and bad is None:
            names = e.get("failed_images") or []
            if names and len(names) == e.get("failed"):
                work.append(ShardWork(e["shard_id"], list(names), f"{len(names)} failed image(s)"))
                continue
        work.append(ShardWork(e["shard_id"], None, bad or f"state {e['state']}"))
    return work
