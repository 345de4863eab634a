"""Shards' part files and commit records, checked against the run state (``imgscore rerun``).

The run state itself — the typed :class:`~imgscore.runstate.manifest.Manifest`, the ledger and the
one place a shard result is applied — is :mod:`imgscore.runstate.manifest`. This module answers
the questions a rerun and a retried flow run ask: is this shard's commit backed by good part
files (:func:`check_shard`, :func:`committed`), which committed shards did the manifest miss
(:func:`adopt_committed`), what is left to rescore (:func:`plan_rerun`) — and does the run state
name only paths inside the output root (:func:`check_run_state`, :func:`run_folders`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from imgscore.io import storage
from imgscore.io.containment import (
    UnsafePathError,
    check_recorded_files,
    check_relative,
    check_run_date,
    inside,
    safe_name,
)
from imgscore.io.parquet import ERRORS_SCHEMA, PREDICTIONS_SCHEMA, TABLES, part_dir, part_name
from imgscore.io.storage import AnyPath
from imgscore.runstate.manifest import (
    COMMITS_DIR,
    LEDGER_DIR,
    Manifest,
    ShardRecord,
    ShardRef,
    ShardResult,
    read_commit_record,
)

RUN_SUBFOLDERS = ("index.parquet", LEDGER_DIR, COMMITS_DIR)  # what a run writes inside runs/RUN/


def run_dir_of(out_root: AnyPath, run_id: str) -> UPath:
    """``OUT/runs/RUN_ID``: the run's manifest, index, ledger, commit records and lock.

    Raises:
        UnsafePathError: ``run_id`` is not one folder name, or ``runs/RUN_ID`` resolves outside
            ``out_root`` (a symlink planted there).
    """
    return inside(out_root, storage.path(out_root, "runs", safe_name(run_id, "run id")), "run folder")


def manifest_path(out_root: AnyPath, run_id: str) -> UPath:
    """``OUT/runs/RUN_ID/manifest.json`` (:func:`run_dir_of`'s checks)."""
    return storage.path(run_dir_of(out_root, run_id), "manifest.json")


def check_part(path: AnyPath, schema: pa.Schema, rows: int | None = None) -> str | None:
    """Why the part file at ``path`` is not a good commit, or None when it is.

    Reads only the footer: a missing file, a corrupt or truncated footer ("magic bytes not found"),
    a schema other than ``schema`` (names and types; a file that lacks only nullable columns
    added at the end since it was written is fine), or a row count other than ``rows`` (when
    given) are reported.
    """
    if not storage.is_file(path):
        return "missing"
    try:
        with storage.open_input(path) as f:  # an object: ranged GETs of the footer only
            meta = pq.read_metadata(f)
        got = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    have, want = [(f.name, f.type) for f in got], [(f.name, f.type) for f in schema]
    # a file written before a nullable column was added at the end (file_version) is still good
    if have != want[: len(have)] or not all(schema.field(i).nullable for i in range(len(have), len(want))):
        return "schema differs from the current one"
    if rows is not None and meta.num_rows != rows:
        return f"holds {meta.num_rows} rows, the shard record says {rows}"
    return None


def shard_files(out_root: AnyPath, run_date: str, run_id: str, shard_id: int) -> tuple[UPath, UPath]:
    """(predictions part, errors part) paths of a shard under ``out_root``."""
    name = part_name(shard_id)
    return (
        storage.path(part_dir(out_root, "predictions", run_date, run_id), name),
        storage.path(part_dir(out_root, "errors", run_date, run_id), name),
    )


def run_folders(out_root: AnyPath, run_date: str, run_id: str) -> list[UPath]:
    """Every folder a run writes into — its part-file partitions (predictions, errors,
    errors_history, embeddings), its run folder and the run folder's index, ledger and commit-record
    folders — each checked to resolve inside ``out_root``.

    Raises:
        UnsafePathError: a name is not a plain folder name or a folder resolves outside
            ``out_root`` (a symlink planted in its place); the message names it.
    """
    run_dir = run_dir_of(out_root, run_id)
    folders = [part_dir(out_root, t, run_date, run_id) for t in TABLES]
    folders += [run_dir] + [storage.path(run_dir, sub) for sub in RUN_SUBFOLDERS]
    return [inside(out_root, f, "run folder") for f in folders]


def check_run_state(m: Manifest, out_root: AnyPath, run_dir: AnyPath) -> None:
    """Refuse run state that would make imgscore touch anything outside ``out_root``.

    ``m`` is the run's state as read back (summary + ledger,
    :func:`imgscore.runstate.state.load_manifest`) from
    ``run_dir`` (``OUT/runs/RUN``): its ``run_id`` must be that folder's name and its
    ``run_date`` a date (both become folder names), every shard's ``files`` must name that
    shard's own part files (:func:`imgscore.io.containment.check_recorded_files`), and every
    folder the run writes into must resolve inside ``out_root`` (:func:`run_folders`).

    Raises:
        UnsafePathError: one line naming the entry (``shards[3].files[0]``, ``run_date``, a folder).
    """
    folder = storage.name_of(run_dir)
    where = f"run {folder}: manifest.json"
    if safe_name(m.run_id, f"{where} run_id") != folder:
        raise UnsafePathError(
            f"{where} run_id {m.run_id!r} is not its folder's name {folder!r}; the run state was edited"
        )
    if m.run_date is None:
        for i, s in enumerate(m.shards):  # an old manifest without run_date: at least nothing climbs out
            for j, entry in enumerate(s.files):
                check_relative(str(entry).lstrip("/"), f"{where} shards[{i}].files[{j}]")
        return
    check_run_date(m.run_date, f"{where} run_date")
    for i, s in enumerate(m.shards):
        if s.files:
            check_recorded_files(
                s.files, shard_files(out_root, m.run_date, m.run_id, s.shard_id), out_root, f"{where} shards[{i}].files"
            )
    run_folders(out_root, m.run_date, m.run_id)


def committed(ref: ShardRef, out_root: AnyPath) -> ShardResult | None:
    """The shard's commit record when an earlier attempt finished it: the record parses (JSON,
    validated into :class:`ShardResult` — nothing else is constructed), is ``complete`` or
    ``partial``, was made from the same rows (fingerprint) with the same model (``model_id``)
    and both part files match its counts (:func:`check_shard`); else None. The record's
    ``files`` are replaced by the paths derived under ``out_root`` (a recorded entry is never
    used). This is how a retried flow run skips finished shards.
    """
    rec = read_commit_record(ref.run_dir, ref.shard_id)
    if rec is None or rec.state not in ("complete", "partial") or rec.fingerprint != ref.fingerprint:
        return None
    if ref.model_id and rec.model_id != ref.model_id:
        return None
    if check_shard(out_root, ref.run_date, ref.run_id, rec) is not None:
        return None
    return rec.model_copy(
        update={"files": [str(f) for f in shard_files(out_root, ref.run_date, ref.run_id, ref.shard_id)]}
    )


def check_shard(out_root: AnyPath, run_date: str, run_id: str, record: ShardRecord | ShardResult) -> str | None:
    """Why a shard record (manifest entry or ``score_shard`` result) is not backed by good part
    files under ``out_root``, or None when both files match its ``scored``/``failed`` counts."""
    pred, err = shard_files(out_root, run_date, run_id, record.shard_id)
    why = check_part(pred, PREDICTIONS_SCHEMA, record.scored)
    if why:
        return f"predictions {storage.name_of(pred)}: {why}"
    why = check_part(err, ERRORS_SCHEMA, record.failed)
    if why:
        return f"errors {storage.name_of(err)}: {why}"
    return None


@dataclass
class ShardWork:
    """What a rerun does for one shard: ``only`` the listed images (a partial shard whose other
    rows are kept), or the whole shard when ``only`` is None."""

    shard_id: int
    only: list[str] | None
    reason: str


def adopt_committed(manifest: Manifest, run_dir: AnyPath, out_root: AnyPath) -> list[int]:
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
        run_date = check_run_date(manifest.run_date, "run_date")  # a manifest without one names no part file
        if check_shard(out_root, run_date, manifest.run_id, rec) is None:
            files = [str(f) for f in shard_files(out_root, run_date, manifest.run_id, entry.shard_id)]
            manifest.apply(rec.model_copy(update={"files": files, "reason": None}))
            adopted.append(entry.shard_id)
    return adopted


def _every_error_named(out_root: AnyPath, run_date: str, run_id: str, shard_id: int) -> bool:
    """Whether every errors row of the shard names its image (several models fail an image once
    per model, so its rows outnumber its failed images; a whole-batch failure names none)."""
    try:
        with storage.open_input(shard_files(out_root, run_date, run_id, shard_id)[1]) as f:  # a file, or an object
            return pq.read_table(f, columns=["image_path"])["image_path"].null_count == 0
    except (pa.ArrowException, OSError):
        return False


def plan_rerun(manifest: Manifest, out_root: AnyPath) -> list[ShardWork]:
    """Which shards a rerun rescores, and how.

    - ``complete`` with good part files: nothing.
    - ``partial`` with good part files and every failed image named: only those images (with
      every model of the run); the shard's other prediction rows are kept as they are.
    - anything else — ``pending``, ``running``, ``failed``, or a part file missing, corrupt
      (footer unreadable), of another schema or with the wrong row count: the whole shard.
    """
    work = []
    for e in manifest.shards:
        done = e.state in ("complete", "partial")  # a manifest without a run_date names no part file of it
        bad = check_shard(out_root, check_run_date(manifest.run_date, "run_date"), manifest.run_id, e) if done else None
        if e.state == "complete" and bad is None:
            continue
        if e.state == "partial" and bad is None and e.failed_images:
            names = e.failed_images
            run_date = check_run_date(manifest.run_date, "run_date")
            if len(names) == e.failed or _every_error_named(out_root, run_date, manifest.run_id, e.shard_id):
                work.append(ShardWork(e.shard_id, list(names), f"{len(names)} failed image(s)"))
                continue
        work.append(ShardWork(e.shard_id, None, bad or f"state {e.state}"))
    return work
