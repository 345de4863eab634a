"""The incremental filter (``run.skip_scored``): the scan's batches less the images already
scored, and less those the failure ledger carries — what :mod:`imgscore.runstate.incremental`
reads from earlier runs, applied batch by batch as the scan streams into the index.

The membership test is one vectorised ``pyarrow.compute.is_in`` over ``path\tsize\tmtime\tversion``
strings (paths in Unicode NFC); in sha256 mode the rows no stat matched are hashed and matched by
content. Counts (``already_scored``, ``already_failed``, ``hashed``) add up as batches pass;
:class:`imgscore.runstate.listings.Listings` writes what the filter hands out (content hashes,
carried failures) beside the run's index.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from imgscore.images.entries import ImageIndex, entries_from_table
from imgscore.io import storage
from imgscore.io.file_ops import sha256_of_file
from imgscore.io.parquet import input_root_name
from imgscore.io.storage import AnyPath
from imgscore.runstate.incremental import (
    CARRIED_SCHEMA,
    FAILED_COLUMNS,
    HASHES_SCHEMA,
    STAT_COLUMNS,
    prior_runs,
    read_failed,
    read_hashes,
    read_scored,
)


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
        wanted = [
            None if all(m[i] for m in masks) else [n for n, m in zip(self.names, masks, strict=True) if m[i]]
            for i in range(batch.num_rows)
            if keep[i]
        ]
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

    def __init__(
        self,
        out_root: AnyPath,
        model_info: dict[str, Any],
        input_root: AnyPath,
        skip_key: str = "stat",
        exclude_run: str | None = None,
        retry_failed: bool = False,
    ):
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
        self._hash_rows: list[dict[str, Any]] = []
        self._carried: list[pa.Table] = []
        self._scored = read_scored(out_root, self.runs, model_info["model_id"]) if self.runs else None
        self._keys = None
        if self._scored is not None:
            self._keys = pc.unique(
                _flat(
                    _stat_keys(
                        self._scored["image_path"],
                        self._scored["file_size"],
                        self._scored["file_mtime_ns"],
                        self._scored["file_version"],
                    )
                )
            )
        self._failed = (
            read_failed(out_root, self.runs, model_info.get("model_id")) if self.runs and not retry_failed else None
        )
        self._failed_keys = None
        if self._failed is not None and self._failed.num_rows:
            self._failed_keys = _flat(
                _stat_keys(
                    self._failed["image_path"],
                    self._failed["file_size"],
                    self._failed["file_mtime_ns"],
                    self._failed["file_version"],
                )
            )
        self._content_keys: pa.Array | None = None  # path\tsha256 of earlier sha256-mode runs, read on first need
        self._failed_content: tuple[pa.Array, pa.Table] | None = None  # (keys, failed rows) by content

    def _hashes_of(self, keys: pa.Table) -> pa.Table:
        return keys.join(
            read_hashes(self.out_root, self.runs),
            keys=STAT_COLUMNS[:3],
            right_keys=["image_path", "size", "mtime_ns"],
            join_type="inner",
        )

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
            failed_at = pc.if_else(
                scored, pa.scalar(None, pa.int64()), pc.cast(pc.index_in(keys, value_set=self._failed_keys), pa.int64())
            )
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
        if self._failed is None or not pc.any(hit).as_py():
            return  # nothing carried (without a failure ledger no row has a failure's position)
        rows = pa.Table.from_batches([batch]).filter(hit)
        at = failed_at.filter(hit)
        src = self._failed
        if self._failed_content is not None:  # positions past the stat table's rows index the content table
            src = src.select(FAILED_COLUMNS)
            src = pa.concat_tables([src, self._failed_content[1].select(FAILED_COLUMNS).cast(src.schema)])
        failure = src.take(at)
        self._carried.append(
            pa.table(
                {
                    "input_root": pa.array([self.root_name] * rows.num_rows, pa.string()),
                    "image_path": rows["image_path"],
                    "file_size": rows["size"],
                    "file_mtime_ns": rows["mtime_ns"],
                    "failed_run_id": failure["run_id"],
                    "stage": failure["stage"],
                    "error_type": failure["error_type"],
                    "message": pc.utf8_slice_codeunits(failure["message"], 0, 300),
                    "model_name": pa.array([self.model_name] * rows.num_rows, pa.string()),
                },
                schema=CARRIED_SCHEMA,
            )
        )

    def _filter_by_content(
        self, batch: pa.RecordBatch, keep: pa.Array, scored: pa.Array, failed_at: pa.Array
    ) -> tuple[pa.Array, pa.Array, pa.Array]:
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
            # positions in the content table follow the stat table's rows
            n_failed = self._failed.num_rows if self._failed is not None else 0
            fkeys = self._failed_by_content()[0] if n_failed else None
            fpos = pc.index_in(probe, value_set=fkeys).to_pylist() if fkeys is not None else [None] * len(idx)
            for i, h, f in zip(idx, hit, fpos, strict=True):
                if h:
                    flags[i], scored_l[i] = False, True
                elif f is not None:
                    flags[i], failed_l[i] = False, n_failed + f
        self._hash_rows += [
            {"image_path": paths[i], "size": sizes[i], "mtime_ns": mtimes[i], "sha256": sha}
            for i, sha in shas.items()
            if flags[i]
        ]
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
    out_root: AnyPath,
    model_info: dict[str, Any],
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
    new_index = ImageIndex(
        root=index.root, layout=index.layout, classes=index.classes, entries=entries, skipped=index.skipped
    )
    hashes = skip.take_hashes() if skip_key == "sha256" else None
    return SkipResult(
        new_index, skip.already_scored, hashes, skip.prior_runs, skip.hashed, skip.already_failed, skip.take_carried()
    )


# The incremental filter of a run: one model's, or several models' joined.
SkipFilter = AlreadyScored | AlreadyScoredEach
