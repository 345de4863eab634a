"""Incremental nightly scoring: skip images already scored, carry images known to be bad.

With ``run.skip_scored``, an image is *already scored* when some earlier run into the same
``output.root``, over the same input folder, with the same ``model_id`` (checkpoint sha256), the
same resolved preprocessing and the same decode settings (``input.max_pixels``,
``input.exif_orientation``, ``input.max_metadata_bytes``: :func:`model_key`), committed a prediction row for it whose key matches the file as
scanned now — and *already failed* (the **failure ledger**) when such a run committed an errors row
for it whose key matches, and no prediction does. Already-failed images are not tried again
(``run.retry_failed: true`` tries them all); a changed file is. The key:

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from imgscore.config.scoring import InputConfig
from imgscore.images.preprocess import DecodeOptions
from imgscore.images.scan import ImageIndex, entries_from_table, sha256_of_file
from imgscore.io import storage
from imgscore.io.containment import UnsafePathError, check_run_date, inside, safe_name, within
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    input_root_name,
    run_part_files,
)

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
_STAT = ["image_path", "file_size", "file_mtime_ns", "file_version"]
_FAILED_COLUMNS = [*_STAT, "run_id", "stage", "error_type", "message"]


# Decode settings that joined the key later: in it only when they differ from their defaults, so
# the key of runs made before they existed stays the same.
_LATER_DECODE_SETTINGS = ("formats", "decode_timeout_s")


def decode_settings(input_cfg: InputConfig | dict | None) -> dict:
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


def model_key(model_info: dict) -> str:
    """sha256 hex over ``model_id``, the resolved preprocessing (``LoadedModel.info()``) and the
    decode settings (``model_info['decode']``, :func:`decode_settings`; defaults when absent):
    what a prediction, or a failure, depends on besides the image bytes. A run with another
    ``input.max_pixels`` or ``input.exif_orientation`` matches no earlier run, so it scores every
    image and retries every earlier failure."""
    decode = model_info.get("decode") or decode_settings(None)
    blob = json.dumps({"model_id": model_info.get("model_id"), "preprocess": model_info.get("preprocess"), "decode": decode},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def recorded_model(manifest: dict, model: dict | None = None) -> dict:
    """A manifest's ``model`` (or ``model``, one of its ``models``) with its decode settings:
    recorded there since they joined the key, else taken from the run's recorded ``config.input``."""
    model = dict(model if model is not None else manifest.get("model") or {})
    if not model.get("decode"):
        model["decode"] = decode_settings((manifest.get("config") or {}).get("input"))
    return model


def _same_root(a: str | Path | None, b: str | Path) -> bool:
    return a is not None and storage.same_root(a, b)


def prior_runs(out_root: str | Path, model_info: dict, input_root: str | Path, exclude: str | None = None) -> list[dict]:
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


def part_files(out_root: str | Path, runs: list[dict], table: str, reader: str = "skip_scored") -> list[str]:
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


def _root_filter(runs: list[dict]) -> pc.Expression:
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
                parts.append(ds.dataset([f], format="parquet", schema=schema, filesystem=fs).to_table(columns=columns, filter=flt))
            except (pa.ArrowException, OSError) as exc:
                log.warning("%s: ignoring unreadable part file %s (%s)", what, f, exc)
        return pa.concat_tables(parts) if parts else empty


def read_scored(out_root: str | Path, runs: list[dict], model_id: str) -> pa.Table:
    """Committed prediction keys of ``runs``: a Table (image_path string, file_size int64,
    file_mtime_ns int64), one row per prediction row with ``model_id`` from their input folder.
    An unreadable part file is skipped (its images count as not scored)."""
    flt = (pc.field("model_id") == model_id) & _root_filter(runs)
    return _read_columns(part_files(out_root, runs, "predictions"), PREDICTIONS_SCHEMA, _STAT, flt, "skip_scored")


