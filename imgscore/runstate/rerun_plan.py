"""Finish a run (``imgscore rerun``): choose what to rescore, score it, merge, commit.

A rerun uses the run's recorded config; only ``output.root``, ``runner.*`` and ``inference.*``
may differ (``imgscore.config.rerun.rerun_config``). What it rescores is :func:`imgscore.runstate.commits.plan_rerun`'s
choice: whole shards, or only the failed images of a partial shard. Those images are scored by
the same steps as a first run (:func:`imgscore.inference.score.score_entries`), given the images
directly, and the shard is committed into the run's real part files:

1. the shard's current errors part, if it has rows, is copied to the errors history,
   ``OUT/errors_history/run_date=…/RUN_ID/part-SSSSS-attempt-NNN.parquet`` (same schema, the
   rows keep their ``attempt``), so earlier attempts stay visible but are never counted twice;
2. the predictions part is replaced: for a partial shard, its kept rows (images that were scored
   before) plus the new rows, in index order — those kept rows are byte-for-byte the old values;
   for a whole shard, the new rows only;
3. the errors part is replaced by the errors of this attempt (images that still fail);
4. the commit record ``runs/RUN/shards/SSSSS.json`` is rewritten (:func:`imgscore.inference.commit.commit_shard`).

Every write is temp-then-rename, and every step is idempotent: a rerun killed at any moment is
finished by the next one (rows of the rescored images are dropped before the new ones are
added, so there are never two rows for one image).
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from upath import UPath

from imgscore.config.schema import Config
from imgscore.inference.commit import commit_shard, embeddings_part
from imgscore.inference.rows import ShardRows
from imgscore.inference.score import (
    embeddings_of,
    models_metadata,
    read_shard_entries,
    row_context,
    score_entries,
)
from imgscore.inference.scorer import Scorer, load_scorers
from imgscore.io import object_store, storage
from imgscore.io.containment import inside
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    file_metadata,
    make_table,
    part_dir,
    write_table_atomic,
)
from imgscore.io.storage import AnyPath
from imgscore.runstate.commits import check_part, shard_files
from imgscore.runstate.manifest import ShardRef, ShardResult, models_id, stop_check


def history_path(out_root: AnyPath, run_date: str, run_id: str, shard_id: int, attempt: int) -> UPath:
    """Where superseded error rows of a shard's ``attempt`` are kept."""
    return storage.path(
        part_dir(out_root, "errors_history", run_date, run_id), f"part-{shard_id:05d}-attempt-{attempt:03d}.parquet"
    )


def _read_ok(path: AnyPath, schema: pa.Schema) -> pa.Table | None:
    if check_part(path, schema) is not None:
        return None
    with storage.open_input(path) as f:
        return pq.read_table(f, schema=schema)


def archive_errors(out_root: AnyPath, ref: ShardRef, fallback_attempt: int) -> UPath | None:
    """Copy the shard's current error rows (if any, and readable) to the errors history; return
    the history file, or None when there was nothing to keep. An existing history file for the
    same attempt is left as it is (a replay after a crash).

    Raises:
        UnsafePathError: the history file would resolve outside ``out_root`` (a planted symlink).
    """
    _, err = shard_files(out_root, ref.run_date, ref.run_id, ref.shard_id)
    old = _read_ok(err, ERRORS_SCHEMA)
    if old is None or old.num_rows == 0:
        return None
    attempt = pc.max(old["attempt"]).as_py() or fallback_attempt
    dest = inside(
        out_root, history_path(out_root, ref.run_date, ref.run_id, ref.shard_id, int(attempt)), "errors history file"
    )
    if not storage.exists(dest):
        write_table_atomic(old, dest)
    return dest


def _in_index_order(table: pa.Table, order: pa.Array) -> pa.Table:
    """Rows of ``table`` sorted by the position of their ``image_path`` in ``order`` (the
    shard's paths in index order); rows without a path, or not in it, go last in their order."""
    pos = pc.fill_null(pc.index_in(table["image_path"], value_set=order), len(order))
    return table.take(
        pc.sort_indices(
            pa.table({"p": pos, "i": pa.array(range(table.num_rows), pa.int64())}),
            [("p", "ascending"), ("i", "ascending")],
        )
    )


def merge_partial(
    old_pred: pa.Table,
    old_err: pa.Table | None,
    new_pred: pa.Table,
    new_err: pa.Table,
    redo: list[str],
    order: pa.Array,
) -> tuple[pa.Table, pa.Table]:
    """A partial shard after rescoring ``redo``: the old rows of every other image, plus the
    new rows, predictions in index order; old error rows of the images rescored (or now
    scored) are dropped."""
    redo_set = pa.array(sorted(set(redo) | set(new_pred["image_path"].to_pylist())), pa.string())
    kept = old_pred.filter(pc.invert(pc.is_in(old_pred["image_path"], value_set=redo_set)))
    merged = _in_index_order(
        pa.concat_tables([kept.replace_schema_metadata(None), new_pred.replace_schema_metadata(None)]), order
    )
    still = pa.array(sorted(set(redo) | set(merged["image_path"].to_pylist())), pa.string())
    carry = (
        old_err.filter(pc.fill_null(pc.invert(pc.is_in(old_err["image_path"], value_set=still)), False))
        if old_err is not None
        else ERRORS_SCHEMA.empty_table()
    )
    return merged, pa.concat_tables([carry.replace_schema_metadata(None), new_err.replace_schema_metadata(None)])


