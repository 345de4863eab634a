"""The run's image list on disk: ``runs/RUN_ID/index.parquet/part-NNNNN.parquet``.

The index is a Parquet dataset folder (as Spark and Dask write them; ``pyarrow``, pandas, DuckDB
and polars read ``index.parquet`` whole). Each file holds :data:`SHARDS_PER_FILE` shards, one
row group per shard, in shard order: shard ``s`` is row group ``s % SHARDS_PER_FILE`` of file
``s // SHARDS_PER_FILE``. A shard task reads one small footer and one row group — with one
file for the whole run, every task would parse a footer of every shard's row group, a cost that
grows with the number of shards (benchmarks/NOTES.md, "Run state"; docs/scaling.md).

:class:`IndexWriter` takes the scan's record batches as they come and cuts shards of
``run.shard_size`` rows in order, so shard ``i`` covers rows ``[i*size, (i+1)*size)`` of the
sorted list whatever the batch sizes: ids are deterministic for a given folder state. Runs
planned before this layout have one file ``index.parquet`` with one row group per shard; they
are read as before.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgscore.images.entries import INDEX_SCHEMA, ImageEntry, entries_batch, entries_from_table
from imgscore.images.scan import stat_entries
from imgscore.io import file_ops, storage
from imgscore.io.containment import check_relative, check_relative_column
from imgscore.io.storage import AnyPath

INDEX_NAME = "index.parquet"
SHARDS_PER_FILE = 64  # row groups per index file: a footer this small parses fast (benchmarks/NOTES.md, "Run state")


def index_file_name(file_no: int) -> str:
    """``index.parquet/part-NNNNN.parquet``: index file ``file_no``, relative to the run folder."""
    return f"{INDEX_NAME}/part-{file_no:05d}.parquet"


def shard_location(index: dict[str, Any], shard_id: int) -> tuple[str, int]:
    """(file relative to the run folder, row group) of ``shard_id`` for a manifest's ``index``."""
    per = int(index.get("shards_per_file") or 0)
    if per <= 0:  # a run planned before the split: one file, one row group per shard
        return INDEX_NAME, shard_id
    return index_file_name(shard_id // per), shard_id % per


def table_fingerprint(table: pa.Table | pa.RecordBatch) -> str:
    """sha256 over the rows' ``"image_path\\tsize\\tmtime_ns\\n"`` (``None`` for a missing stat),
    with ``\\tversion`` added on rows whose object has one (object stores: the ETag): changes
    when any file or object of the shard changes. Computed with pyarrow kernels, no per-row Python."""
    if table.num_rows == 0:
        return hashlib.sha256(b"").hexdigest()
    as_text = [pc.fill_null(pc.cast(table[c], pa.string()), "None") for c in ("size", "mtime_ns")]
    if "version" in table.column_names and table["version"].null_count < table.num_rows:
        as_text.append(pc.fill_null(table["version"], "None"))
    lines = pc.binary_join_element_wise(table["image_path"], *as_text, "\t")
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(lines)], pa.int32()), lines), "\n")[0].as_py()
    return hashlib.sha256((joined + "\n").encode()).hexdigest()


@dataclass(frozen=True)
class ShardSpan:
    """One shard as the writer cut it."""

    shard_id: int
    start: int
    stop: int
    fingerprint: str
    index_file: str
    row_group: int
    pairs: int = 0  # (image, model) pairs: each row's models (null: every one of the run's n_models)


class IndexWriter:
    """Write the index as batches arrive; cut a shard every ``shard_size`` rows.

    Memory: the rows of one unfinished shard plus the current file's writer. Each file is an
    :class:`imgscore.io.file_ops.AtomicWrite`: written under a ``.``-prefixed temp name and
    renamed when its last shard is in (readers and the index dataset skip temp names); in an
    object store built in memory (64 shards of index rows: a few MB) and PUT whole. Use as a
    context manager; :attr:`shards` lists what was cut.
    """

    def __init__(self, run_dir: AnyPath, shard_size: int, shards_per_file: int = SHARDS_PER_FILE, n_models: int = 1):
        self.run_dir = storage.path(run_dir)
        self.n_models = n_models
        self.shard_size = shard_size
        self.shards_per_file = shards_per_file
        self.shards: list[ShardSpan] = []
        self.rows = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file: file_ops.AtomicWrite | None = None  # the index file being written
        storage.make_dirs(storage.path(self.run_dir, INDEX_NAME))

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add rows (:data:`INDEX_SCHEMA`, in index order); full shards are written at once."""
        if batch.num_rows == 0:
            return
        self._pending.extend(batch.to_batches() if isinstance(batch, pa.Table) else [batch])
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.shard_size:
            table = pa.Table.from_batches(self._pending, schema=INDEX_SCHEMA)
            self._emit(table.slice(0, self.shard_size))
            rest = table.slice(self.shard_size)
            self._pending = rest.to_batches()
            self._pending_rows = rest.num_rows

    def _emit(self, table: pa.Table) -> None:
        sid = len(self.shards)
        file_no, group = divmod(sid, self.shards_per_file)
        if group == 0 or self._writer is None:
            self._close_file()
            self._file = file_ops.AtomicWrite(storage.path(self.run_dir, index_file_name(file_no)))
            self._writer = pq.ParquetWriter(self._file.file, INDEX_SCHEMA, compression="zstd")
        table = table.combine_chunks()
        self._writer.write_table(table, row_group_size=table.num_rows)
        start = self.rows
        self.rows += table.num_rows
        wanted = pc.list_value_length(table["models"]).cast(pa.int64())
        pairs = int(pc.sum(pc.fill_null(wanted, self.n_models)).as_py() or 0)
        self.shards.append(
            ShardSpan(sid, start, self.rows, table_fingerprint(table), index_file_name(file_no), group, pairs)
        )

    def _close_file(self) -> None:
        if self._writer is not None and self._file is not None:
            self._writer.close()
            self._file.commit()
        self._writer = self._file = None

    def close(self) -> list[ShardSpan]:
        """Write the last (shorter) shard and close the last file; return every shard."""
        if self._pending_rows:
            self._emit(pa.Table.from_batches(self._pending, schema=INDEX_SCHEMA))
            self._pending, self._pending_rows = [], 0
        self._close_file()
        return self.shards

    def abort(self) -> None:
        """Drop the file being written (planning failed)."""
        if self._writer is not None and self._file is not None:
            try:
                self._writer.close()
            finally:
                self._file.abort()
        self._writer = self._file = None

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def info(self) -> dict[str, Any]:
        """The manifest's ``index`` section for what was written."""
        fp = hashlib.sha256("".join(s.fingerprint for s in self.shards).encode()).hexdigest()
        return {
            "file": INDEX_NAME,
            "shards_per_file": self.shards_per_file,
            "fingerprint": fp,
            "images": self.rows,
            "shard_size": self.shard_size,
        }


