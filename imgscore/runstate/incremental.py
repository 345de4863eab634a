"""Incremental nightly scoring: skip images already scored, carry images known to be bad.

With ``run.skip_scored``, an image is *already scored* when some earlier run into the same
``output.root``, over the same input folder, with the same ``model_id`` (checkpoint sha256) and
class names, the same resolved preprocessing and the same decode settings (``input.max_pixels``,
``input.exif_orientation``, ``input.max_metadata_bytes``: :func:`model_key`), committed a prediction
row for it whose key matches the file as scanned now — and *already failed* (the **failure ledger**)
when such a run committed an errors row for it whose key matches, and no prediction does.
Already-failed images are not tried again (``run.retry_failed: true`` tries them all); a changed
file is. The key:

- ``run.skip_key=stat`` (default): input root + relative path + size (bytes) + mtime (ns). Free:
  the scan has already stat'ed every file.
- ``run.skip_key=sha256``: input root + relative path + content sha256. A file whose stat still
  matches is matched without reading it; only the others (new or touched files) are hashed, and
  a touched file with unchanged bytes (``touch``, a copy that kept the content) is matched. A run
  in this mode records the hashes of the images it takes on in ``runs/RUN/content_hashes.parquet``,
  which later runs join against (prediction and errors rows alike); images of stat-mode runs can
  match only by stat.

Failures that say nothing about the file's bytes are never carried: a shard that could not run
(``ShardFailed``), CUDA out-of-memory and an unreadable file (``DecodeError.unreadable``:
permissions or I/O, which a fix changes without touching size or mtime) — :data:`RETRIED_ERRORS`.
Each carried image is listed with the run whose ``errors`` rows hold its failure in
``runs/RUN/already_failed.parquet`` (:data:`CARRIED_SCHEMA`).

How it stays fast on large outputs (numbers in ``benchmarks/NOTES.md``): candidate runs are
chosen from their small ``manifest.json`` (model, preprocessing, input root), and only their part
files are read, projected to the key columns with a ``model_id`` (predictions) and ``input_root``
filter; the membership test is one vectorised ``pyarrow.compute.is_in`` over ``path\tsize\tmtime``
strings. Changing the checkpoint changes ``model_id``, so nothing matches and everything is
scored. Paths are compared in Unicode NFC, so a name that one system wrote in NFD (macOS) and
another in NFC is the same file. Part files of runs written before ``input_root`` existed read
with the column null, and count for the folder their run's manifest names.

This module says which earlier runs count and reads their keys (:func:`prior_runs`,
:func:`read_scored`, :func:`read_failed`, :func:`read_hashes`); the filter that applies them to
the scan's batches is :class:`imgscore.runstate.already_scored.AlreadyScored`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from imgscore.config.scoring import InputConfig
from imgscore.images.preprocess import DecodeOptions
from imgscore.io import storage
from imgscore.io.containment import UnsafePathError, check_run_date, inside, safe_name
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    input_root_name,
    run_part_files,
)
from imgscore.io.storage import AnyPath

log = logging.getLogger("imgscore")

HASHES_FILE = "content_hashes.parquet"
HASHES_SCHEMA = pa.schema(
    [
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("size", pa.int64()),  # bytes, as scanned when the hash was taken
        pa.field("mtime_ns", pa.int64()),
        pa.field("sha256", pa.string(), nullable=False),  # hex
    ]
)
CARRIED_FILE = "already_failed.parquet"
CARRIED_SCHEMA = pa.schema(
    [
        pa.field("input_root", pa.string()),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("file_size", pa.int64()),  # bytes, as scanned tonight (equal to the failure's, or same content)
        pa.field("file_mtime_ns", pa.int64()),
        pa.field("failed_run_id", pa.string(), nullable=False),  # the run whose errors/ rows hold the failure
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),  # the failure's message, first 300 characters
        pa.field("model_name", pa.string()),  # the model whose failure it is (several models: each its own ledger)
    ]
)
# Failures that say nothing about the file's bytes: tried again every night (module docstring).
RETRIED_ERRORS = ("ShardFailed", "OutOfMemoryError", "DecodeError.unreadable", "ObjectReadError")
STAT_COLUMNS = ["image_path", "file_size", "file_mtime_ns", "file_version"]
FAILED_COLUMNS = [*STAT_COLUMNS, "run_id", "stage", "error_type", "message"]


# Decode settings that joined the key later: in it only when they differ from their defaults, so
# the key of runs made before they existed stays the same.
_LATER_DECODE_SETTINGS = ("formats", "decode_timeout_s")


def decode_settings(input_cfg: InputConfig | dict[str, Any] | None) -> dict[str, Any]:
    """The ``input.*`` settings that change the pixels a file decodes to, or whether it decodes at
    all (the fields of :class:`~imgscore.images.preprocess.DecodeOptions`: ``max_pixels``,
    ``exif_orientation``, ``max_metadata_bytes``, and ``formats`` and ``decode_timeout_s`` when
    they differ from their defaults), from an ``InputConfig`` or the ``input`` section of a
    recorded config; a key it lacks (a manifest of an older version) takes its default.
    ``formats`` is compared as a set: listing the same formats in another order is the same key;
    allowing another format makes the images it refused eligible again."""
    given = input_cfg.model_dump() if isinstance(input_cfg, InputConfig) else dict(input_cfg or {})
    out = {f.name: given.get(f.name, InputConfig.model_fields[f.name].default) for f in fields(DecodeOptions)}
    out["formats"] = sorted(out["formats"])
    for name in _LATER_DECODE_SETTINGS:
        default = InputConfig.model_fields[name].default
        if out[name] == (sorted(default) if name == "formats" else default):
            del out[name]
    return out


def model_key(model_info: dict[str, Any]) -> str:
    """sha256 hex over ``model_id``, the class names, the resolved preprocessing
    (``LoadedModel.info()``) and the decode settings (``model_info['decode']``,
    :func:`decode_settings`; defaults when absent): what a prediction row, or a failure, depends
    on besides the image bytes. A run with another ``input.max_pixels`` or ``input.exif_orientation``
    matches no earlier run, so it scores every image and retries every earlier failure; so does a
    run whose ``model.classes`` renamed a class (its rows' ``pred_label`` would differ)."""
    decode = model_info.get("decode") or decode_settings(None)
    blob = json.dumps(
        {
            "model_id": model_info.get("model_id"),
            "classes": model_info.get("classes"),
            "preprocess": model_info.get("preprocess"),
            "decode": decode,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def recorded_model(manifest: dict[str, Any], model: dict[str, Any] | None = None) -> dict[str, Any]:
    """A manifest's ``model`` (or ``model``, one of its ``models``) with its decode settings:
    recorded there since they joined the key, else taken from the run's recorded ``config.input``."""
    model = dict(model if model is not None else manifest.get("model") or {})
    if not model.get("decode"):
        model["decode"] = decode_settings((manifest.get("config") or {}).get("input"))
    return model


def _same_root(a: AnyPath | None, b: AnyPath) -> bool:
    return a is not None and storage.same_root(a, b)


def prior_runs(
    out_root: AnyPath, model_info: dict[str, Any], input_root: AnyPath, exclude: str | None = None
) -> list[dict[str, Any]]:
    """Manifests of earlier runs in ``out_root`` over ``input_root`` (the same folder, by real
    path) that scored a model with the same model key (alone, or as one of their ``models``).

    Unreadable manifests are skipped (logged), and so are manifests whose run id or date could
    not name their own folders, or that are reached through a link out of ``out_root``
    (:mod:`imgscore.io.containment`). Returns a list of manifest dicts.
    """
    want = model_key(model_info)
    found = []
    for path in storage.glob(storage.join(out_root, "runs", "*", "manifest.json")):
        folder = storage.name_of(storage.parent_of(path))
        if folder == exclude:
            continue
        try:
            inside(out_root, path, "manifest")
            m = json.loads(storage.read_bytes(path))
            if safe_name(m.get("run_id"), "run_id") != folder:
                raise UnsafePathError(f"run_id {m.get('run_id')!r} is not its folder's name")
            check_run_date(m.get("run_date"), "run_date")
        except (OSError, ValueError, UnsafePathError) as exc:
            log.warning("skip_scored: ignoring unreadable manifest %s (%s)", path, exc)
            continue
        keys = {model_key(recorded_model(m, x)) for x in (m.get("models") or [m.get("model") or {}])}
        if want in keys and _same_root((m.get("input") or {}).get("root"), input_root):
            found.append(m)
    return found


def part_files(out_root: AnyPath, runs: list[dict[str, Any]], table: str, reader: str = "skip_scored") -> list[str]:
    """The part files of ``table`` of ``runs`` (manifest dicts); a run whose folder resolves
    outside ``out_root`` (a symlink planted there) is skipped with a warning naming ``reader``."""
    files = []
    for m in runs:
        try:
            found = run_part_files(out_root, table, m.get("run_date"), m["run_id"])
            if found:
                inside(out_root, storage.parent_of(found[0]), "part-file folder")
        except UnsafePathError as exc:
            log.warning("%s: ignoring run %s (%s)", reader, m["run_id"], exc)
            continue
        files += [str(f) for f in found]
    return files


def _root_filter(runs: list[dict[str, Any]]) -> pc.Expression:
    """Rows of these runs' folders: ``input_root`` one of the roots they recorded, or null (part
    files written before the column existed; their run's manifest names the folder)."""
    roots = sorted({input_root_name(m["input"]["root"]) for m in runs} | {str(m["input"]["root"]) for m in runs})
    return pc.field("input_root").isin(roots) | pc.field("input_root").is_null()


def _read_columns(files: list[str], schema: pa.Schema, columns: list[str], flt: pc.Expression, what: str) -> pa.Table:
    """``columns`` of the rows of ``files`` that pass ``flt``, read as ``schema`` (a column an
    older file lacks reads as nulls). If a part file is unreadable (a corrupt footer awaiting
    ``imgscore rerun``) the files are read one by one and the bad ones skipped with a warning."""
    empty = schema.empty_table().select(columns)
    if not files:
        return empty
    fs, paths = storage.arrow_files(files)
    try:
        return ds.dataset(paths, format="parquet", schema=schema, filesystem=fs).to_table(columns=columns, filter=flt)
    except (pa.ArrowException, OSError):
        parts = []
        for f in paths:
            try:
                parts.append(
                    ds.dataset([f], format="parquet", schema=schema, filesystem=fs).to_table(
                        columns=columns, filter=flt
                    )
                )
            except (pa.ArrowException, OSError) as exc:
                log.warning("%s: ignoring unreadable part file %s (%s)", what, f, exc)
        return pa.concat_tables(parts) if parts else empty


def read_scored(out_root: AnyPath, runs: list[dict[str, Any]], model_id: str) -> pa.Table:
    """Committed prediction keys of ``runs``: a Table (image_path string, file_size int64,
    file_mtime_ns int64), one row per prediction row with ``model_id`` from their input folder.
    An unreadable part file is skipped (its images count as not scored)."""
    flt = (pc.field("model_id") == model_id) & _root_filter(runs)
    files = part_files(out_root, runs, "predictions")
    return _read_columns(files, PREDICTIONS_SCHEMA, STAT_COLUMNS, flt, "skip_scored")


def read_failed(out_root: AnyPath, runs: list[dict[str, Any]], model_id: str | None = None) -> pa.Table:
    """The failure ledger of ``runs``: their committed errors rows for single images of their
    input folder (and of ``model_id``: a run of several models failed each pair on its own;
    rows written before errors carried a model count for it), except :data:`RETRIED_ERRORS`,
    newest run first — columns image_path, file_size, file_mtime_ns (as scanned when it
    failed), run_id, stage, error_type, message."""
    flt = pc.field("image_path").is_valid() & ~pc.field("error_type").isin(list(RETRIED_ERRORS)) & _root_filter(runs)
    if model_id is not None:
        flt = flt & ((pc.field("model_id") == model_id) | pc.field("model_id").is_null())
    t = _read_columns(part_files(out_root, runs, "errors"), ERRORS_SCHEMA, FAILED_COLUMNS, flt, "failure ledger")
    return t.sort_by([("run_id", "descending")]) if t.num_rows else t


def read_hashes(out_root: AnyPath, runs: list[dict[str, Any]]) -> pa.Table:
    """Content hashes recorded by earlier sha256-mode ``runs`` (``HASHES_SCHEMA``)."""
    parts = []
    for m in runs:
        p = storage.path(out_root, "runs", m["run_id"], HASHES_FILE)  # run ids checked by prior_runs
        # not through a link out of out_root
        if storage.is_file(p) and storage.relative_within(out_root, p) is not None:
            try:
                fs, (where,) = storage.arrow_files([str(p)])
                parts.append(pq.read_table(where, schema=HASHES_SCHEMA, filesystem=fs))
            except (pa.ArrowException, OSError) as exc:
                log.warning("skip_scored: ignoring unreadable %s (%s)", p, exc)
    return pa.concat_tables(parts) if parts else HASHES_SCHEMA.empty_table()
