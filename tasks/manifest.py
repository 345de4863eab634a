"""Shards' part files and commit records, checked against the run state (``imgscore rerun``).

The run state itself — the typed :class:`~imgscore.tasks.runstate.Manifest`, the ledger and the
one place a shard result is applied — is :mod:`imgscore.tasks.runstate`. This module answers
the questions a rerun asks: is this shard's commit backed by good part files
(:func:`check_shard`), which committed shards did the manifest miss (:func:`adopt_committed`),
and what is left to rescore (:func:`plan_rerun`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from imgscore.tasks.parquet_io import ERRORS_SCHEMA, PREDICTIONS_SCHEMA, part_dir, part_name
from imgscore.tasks.runstate import (
    Manifest,
    ShardRecord,
    ShardResult,
    load_manifest,
    read_commit_record,
    read_manifest,
)

__all__ = ["ShardWork", "adopt_committed", "check_part", "check_shard", "load_manifest", "manifest_path", "plan_rerun",
           "read_manifest", "shard_files"]


def manifest_path(out_root: str | Path, run_id: str) -> Path:
    """``OUT/runs/RUN_ID/manifest.json``."""
    return Path(out_root) / "runs" / run_id / "manifest.json"


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


def check_shard(out_root: str | Path, run_date: str, run_id: str, record: ShardRecord | ShardResult) -> str | None:
    """Why a shard record (manifest entry or ``score_shard`` result) is not backed by good part
    files under ``out_root``, or None when both files match its ``scored``/``failed`` counts."""
    pred, err = shard_files(out_root, run_date, run_id, record.shard_id)
    why = check_part(pred, PREDICTIONS_SCHEMA, record.scored)
    if why:
        return f"predictions {pred.name}: {why}"
    why = check_part(err, ERRORS_SCHEMA, record.failed)
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


def adopt_committed(manifest: Manifest, run_dir: str | Path, out_root: str | Path) -> list[int]:
    """Apply to ``manifest`` the shards whose commit record ``shards/SSSSS.json`` exists and whose
    part files match it, but which the manifest does not show as finished — or, for a ``partial``
    shard, whose record is from a later attempt (a run or rerun was killed between the shard's
    commit and its ledger line). Returns their ids; saves nothing.
    """
    adopted = []
    for entry in manifest.shards:
        if entry.state == "complete":
            continue
        rec = read_commit_record(run_dir, entry.shard_id)
        if rec is None or rec.fingerprint != entry.fingerprint or rec.state not in ("complete", "partial"):
            continue
        if entry.state == "partial" and rec.attempt <= entry.attempts:
            continue  # the record the manifest already holds; a later attempt's record is adopted
        if check_shard(out_root, manifest.run_date, manifest.run_id, rec) is None:
            files = [str(f) for f in shard_files(out_root, manifest.run_date, manifest.run_id, entry.shard_id)]
            manifest.apply(rec.model_copy(update={"files": files, "reason": None}))
            adopted.append(entry.shard_id)
    return adopted


def plan_rerun(manifest: Manifest, out_root: str | Path) -> list[ShardWork]:
    """Which shards a rerun rescores, and how.

    - ``complete`` with good part files: nothing.
    - ``partial`` with good part files and every failed image named: only those images; the
      shard's other prediction rows are kept as they are.
    - anything else — ``pending``, ``running``, ``failed``, or a part file missing, corrupt
      (footer unreadable), of another schema or with the wrong row count: the whole shard.
    """
    work = []
    for e in manifest.shards:
        bad = check_shard(out_root, manifest.run_date, manifest.run_id, e) if e.state in ("complete", "partial") else None
        if e.state == "complete" and bad is None:
            continue
        if e.state == "partial" and bad is None:
            names = e.failed_images
            if names and len(names) == e.failed:
                work.append(ShardWork(e.shard_id, list(names), f"{len(names)} failed image(s)"))
                continue
        work.append(ShardWork(e.shard_id, None, bad or f"state {e.state}"))
    return work