def read_shard_table(run_dir: AnyPath, index_file: str, row_group: int) -> pa.Table:
    """The shard's rows (:data:`INDEX_SCHEMA`): one row group of one index file.

    Raises:
        UnsafePathError: ``index_file`` leaves ``run_dir``, or an ``fs_path`` leaves the input
            root (absolute, or a ``..`` component): the index is run state, read back as data.
    """
    url = storage.join(run_dir, check_relative(index_file, "index file"))
    with storage.open_input(url) as f:  # an object: ranged GETs of the footer and the one row group
        t = pq.ParquetFile(f).read_row_group(row_group)
    check_relative_column(t["fs_path"], f"{url} fs_path")
    return t


def read_shard_entries(run_dir: AnyPath, index_file: str, row_group: int) -> list[ImageEntry]:
    """The shard's images as :class:`~imgscore.images.entries.ImageEntry`, in index order."""
    return entries_from_table(read_shard_table(run_dir, index_file, row_group))


def refresh_shards(
    run_dir: AnyPath, index: dict[str, Any], input_root: AnyPath, shard_ids: list[int]
) -> dict[int, str]:
    """Re-stat the images of ``shard_ids`` and rewrite the index files that hold them atomically.

    A file fixed since the run (a truncated JPEG replaced) then gets a prediction row with its
    current size and mtime, which later incremental runs compare against. The image list and the
    layout are unchanged; a file that is gone now gets a ``scan_error``. Only the files holding
    those shards are rewritten.

    Returns:
        shard id → its new fingerprint (:func:`table_fingerprint`), for the given shards.
    """
    by_file: dict[str, dict[int, int]] = {}
    for sid in shard_ids:
        f, g = shard_location(index, sid)
        by_file.setdefault(f, {})[g] = sid
    fps: dict[int, str] = {}

    for rel, groups in by_file.items():
        path = storage.path(run_dir, check_relative(rel, "index file"))
        pf = pq.ParquetFile(io.BytesIO(storage.read_bytes(path)))  # a file of 64 shards' rows: a few MB
        with file_ops.AtomicWrite(path) as sink, pq.ParquetWriter(sink, INDEX_SCHEMA, compression="zstd") as w:
            for g in range(pf.num_row_groups):
                t = conform(pf.read_row_group(g))
                if g in groups:
                    check_relative_column(t["fs_path"], f"{path} fs_path")
                    t = _restat(input_root, t)
                    fps[groups[g]] = table_fingerprint(t)
                w.write_table(t, row_group_size=max(1, t.num_rows))
    return fps


def conform(t: pa.Table) -> pa.Table:
    """Index rows in the current :data:`INDEX_SCHEMA` (an index written before the ``version``
    or ``models`` column gets it, null)."""
    if "version" not in t.column_names:
        t = t.append_column(INDEX_SCHEMA.field("version"), pa.nulls(t.num_rows, pa.string()))
    if "models" not in t.column_names:  # an index written before several models: every model scores every row
        t = t.append_column(INDEX_SCHEMA.field("models"), pa.nulls(t.num_rows, pa.list_(pa.string())))
    return t.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)


def _restat(root: AnyPath, t: pa.Table) -> pa.Table:
    """``t``'s rows stat'ed again (same paths, labels and order), as the scan stats them; an
    object-store root HEADs each object (size, last-modified, ETag), and one that is gone gets a
    ``scan_error`` (:func:`imgscore.images.scan.stat_entries`)."""
    rels = [os.fsdecode(b) for b in t["fs_path"].to_pylist()]
    models: list[list[str] | None] = t["models"].to_pylist() if "models" in t.column_names else [None] * t.num_rows
    fresh = stat_entries(root, rels, t["label"].to_pylist(), t["label_name"].to_pylist())
    fresh = [replace(e, models=tuple(m) if m is not None else None) for e, m in zip(fresh, models, strict=True)]
    return pa.Table.from_batches([entries_batch(fresh)], schema=INDEX_SCHEMA)
