"""Rescore one shard of an existing run and commit replacement part files (``imgscore rerun``).

The shard is scored by the same :func:`imgscore.tasks.score.score_shard` as a first run, into a staging
folder ``runs/RUN/_rerun/SSSSS/`` (its own small index and output root), and then committed into
the run's real part files:

1. the shard's current errors part, if it has rows, is copied to the errors history,
   ``OUT/errors_history/run_date=…/run_id=…/part-SSSSS-attempt-NNN.parquet`` (same schema, the
   rows keep their ``attempt``), so earlier attempts stay visible but are never counted twice;
2. the predictions part is replaced: for a partial shard, its kept rows (images that were scored
   before) plus the new rows, in index order — those kept rows are byte-for-byte the old values;
   for a whole shard, the new rows only;
3. the errors part is replaced by the errors of this attempt (images that still fail);
4. the commit record ``runs/RUN/shards/SSSSS.json`` is rewritten.

Every write is temp-then-rename, and every step is idempotent: a rerun killed at any moment is
finished by the next one (rows of the rescored images are dropped before the new ones are
added, so there are never two rows for one image).
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgscore.tasks.config import Config, OutputConfig
from imgscore.tasks.manifest import check_part, shard_files
from imgscore.tasks.parquet_io import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    part_dir,
    write_json_atomic,
    write_table_atomic,
)
from imgscore.tasks.scan import INDEX_SCHEMA
from imgscore.tasks.score import ShardRef, score_shard, shard_state_path

STAGING = "_rerun"


def history_path(out_root: str | Path, run_date: str, run_id: str, shard_id: int, attempt: int) -> Path:
    """Where superseded error rows of a shard's ``attempt`` are kept."""
    return part_dir(out_root, "errors_history", run_date, run_id) / f"part-{shard_id:05d}-attempt-{attempt:03d}.parquet"


def _read_ok(path: Path, schema: pa.Schema) -> pa.Table | None:
    if check_part(path, schema) is not None:
        return None
    return pq.read_table(path, schema=schema)


def archive_errors(out_root: str | Path, ref: ShardRef, fallback_attempt: int) -> Path | None:
    """Copy the shard's current error rows (if any, and readable) to the errors history; return
    the history file, or None when there was nothing to keep. An existing history file for the
    same attempt is left as it is (a replay after a crash)."""
    _, err = shard_files(out_root, ref.run_date, ref.run_id, ref.shard_id)
    old = _read_ok(err, ERRORS_SCHEMA)
    if old is None or old.num_rows == 0:
        return None
    attempt = pc.max(old["attempt"]).as_py() or fallback_attempt
    dest = history_path(out_root, ref.run_date, ref.run_id, ref.shard_id, int(attempt))
    if not dest.exists():
        write_table_atomic(old, dest)
    return dest


def _stage_index(run_dir: Path, stage_dir: Path, shard_id: int, only: list[str] | None) -> int:
    """Write ``stage_dir/index.parquet`` whose row group ``shard_id`` holds the shard's rows (only
    ``only`` when given); earlier groups are one-row placeholders never read. Returns its rows."""
    pf = pq.ParquetFile(run_dir / "index.parquet")
    t = pf.read_row_group(shard_id)
    if only is not None:
        t = t.filter(pc.is_in(t["image_path"], value_set=pa.array(sorted(set(only)), pa.string())))
    stage_dir.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(stage_dir / "index.parquet", INDEX_SCHEMA) as w:
        filler = t.slice(0, 1) if t.num_rows else pf.read_row_group(shard_id).slice(0, 1)
        for _ in range(shard_id):
            w.write_table(filler)
        w.write_table(t, row_group_size=max(1, t.num_rows))
    return t.num_rows


