"""Incremental nightly scoring: skip images that already have a prediction from the same model.

An image is *already scored* when some earlier run into the same ``output.root``, over the same
input folder, with the same ``model_id`` (checkpoint sha256) and the same resolved
preprocessing, committed a prediction row for it whose key matches the file as scanned now:

- ``run.skip_key=stat`` (default): relative path + size (bytes) + mtime (ns). Free: the scan has
  already stat'ed every file.
- ``run.skip_key=sha256``: relative path + content sha256. A file whose stat still matches is
  skipped without reading it; only the others (new or touched files) are hashed, and a touched
  file with unchanged bytes (``touch``, a copy that kept the content) is skipped. A run in this
  mode records the hashes of the images it scores in ``runs/RUN/content_hashes.parquet``, which
  later runs join against; images scored by stat-mode runs can match only by stat.

How it stays fast on large outputs (numbers in ``benchmarks/NOTES.md``): candidate runs are
chosen from their small ``manifest.json`` (model, preprocessing, input root), and only their
predictions part files are read, projected to three columns (``image_path``, ``file_size``,
``file_mtime_ns``) with a ``model_id`` filter; the membership test is one vectorised
``pyarrow.compute.is_in`` over ``path\\tsize\\tmtime`` strings. Error rows are never "scored":
an image that failed is tried again next night. Changing the checkpoint changes ``model_id``,
so nothing matches and everything is scored. Paths are compared in Unicode NFC, so a name that
one system wrote in NFD (macOS) and another in NFC is the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from imgscore.tasks.containment import UnsafePathError, check_run_date, inside, safe_name, within
from imgscore.tasks.parquet_io import part_dir
from imgscore.tasks.scan import ImageIndex, entries_from_table, sha256_of_file

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
_KEY_COLUMNS = ["image_path", "file_size", "file_mtime_ns"]


def model_key(model_info: dict) -> str:
    """sha256 hex over ``model_id`` and the resolved preprocessing (``LoadedModel.info()``):
    what a prediction depends on besides the image bytes."""
    blob = json.dumps({"model_id": model_info.get("model_id"), "preprocess": model_info.get("preprocess")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _same_root(a: str | Path | None, b: str | Path) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def prior_runs(out_root: str | Path, model_info: dict, input_root: str | Path, exclude: str | None = None) -> list[dict]:
    """Manifests of earlier runs in ``out_root`` over ``input_root`` with the same model key.

    Unreadable manifests are skipped (logged), and so are manifests whose run id or date could
    not name their own folders, or that are reached through a link out of ``out_root``
    (:mod:`imgscore.tasks.containment`). Returns a list of manifest dicts.
    """
    want = model_key(model_info)
    found = []
    for path in sorted(Path(out_root).glob("runs/*/manifest.json")):
        if path.parent.name == exclude:
            continue
        try:
            inside(out_root, path, "manifest")
            m = json.loads(path.read_text(encoding="utf-8"))
            if safe_name(m.get("run_id"), "run_id") != path.parent.name:
                raise UnsafePathError(f"run_id {m.get('run_id')!r} is not its folder's name")
            check_run_date(m.get("run_date"), "run_date")
        except (OSError, ValueError, UnsafePathError) as exc:
            log.warning("skip_scored: ignoring unreadable manifest %s (%s)", path, exc)
            continue
        if model_key(m.get("model") or {}) == want and _same_root((m.get("input") or {}).get("root"), input_root):
            found.append(m)
    return found


def _part_files(out_root: str | Path, runs: list[dict]) -> list[str]:
    files = []
    for m in runs:
        d = part_dir(out_root, "predictions", m["run_date"], m["run_id"])
        try:
            inside(out_root, d, "part-file folder")
        except UnsafePathError as exc:
            log.warning("skip_scored: ignoring run %s (%s)", m["run_id"], exc)
            continue
        files += [str(p) for p in sorted(d.glob("part-*.parquet"))]
    return files


def read_scored(out_root: str | Path, runs: list[dict], model_id: str) -> pa.Table:
    """Committed prediction keys of ``runs``: a Table (image_path string, file_size int64,
    file_mtime_ns int64), one row per prediction row with ``model_id``.

    Reads through one ``pyarrow.dataset`` with column projection and a ``model_id`` filter; if a
    part file is unreadable (a corrupt footer awaiting ``imgscore rerun``) the files are read one
    by one and the bad ones skipped with a warning — their images count as not scored.
    """
    files = _part_files(out_root, runs)
    empty = pa.table({"image_path": pa.array([], pa.string()), "file_size": pa.array([], pa.int64()), "file_mtime_ns": pa.array([], pa.int64())})
    if not files:
        return empty
    flt = pc.field("model_id") == model_id
    try:
        return ds.dataset(files, format="parquet").to_table(columns=_KEY_COLUMNS, filter=flt)
    except (pa.ArrowException, OSError):
        parts = []
        for f in files:
            try:
                parts.append(pq.read_table(f, columns=_KEY_COLUMNS, filters=flt))
            except (pa.ArrowException, OSError) as exc:
                log.warning("skip_scored: ignoring unreadable part file %s (%s)", f, exc)
        return pa.concat_tables(parts).select(_KEY_COLUMNS) if parts else empty


def read_hashes(out_root: str | Path, runs: list[dict]) -> pa.Table:
    """Content hashes recorded by earlier sha256-mode ``runs`` (``HASHES_SCHEMA``)."""
    parts = []
    for m in runs:
        p = Path(out_root) / "runs" / m["run_id"] / HASHES_FILE  # run ids checked by prior_runs
        if p.is_file() and within(os.path.realpath(p), os.path.realpath(out_root)):
            try:
                parts.append(pq.read_table(p, schema=HASHES_SCHEMA))
            except (pa.ArrowException, OSError) as exc:
                log.warning("skip_scored: ignoring unreadable %s (%s)", p, exc)
    return pa.concat_tables(parts) if parts else HASHES_SCHEMA.empty_table()


def _stat_keys(path: pa.Array, size: pa.Array, mtime: pa.Array) -> pa.Array:
    """``path\tsize\tmtime`` per row, the path in Unicode NFC (a name macOS wrote in NFD matches the
    same name written in NFC elsewhere)."""
    return pc.binary_join_element_wise(pc.utf8_normalize(path, "NFC"), pc.cast(size, pa.string()), pc.cast(mtime, pa.string()), "\t")


class AlreadyScored:
    """Earlier runs' committed predictions of the same model over the same folder, read once,
    that filter the scan's record batches as they stream into the index (module docstring).

    Memory: the prior keys (one ``path\tsize\tmtime`` string per earlier prediction), not the
    scan. ``already_scored`` and ``hashed`` count as batches pass; in sha256 mode
    :meth:`take_hashes` hands out the content-hash rows of the images kept since the last call.

    Raises:
        ValueError: unknown ``skip_key``.
    """

    def __init__(self, out_root: str | Path, model_info: dict, input_root: str | Path, skip_key: str = "stat",
                 exclude_run: str | None = None):
        if skip_key not in ("stat", "sha256"):
            raise ValueError(f"run.skip_key must be stat or sha256, got {skip_key!r}")
        self.out_root, self.root, self.skip_key = Path(out_root), Path(input_root), skip_key
        self.runs = prior_runs(out_root, model_info, input_root, exclude=exclude_run)
        self.prior_runs = [m["run_id"] for m in self.runs]
        self.already_scored = 0
        self.hashed = 0
        self._hash_rows: list[dict] = []
        self._scored = read_scored(out_root, self.runs, model_info["model_id"]) if self.runs else None
        self._keys = None
        if self._scored is not None:
            prior = _stat_keys(self._scored["image_path"], self._scored["file_size"], self._scored["file_mtime_ns"])
            self._keys = pc.unique(prior.combine_chunks() if isinstance(prior, pa.ChunkedArray) else prior)
        self._content_keys = None  # path\tsha256 of earlier sha256-mode runs, read on first need

    def _content(self) -> pa.Array:
        if self._content_keys is None:
            prior_h = read_hashes(self.out_root, self.runs)
            scored_h = self._scored.join(
                prior_h, keys=["image_path", "file_size", "file_mtime_ns"], right_keys=["image_path", "size", "mtime_ns"], join_type="inner"
            )
            self._content_keys = pc.unique(
                pc.binary_join_element_wise(pc.utf8_normalize(scored_h["image_path"], "NFC"), scored_h["sha256"], "\t").combine_chunks()
            )
        return self._content_keys

    def filter(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The rows of ``batch`` (index schema) still to score. Rows that could not be stat'ed are
        always kept (they become scan errors)."""
        n = batch.num_rows
        keep = pa.array([True] * n)
        if self._keys is not None:
            hit = pc.fill_null(pc.is_in(_stat_keys(batch["image_path"], batch["size"], batch["mtime_ns"]), value_set=self._keys), False)
            keep = pc.invert(hit)
        if self.skip_key == "sha256":
            keep = self._filter_by_content(batch, keep)
        kept = batch.filter(keep)
        self.already_scored += n - kept.num_rows
        return kept

    def _filter_by_content(self, batch: pa.RecordBatch, keep: pa.Array) -> pa.Array:
        flags = keep.to_pylist()
        paths, rels = batch["image_path"].to_pylist(), batch["fs_path"].to_pylist()
        sizes, mtimes, errs = batch["size"].to_pylist(), batch["mtime_ns"].to_pylist(), batch["scan_error"].to_pylist()
        shas: dict[int, str] = {}
        for i in range(batch.num_rows):
            if flags[i] and errs[i] is None:
                try:
                    shas[i] = sha256_of_file(self.root / os.fsdecode(rels[i]))
                    self.hashed += 1
                except OSError:
                    pass  # unreadable now: scored (and recorded) as an error by the shard
        if self.runs and shas:
            idx = list(shas)
            probe = pa.array([f"{unicodedata.normalize('NFC', paths[i])}\t{shas[i]}" for i in idx], pa.string())
            for i, h in zip(idx, pc.fill_null(pc.is_in(probe, value_set=self._content()), False).to_pylist(), strict=True):
                if h:
                    flags[i] = False
        self._hash_rows += [{"image_path": paths[i], "size": sizes[i], "mtime_ns": mtimes[i], "sha256": sha} for i, sha in shas.items() if flags[i]]
        return pa.array(flags)

    def take_hashes(self) -> pa.Table:
        """Content-hash rows (``HASHES_SCHEMA``) of the images kept since the last call."""
        rows, self._hash_rows = self._hash_rows, []
        return pa.Table.from_pylist(rows, schema=HASHES_SCHEMA)