def merge_embeddings(old_path: AnyPath, new: pa.Table, predictions: pa.Table, order: pa.Array) -> pa.Table:
    """A partial shard's embeddings after a rerun: the old part's vectors of images whose
    predictions were kept, plus ``new``'s, in index order — one row per predictions row."""
    try:
        with storage.open_input(old_path) as f:  # a file, or an object
            old = pq.read_table(f, schema=new.schema)
    except (OSError, pa.ArrowException):  # missing or unreadable: only the new vectors
        return new
    fresh = pc.is_in(old["image_path"], value_set=new["image_path"].combine_chunks())
    kept = old.filter(
        pc.and_(pc.invert(fresh), pc.is_in(old["image_path"], value_set=predictions["image_path"].combine_chunks()))
    )
    return _in_index_order(
        pa.concat_tables([kept.replace_schema_metadata(None), new.replace_schema_metadata(None)]), order
    ).replace_schema_metadata(new.schema.metadata)


def rescore_shard(
    ref: ShardRef,
    only: list[str] | None,
    cfg: Config,
    attempt: int,
    workers_on_host: int = 1,
    metadata: dict | None = None,
) -> ShardResult:
    """Rescore a shard (or ``only`` the named images of it) and commit replacement part files.

    Args:
        ref: the shard, with ``run_dir`` where the run lives now.
        only: image paths (``image_path`` values) to rescore, keeping the shard's other
            prediction rows; None rescores the whole shard.
        cfg: the run's recorded config with the allowed overrides applied.
        attempt: the attempt number written to new error rows and the manifest.

    Returns:
        The shard's new commit record, with ``scored``/``failed`` counting the whole shard's rows
        after the commit and ``rescored`` the images scored in this attempt.

    Raises:
        ShardError: the shard could not run (DataLoader crash); nothing is changed.
        ModelError: the model cannot be loaded on this worker; nothing is changed.
    """
    t0 = time.perf_counter()
    object_store.configure(cfg.storage.settings())
    out_root = cfg.output.root
    shard = read_shard_entries(ref)
    chosen = shard if only is None else [e for e in shard if e.image_path in set(only)]
    scorers = load_scorers(
        cfg, workers_on_host
    )  # every model of the run: a failed image is rescored by each (one decode)
    ctxs = [row_context(ref, sc, attempt, cfg.output.topk) for sc in scorers]
    rows = score_entries(chosen, ref.input_root, scorers, cfg.input, ctxs, t0, stop=stop_check(ref.run_dir))
    meta = file_metadata(scorers[0].lm.info(), ref.run_id, models_metadata(scorers, metadata))
    new_pred, new_err = make_table(rows.predictions, PREDICTIONS_SCHEMA), make_table(rows.errors, ERRORS_SCHEMA)
    embeddings = embeddings_of(rows, scorers, cfg.output, meta)

    if only is not None:
        order = pa.array([e.image_path for e in shard], pa.string())
        predictions, errors, embeddings = _merge_with_kept(out_root, ref, new_pred, new_err, embeddings, only, order)
    else:
        predictions, errors = new_pred, new_err

    archive_errors(out_root, ref, attempt - 1)
    result = _rescored_result(ref, scorers, rows, attempt, len(chosen), t0)
    return commit_shard(
        ref,
        out_root,
        predictions.replace_schema_metadata(meta),
        errors.replace_schema_metadata(meta),
        result,
        embeddings,
        replace=True,
    )


def _merge_with_kept(
    out_root: AnyPath,
    ref: ShardRef,
    new_pred: pa.Table,
    new_err: pa.Table,
    embeddings: pa.Table | None,
    only: list[str],
    order: pa.Array,
) -> tuple[pa.Table, pa.Table, pa.Table | None]:
    """A partial rerun's predictions, errors and embeddings: the shard's committed rows of the
    images not in ``only``, with the new rows in their place, in index ``order``.

    Raises:
        RuntimeError: the shard's predictions file became unreadable during the rerun.
    """
    pred_path, err_path = shard_files(out_root, ref.run_date, ref.run_id, ref.shard_id)
    old = _read_ok(pred_path, PREDICTIONS_SCHEMA)
    if old is None:
        raise RuntimeError(f"shard {ref.shard_id}: {pred_path} became unreadable during the rerun; run it again")
    predictions, errors = merge_partial(old, _read_ok(err_path, ERRORS_SCHEMA), new_pred, new_err, only, order)
    if embeddings is not None:
        embeddings = merge_embeddings(embeddings_part(out_root, ref), embeddings, predictions, order)
    return predictions, errors, embeddings


def _rescored_result(
    ref: ShardRef, scorers: list[Scorer], rows: ShardRows, attempt: int, rescored: int, t0: float
) -> ShardResult:
    """The shard's new commit record: the whole shard ``complete``, ``rescored`` images scored in
    this attempt, seconds since ``t0``."""
    return ShardResult(
        shard_id=ref.shard_id,
        state="complete",
        images=ref.stop - ref.start,
        fingerprint=ref.fingerprint,
        model_id=models_id([sc.lm.model_id for sc in scorers]),
        device=str(scorers[0].device),
        worker=scorers[0].worker,
        loader_workers=rows.loader_workers,
        attempt=attempt,
        warnings=dict(rows.warnings.most_common(20)),
        oom_events=rows.oom_events,
        rescored=rescored,
        seconds=round(time.perf_counter() - t0, 4),
        **rows.facts(),
    )