def rescore_shard(
    ref: ShardRef,
    only: list[str] | None,
    cfg: Config,
    attempt: int,
    workers_on_host: int = 1,
    metadata: dict | None = None,
) -> dict:
    """Rescore a shard (or ``only`` the named images of it) and commit replacement part files.

    Args:
        ref: the shard, with ``run_dir`` where the run lives now.
        only: image paths (``image_path`` values) to rescore, keeping the shard's other
            prediction rows; None rescores the whole shard.
        cfg: the run's recorded config with the allowed overrides applied.
        attempt: the attempt number written to new error rows and the manifest.

    Returns:
        The shard's new state record (as :func:`imgscore.tasks.score.score_shard` returns), with
        ``scored``/``failed`` counting the whole shard's rows after the commit and
        ``rescored`` the images scored in this attempt.

    Raises:
        ShardError: the shard could not run (model load, DataLoader crash); nothing is changed.
    """
    t0 = time.perf_counter()
    run_dir = Path(ref.run_dir)
    out_root = cfg.output.root
    stage_dir = run_dir / STAGING / f"{ref.shard_id:05d}"
    shutil.rmtree(stage_dir, ignore_errors=True)
    n = _stage_index(run_dir, stage_dir, ref.shard_id, only)
    stage_ref = ref.model_copy(update={"run_dir": str(stage_dir)})
    stage_out = OutputConfig(root=stage_dir / "out", topk=cfg.output.topk)
    staged = score_shard(
        stage_ref, cfg.input, cfg.model, cfg.preprocess, cfg.inference, stage_out,
        attempt=attempt, workers_on_host=workers_on_host, metadata=metadata,
    )
    s_pred, s_err = shard_files(stage_out.root, ref.run_date, ref.run_id, ref.shard_id)
    new_pred = pq.read_table(s_pred, schema=PREDICTIONS_SCHEMA)
    new_err = pq.read_table(s_err, schema=ERRORS_SCHEMA)
    meta = pq.read_schema(s_pred).metadata

    pred_path, err_path = shard_files(out_root, ref.run_date, ref.run_id, ref.shard_id)
    if only is not None:
        old = _read_ok(pred_path, PREDICTIONS_SCHEMA)
        if old is None:
            raise RuntimeError(f"shard {ref.shard_id}: {pred_path} became unreadable during the rerun; run it again")
        redo = pa.array(sorted(set(only) | set(new_pred["image_path"].to_pylist())), pa.string())
        kept = old.filter(pc.invert(pc.is_in(old["image_path"], value_set=redo)))
        merged = pa.concat_tables([kept.replace_schema_metadata(None), new_pred.replace_schema_metadata(None)])
        order = {p: i for i, p in enumerate(pq.ParquetFile(run_dir / "index.parquet").read_row_group(ref.shard_id, columns=["image_path"])["image_path"].to_pylist())}
        merged = merged.take(pa.array(sorted(range(merged.num_rows), key=lambda i: order.get(merged["image_path"][i].as_py(), 1 << 30)), pa.int64()))
        old_err = _read_ok(err_path, ERRORS_SCHEMA)
        still = pa.array(sorted(set(only) | set(merged["image_path"].to_pylist())), pa.string())
        carry = (
            old_err.filter(pc.fill_null(pc.invert(pc.is_in(old_err["image_path"], value_set=still)), False))
            if old_err is not None
            else ERRORS_SCHEMA.empty_table()
        )
        errors = pa.concat_tables([carry.replace_schema_metadata(None), new_err.replace_schema_metadata(None)])
    else:
        merged, errors = new_pred, new_err

    archive_errors(out_root, ref, attempt - 1)
    write_table_atomic(merged.replace_schema_metadata(meta), pred_path)
    write_table_atomic(errors.replace_schema_metadata(meta), err_path)
    failed_images = sorted({p for p in errors["image_path"].to_pylist() if p is not None})
    state = {
        **staged,
        "state": "complete" if errors.num_rows == 0 else "partial",
        "images": ref.stop - ref.start,
        "scored": merged.num_rows,
        "failed": errors.num_rows,
        "failed_images": failed_images,
        "rescored": n,
        "seconds": round(time.perf_counter() - t0, 4),
        "attempt": attempt,
        "files": [str(pred_path), str(err_path)],
        "finished_at": datetime.now(UTC).isoformat(),
    }
    write_json_atomic(state, shard_state_path(run_dir, ref.shard_id))
    shutil.rmtree(stage_dir, ignore_errors=True)
    return state