@dataclass
class SkipResult:
    """What :func:`split_already_scored` found."""

    index: ImageIndex  # the images still to score (same root, layout, classes, skipped list)
    already_scored: int  # images skipped because a matching prediction exists
    hashes: pa.Table | None  # HASHES_SCHEMA rows for the images to score (sha256 mode), else None
    prior_runs: list[str]  # run ids whose predictions were consulted
    hashed: int  # files read for their sha256


def split_already_scored(
    index: ImageIndex,
    out_root: str | Path,
    model_info: dict,
    skip_key: str = "stat",
    exclude_run: str | None = None,
) -> SkipResult:
    """Drop from an in-memory ``index`` the images already scored under the same model key
    (:class:`AlreadyScored` on the whole list at once; planning streams instead).

    Args:
        index: the scan of ``input.root``.
        out_root: ``output.root``, holding earlier runs.
        model_info: ``LoadedModel.info()`` of this run's model (``model_id``, ``preprocess``).
        skip_key: ``stat`` or ``sha256``.
        exclude_run: a run id to ignore (this run itself when resuming).

    Raises:
        ValueError: unknown ``skip_key``.
    """
    skip = AlreadyScored(out_root, model_info, index.root, skip_key, exclude_run)
    entries = []
    if index.entries:
        (batch,) = index.to_table().combine_chunks().to_batches()
        entries = entries_from_table(pa.Table.from_batches([skip.filter(batch)]))
    new_index = ImageIndex(root=index.root, layout=index.layout, classes=index.classes, entries=entries, skipped=index.skipped)
    hashes = skip.take_hashes() if skip_key == "sha256" else None
    return SkipResult(new_index, skip.already_scored, hashes, skip.prior_runs, skip.hashed)
