"""Read and update ``runs/RUN_ID/manifest.json`` — the run's source of truth.

"Done" for a shard means its part files are committed and its state is recorded here (a
Prefect cache hit alone is not enough). Only the flow process writes the manifest; shard task
runs write their own ``shards/SSSSS.json`` state files, which the flow folds in.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

from tasks.parquet_io import write_json_atomic

_LOCK = threading.Lock()


def manifest_path(out_root: str | Path, run_id: str) -> Path:
    return Path(out_root) / "runs" / run_id / "manifest.json"


def read_manifest(path: str | Path) -> dict:
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
    with _LOCK:
        manifest["updated_at"] = datetime.now(UTC).isoformat()
        write_json_atomic(manifest, Path(run_dir) / "manifest.json")