def read_failed(out_root: str | Path, runs: list[dict], model_id: str | None = None) -> pa.Table:
    """The failure ledger of ``runs``: their committed errors rows for single images of their
    input folder (and of ``model_id``: a run of several models failed each pair on its own;
    rows written before errors carried a model count for it), except :data:`RETRIED_ERRORS`,
    newest run first — columns image_path, file_size, file_mtime_ns (as scanned when it
    failed), run_id, stage, error_type, message."""
    flt = pc.field("image_path").is_valid() & ~pc.field("error_type").isin(list(RETRIED_ERRORS)) & _root_filter(runs)
    if model_id is not None:
        flt = flt & ((pc.field("model_id") == model_id) | pc.field("model_id").is_null())
    t = _read_columns(part_files(out_root, runs, "errors"), ERRORS_SCHEMA, _FAILED_COLUMNS, flt, "failure ledger")
    return t.sort_by([("run_id", "descending")]) if t.num_rows else t


class AlreadyScoredEach:
    """``run.skip_scored`` with several models: one :class:`AlreadyScored` per model, each with
    its own earlier predictions and failure ledger. An image is left out when no model needs it;
    a kept image's index row lists the models that still score it (``models``; null when every
    one does), so adding a model to ``models:`` scores only that model on old images. The
    counts are (image, model) pairs, summed over the models."""

    def __init__(self, skips: list[AlreadyScored], names: list[str]):
        self.skips, self.names = skips, names
        self.prior_runs = list(dict.fromkeys(r for sk in skips for r in sk.prior_runs))

    already_scored = property(lambda self: sum(sk.already_scored for sk in self.skips))
    already_failed = property(lambda self: sum(sk.already_failed for sk in self.skips))
    hashed = property(lambda self: sum(sk.hashed for sk in self.skips))

    def filter(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The rows of ``batch`` some model still scores, each with the names of those models."""
        masks = [sk.keep_mask(batch).to_pylist() for sk in self.skips]
        keep = [any(m[i] for m in masks) for i in range(batch.num_rows)]
        wanted = [None if all(m[i] for m in masks) else [n for n, m in zip(self.names, masks, strict=True) if m[i]]
                  for i in range(batch.num_rows) if keep[i]]
        kept = batch.filter(pa.array(keep, pa.bool_()))
        i = kept.schema.get_field_index("models")
        return kept.set_column(i, kept.schema.field(i), pa.array(wanted, pa.list_(pa.string())))

    def take_hashes(self) -> pa.Table:
        """Content-hash rows of the kept images, once per image."""
        t = pa.concat_tables([sk.take_hashes() for sk in self.skips])
        if not t.num_rows:
            return t
        return t.take(_first_rows(t["image_path"]))

    def take_carried(self) -> pa.Table:
        """Every model's carried rows (``model_name`` says whose)."""
        return pa.concat_tables([sk.take_carried() for sk in self.skips])


def _first_rows(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Positions of the first row of each distinct value of ``col``."""
    seen: dict = {}
    for i, v in enumerate(col.to_pylist()):
        seen.setdefault(v, i)
    return pa.array(sorted(seen.values()), pa.int64())


def read_hashes(out_root: str | Path, runs: list[dict]) -> pa.Table:
    """Content hashes recorded by earlier sha256-mode ``runs`` (``HASHES_SCHEMA``)."""
    parts = []
    for m in runs:
        p = storage.path(out_root, "runs", m["run_id"], HASHES_FILE)  # run ids checked by prior_runs
        if storage.is_file(p) and (storage.is_remote(p) or within(os.path.realpath(p), os.path.realpath(out_root))):
            try:
                fs, (where,) = storage.arrow_files([str(p)])
                parts.append(pq.read_table(where, schema=HASHES_SCHEMA, filesystem=fs))
            except (pa.ArrowException, OSError) as exc:
                log.warning("skip_scored: ignoring unreadable %s (%s)", p, exc)
    return pa.concat_tables(parts) if parts else HASHES_SCHEMA.empty_table()


def _stat_keys(path: pa.Array, size: pa.Array, mtime: pa.Array, version: pa.Array) -> pa.Array:
    """``path\tsize\tmtime\tversion`` per row, the path in Unicode NFC (a name macOS wrote in NFD
    matches the same name written in NFC elsewhere); a size or mtime that could not be read is
    empty (a file the scan could not stat matches an earlier failure of the same kind), and so is
    the version of a file (objects: their ETag, so a replaced object never matches, even within
    the second its last-modified time keeps; part files written before the column read it null)."""
    def text(a):
        return pc.fill_null(pc.cast(a, pa.string()), "")

    return pc.binary_join_element_wise(pc.utf8_normalize(path, "NFC"), text(size), text(mtime), text(version), "\t")


def _versions(batch: pa.RecordBatch) -> pa.Array:
    """The index rows' ``version`` column (null for files, and for an index written before it)."""
    if "version" in batch.schema.names:
        return batch["version"]
    return pa.nulls(batch.num_rows, pa.string())


def _content_keys(path: pa.Array, sha: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(pc.utf8_normalize(path, "NFC"), sha, "\t")


def _flat(a: pa.Array | pa.ChunkedArray) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


class AlreadyScored:
    """The incremental filter: earlier runs' committed predictions and failures of the same model
    over the same folder, read once, that filter the scan's record batches as they stream into
    the index (module docstring).

    Memory: the prior keys (one ``path\tsize\tmtime`` string per earlier prediction and
    failure), not the scan. ``already_scored``, ``already_failed`` and ``hashed`` count as batches
    pass; :meth:`take_hashes` (sha256 mode) and :meth:`take_carried` hand out the rows to record
    of the images kept / carried since the last call.

    Args:
        retry_failed: ``run.retry_failed``: no failure ledger, every earlier failure is tried again.

    Raises:
        ValueError: unknown ``skip_key``.
    """

    def __init__(self, out_root: str | Path, model_info: dict, input_root: str | Path, skip_key: str = "stat",
                 exclude_run: str | None = None, retry_failed: bool = False):
        self.model_name = model_info.get("name")
        if skip_key not in ("stat", "sha256"):
            raise ValueError(f"run.skip_key must be stat or sha256, got {skip_key!r}")
        self.out_root, self.root, self.skip_key = storage.path(out_root), storage.path(input_root), skip_key
        self.root_name = input_root_name(input_root)
        self.runs = prior_runs(out_root, model_info, input_root, exclude=exclude_run)
        self.prior_runs = [m["run_id"] for m in self.runs]
        self.already_scored = 0
        self.already_failed = 0
        self.hashed = 0
        self._hash_rows: list[dict] = []
        self._carried: list[pa.Table] = []
        self._scored = read_scored(out_root, self.runs, model_info["model_id"]) if self.runs else None
        self._keys = None
        if self._scored is not None:
            self._keys = pc.unique(_flat(_stat_keys(self._scored["image_path"], self._scored["file_size"], self._scored["file_mtime_ns"], self._scored["file_version"])))
        self._failed = read_failed(out_root, self.runs, model_info.get("model_id")) if self.runs and not retry_failed else None
        self._failed_keys = None
        if self._failed is not None and self._failed.num_rows:
            self._failed_keys = _flat(_stat_keys(self._failed["image_path"], self._failed["file_size"], self._failed["file_mtime_ns"], self._failed["file_version"]))
        self._content_keys = None  # path\tsha256 of earlier sha256-mode runs, read on first need
        self._failed_content = None  # (keys, failed rows) by content

    def _hashes_of(self, keys: pa.Table) -> pa.Table:
        return keys.join(read_hashes(self.out_root, self.runs), keys=_STAT[:3], right_keys=["image_path", "size", "mtime_ns"], join_type="inner")

    def _content(self) -> pa.Array:
        if self._content_keys is None:
            scored_h = self._hashes_of(self._scored)
            self._content_keys = pc.unique(_flat(_content_keys(scored_h["image_path"], scored_h["sha256"])))
        return self._content_keys

    def _failed_by_content(self) -> tuple[pa.Array, pa.Table]:
        if self._failed_content is None:
            failed_h = self._hashes_of(self._failed).sort_by([("run_id", "descending")])
            self._failed_content = (_flat(_content_keys(failed_h["image_path"], failed_h["sha256"])), failed_h)
        return self._failed_content

    def filter(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The rows of ``batch`` (index schema) still to score: those with a matching prediction
        (``already_scored``) and, unless ``retry_failed``, those with a matching failure and no
        prediction (``already_failed``) are dropped. Rows that could not be stat'ed are kept
        unless the same path failed unstat'ed before (they become scan errors)."""
        return batch.filter(self.keep_mask(batch))

    def keep_mask(self, batch: pa.RecordBatch) -> pa.Array:
        """Which rows of ``batch`` this model still scores (bool [N]); counts and records the
        others as :meth:`filter` does."""
        n = batch.num_rows
        keys = _stat_keys(batch["image_path"], batch["size"], batch["mtime_ns"], _versions(batch))
        scored = pa.array([False] * n)
        if self._keys is not None:
            scored = pc.fill_null(pc.is_in(keys, value_set=self._keys), False)
        failed_at = pa.nulls(n, pa.int64())
        if self._failed_keys is not None:
            failed_at = pc.if_else(scored, pa.scalar(None, pa.int64()), pc.cast(pc.index_in(keys, value_set=self._failed_keys), pa.int64()))
        keep = pc.and_(pc.invert(scored), pc.is_null(failed_at))
        if self.skip_key == "sha256":
            keep, scored, failed_at = self._filter_by_content(batch, keep, scored, failed_at)
        self._carry(batch, failed_at)
        n_kept = int(pc.sum(pc.cast(keep, pa.int64())).as_py() or 0) if n else 0
        n_failed = n - pc.sum(pc.is_null(failed_at)).as_py() if n else 0
        self.already_failed += n_failed
        self.already_scored += n - n_kept - n_failed
        return keep

    def _carry(self, batch: pa.RecordBatch, failed_at: pa.Array) -> None:
        """Record the carried rows of ``batch``: the image as scanned, and the failure it carries."""
        hit = pc.is_valid(failed_at)
        if not pc.any(hit).as_py():
            return
        rows = pa.Table.from_batches([batch]).filter(hit)
        at = failed_at.filter(hit)
        src = self._failed
        if self._failed_content is not None:  # positions past the stat table's rows index the content table
            src = src.select(_FAILED_COLUMNS)
            src = pa.concat_tables([src, self._failed_content[1].select(_FAILED_COLUMNS).cast(src.schema)])
        failure = src.take(at)
        self._carried.append(pa.table({
            "input_root": pa.array([self.root_name] * rows.num_rows, pa.string()),
            "image_path": rows["image_path"],
            "file_size": rows["size"],
            "file_mtime_ns": rows["mtime_ns"],
            "failed_run_id": failure["run_id"],
            "stage": failure["stage"],
            "error_type": failure["error_type"],
            "message": pc.utf8_slice_codeunits(failure["message"], 0, 300),
            "model_name": pa.array([self.model_name] * rows.num_rows, pa.string()),
        }, schema=CARRIED_SCHEMA))

    def _filter_by_content(self, batch: pa.RecordBatch, keep: pa.Array, scored: pa.Array,
                           failed_at: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array]:
        """sha256 mode: hash the rows no stat matched; a content match with an earlier prediction
        is ``already_scored``, with an earlier failure ``already_failed`` (its position in the
        content table, after the stat table's rows)."""
        flags, scored_l, failed_l = keep.to_pylist(), scored.to_pylist(), failed_at.to_pylist()
        paths, rels = batch["image_path"].to_pylist(), batch["fs_path"].to_pylist()
        sizes, mtimes, errs = batch["size"].to_pylist(), batch["mtime_ns"].to_pylist(), batch["scan_error"].to_pylist()
        shas: dict[int, str] = {}
        for i in range(batch.num_rows):
            if flags[i] and errs[i] is None:
                try:
                    shas[i] = sha256_of_file(storage.path(self.root, os.fsdecode(rels[i])))
                    self.hashed += 1
                except OSError:
                    pass  # unreadable now: scored (and recorded) as an error by the shard
        if self.runs and shas:
            idx = list(shas)
            probe = pa.array([f"{unicodedata.normalize('NFC', paths[i])}\t{shas[i]}" for i in idx], pa.string())
            hit = pc.fill_null(pc.is_in(probe, value_set=self._content()), False).to_pylist()
            fkeys = self._failed_by_content()[0] if self._failed is not None and self._failed.num_rows else None
            fpos = pc.index_in(probe, value_set=fkeys).to_pylist() if fkeys is not None else [None] * len(idx)
            for i, h, f in zip(idx, hit, fpos, strict=True):
                if h:
                    flags[i], scored_l[i] = False, True
                elif f is not None:
                    flags[i], failed_l[i] = False, self._failed.num_rows + f
        self._hash_rows += [{"image_path": paths[i], "size": sizes[i], "mtime_ns": mtimes[i], "sha256": sha} for i, sha in shas.items() if flags[i]]
        return pa.array(flags), pa.array(scored_l), pa.array(failed_l, pa.int64())

    def take_hashes(self) -> pa.Table:
        """Content-hash rows (``HASHES_SCHEMA``) of the images kept since the last call."""
        rows, self._hash_rows = self._hash_rows, []
        return pa.Table.from_pylist(rows, schema=HASHES_SCHEMA)

    def take_carried(self) -> pa.Table:
        """Rows (``CARRIED_SCHEMA``) of the images carried as already failed since the last call."""
        parts, self._carried = self._carried, []
        return pa.concat_tables(parts) if parts else CARRIED_SCHEMA.empty_table()


@dataclass
class SkipResult:
    """What :func:`split_already_scored` found."""

    index: ImageIndex  # the images still to score (same root, layout, classes, skipped list)
    already_scored: int  # images skipped because a matching prediction exists
    hashes: pa.Table | None  # HASHES_SCHEMA rows for the images to score (sha256 mode), else None
    prior_runs: list[str]  # run ids whose predictions were consulted
    hashed: int  # files read for their sha256
    already_failed: int = 0  # images carried because a matching failure exists
    carried: pa.Table | None = None  # CARRIED_SCHEMA rows of those


def split_already_scored(
    index: ImageIndex,
    out_root: str | Path,
    model_info: dict,
    skip_key: str = "stat",
    exclude_run: str | None = None,
    retry_failed: bool = False,
) -> SkipResult:
    """Drop from an in-memory ``index`` the images already scored, and those already failed
    (unless ``retry_failed``), under the same model key (:class:`AlreadyScored` on the whole list
    at once; planning streams instead).

    Args:
        index: the scan of ``input.root``.
        out_root: ``output.root``, holding earlier runs.
        model_info: ``LoadedModel.info()`` of this run's model (``model_id``, ``preprocess``).
        skip_key: ``stat`` or ``sha256``.
        exclude_run: a run id to ignore (this run itself when resuming).
        retry_failed: try earlier failures again.

    Raises:
        ValueError: unknown ``skip_key``.
    """
    skip = AlreadyScored(out_root, model_info, index.root, skip_key, exclude_run, retry_failed)
    entries = []
    if index.entries:
        (batch,) = index.to_table().combine_chunks().to_batches()
        entries = entries_from_table(pa.Table.from_batches([skip.filter(batch)]))
    new_index = ImageIndex(root=index.root, layout=index.layout, classes=index.classes, entries=entries, skipped=index.skipped)
    hashes = skip.take_hashes() if skip_key == "sha256" else None
    return SkipResult(new_index, skip.already_scored, hashes, skip.prior_runs, skip.hashed, skip.already_failed, skip.take_carried())
