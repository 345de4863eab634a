"""Step 3 of a shard: its part files, then its commit record — what makes the shard done
(:func:`commit_shard`); and the record of a shard that could not run at all
(:func:`commit_failed_shard`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from upath import UPath

from imgscore.errors import ShardStopped
from imgscore.images.entries import ImageEntry
from imgscore.inference.rows import RowContext, error_row
from imgscore.io import storage
from imgscore.io.containment import inside
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    file_metadata,
    make_table,
    part_dir,
    part_name,
    write_table_atomic,
)
from imgscore.io.storage import AnyPath
from imgscore.runstate.commits import check_shard
from imgscore.runstate.manifest import (
    ShardRef,
    ShardResult,
    commit_record_path,
    create_commit_record,
    read_commit_record,
    stop_requested,
    write_commit_record,
)

log = logging.getLogger("imgscore")


def commit_shard(
    ref: ShardRef,
    out_root: AnyPath,
    predictions: pa.Table,
    errors: pa.Table,
    result: ShardResult,
    embeddings: pa.Table | None = None,
    replace: bool = False,
) -> ShardResult:
    """Write the shard's predictions and errors part files (empty ones too), then its commit record.

    ``embeddings`` (``output.embeddings``): the shard's embeddings part file, written first, one
    row per predictions row; a shard is done only once its commit record exists, so a reader
    that joins on the predictions never sees vectors without their predictions.

    ``result`` is completed from the tables: ``state`` (``complete`` when there are no error
    rows, else ``partial``; ``failed`` stays), ``scored``/``failed`` (their row counts), ``failed_images``,
    ``files`` and ``finished_at``. A writer killed before the commit record leaves the shard
    not done (a rerun redoes it); killed after, the record is adopted.

    Exactly once without a rename (object stores have none): the part files go to their final,
    deterministic keys (a rewrite replaces them, never adds a file), and the commit record is
    created last and exclusively (:func:`~imgscore.runstate.manifest.create_commit_record`). When
    another writer of the same shard committed first, its record is returned as long as the part
    files now there match its counts (both writers wrote the whole shard); otherwise, or with
    ``replace`` (``imgscore rerun``, which holds the run's lock), this writer's record replaces it.

    Returns:
        The shard's commit record.

    Raises:
        UnsafePathError: a folder it writes into resolves outside ``out_root`` (a planted symlink).
        ShardStopped: the run is stopping (``runstate.request_stop``): nothing is written, so the
            manifest the interrupted run ends with counts every shard on disk.
    """
    if stop_requested(ref.run_dir):
        raise ShardStopped(f"shard {ref.shard_id}: not committed, the run is stopping")
    pred_dir, err_dir = (
        inside(out_root, part_dir(out_root, t, ref.run_date, ref.run_id), "part-file folder")
        for t in ("predictions", "errors")
    )
    record_folder = storage.parent_of(str(commit_record_path(ref.run_dir, ref.shard_id)))
    inside(out_root, record_folder, "commit-record folder")  # no planted link out
    if embeddings is not None:
        write_table_atomic(embeddings, embeddings_part(out_root, ref))
    pred_file = write_table_atomic(predictions, storage.path(pred_dir, part_name(ref.shard_id)))
    err_file = write_table_atomic(errors, storage.path(err_dir, part_name(ref.shard_id)))
    failed_images = sorted({p for p in errors["image_path"].to_pylist() if p is not None})
    result = result.model_copy(
        update={
            "state": "failed" if result.state == "failed" else ("complete" if errors.num_rows == 0 else "partial"),
            "scored": predictions.num_rows,
            "failed": errors.num_rows,
            "failed_images": failed_images,
            "files": [str(pred_file), str(err_file)],
            "finished_at": datetime.now(UTC).isoformat(),
        }
    )
    return _record(ref, out_root, result, replace)


def _record(ref: ShardRef, out_root: AnyPath, result: ShardResult, replace: bool) -> ShardResult:
    """Create the shard's commit record exclusively and return it; when another writer's record
    is there first and stands (same fingerprint, its part files matching its counts), return
    that one; with ``replace``, or when it does not stand, write this one over it."""
    if replace or not create_commit_record(ref.run_dir, result):
        winner = None if replace else read_commit_record(ref.run_dir, ref.shard_id)
        if (
            winner is not None
            and winner.fingerprint == result.fingerprint
            and winner.state in ("complete", "partial", "failed")
            and check_shard(out_root, ref.run_date, ref.run_id, winner) is None
        ):
            log.info("shard %d: another writer committed it first; its record stands", ref.shard_id)
            return winner.model_copy(update={"files": result.files})
        write_commit_record(ref.run_dir, result)
    return result


def embeddings_part(out_root: AnyPath, ref: ShardRef) -> UPath:
    """``OUT/embeddings/<the run's partition>/part-SSSSS.parquet``, checked to stay inside ``out_root``."""
    return storage.path(
        inside(out_root, part_dir(out_root, "embeddings", ref.run_date, ref.run_id), "part-file folder"),
        part_name(ref.shard_id),
    )


def commit_failed_shard(
    ref: ShardRef,
    entries: list[ImageEntry],
    out_root: AnyPath,
    model_info: dict[str, Any],
    reason: str,
    attempts: int,
    metadata: dict[str, Any] | None = None,
    models: list[dict[str, Any]] | None = None,
) -> ShardResult:
    """A shard that could not run after its retries: one errors row per (image, model) (stage
    ``inference``, type ``ShardFailed``, the reason as message), an empty predictions part, and
    state ``failed`` with the reason. ``models``: the run's models (manifest ``models``: ``name``,
    ``model_id``), default the one ``model_info`` describes."""
    models = models or [
        {"name": model_info.get("name") or model_info.get("arch") or "", "model_id": model_info.get("model_id") or ""}
    ]
    now = datetime.now(UTC)
    errors: list[dict[str, Any]] = []
    for e in entries:
        for m in models:
            if not e.wants(m.get("name") or ""):
                continue
            ctx = RowContext(
                ref.run_id,
                ref.input_root,
                ref.shard_id,
                attempts,
                m.get("model_id") or "",
                [],
                "",
                None,
                1,
                m.get("name") or "",
            )
            errors.append(error_row(ctx, e, None, "inference", "ShardFailed", reason[:2000], now))
    meta = file_metadata(model_info, ref.run_id, metadata)
    # an earlier attempt's vectors: no predictions stand beside them
    embeddings_part(out_root, ref).unlink(missing_ok=True)
    return commit_shard(
        ref,
        out_root,
        make_table([], PREDICTIONS_SCHEMA, meta),
        make_table(errors, ERRORS_SCHEMA, meta),
        ShardResult(
            shard_id=ref.shard_id,
            state="failed",
            images=len(entries),
            fingerprint=ref.fingerprint,
            attempt=attempts,
            reason=reason,
        ),
    )
