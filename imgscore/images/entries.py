"""The scan's rows: one :class:`ImageEntry` per image, and the index schema they are stored in.

The scan (:mod:`imgscore.images.scan`) yields them as record batches of :data:`INDEX_SCHEMA`;
the run's index (:mod:`imgscore.runstate.index`) stores those batches, and a shard reads its rows
back as entries (:func:`entries_from_table`). Paths are kept twice: ``fs_path`` (the OS bytes,
which open the file) and ``image_path`` (valid UTF-8 with ``/``, what every output row names).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow as pa

from imgscore.io.storage import AnyPath

INDEX_SCHEMA = pa.schema(
    [
        pa.field("image_path", pa.string(), nullable=False),  # display path, valid UTF-8
        pa.field("fs_path", pa.binary(), nullable=False),  # os.fsencode(relative path): opens the file
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("size", pa.int64()),  # bytes
        pa.field("mtime_ns", pa.int64()),
        pa.field("scan_error", pa.string()),  # set when the entry could not be stat'ed
        # object stores: the store's identity of the bytes (ETag, ETag@VersionId, GCS generation); null for files
        pa.field("version", pa.string()),
        pa.field(
            "models", pa.list_(pa.string())
        ),  # names of the models still to score it (run.skip_scored, several models); null: every model
    ]
)


def display_path(rel: str) -> str:
    """Relative path → valid UTF-8 with ``/`` separators.

    Bytes that are not UTF-8 (Latin-1 names from old shares) become ``\\xNN`` escapes, so the
    string still identifies the file: ``b"caf\\xe9.jpg"`` → ``"caf\\\\xe9.jpg"``.
    """
    raw = os.fsencode(rel)
    if os.sep != "/":
        raw = raw.replace(os.sep.encode(), b"/")
    return raw.decode("utf-8", errors="backslashreplace")


def note_skipped(skipped: list[dict[str, str]], rel: str, reason: str) -> None:
    """Add a file the scan lists but does not score to ``skipped``: ``{"image_path", "reason"}``."""
    skipped.append({"image_path": display_path(rel), "reason": reason})


@dataclass(frozen=True)
class ImageEntry:
    """One image found by the scan. ``rel`` is the OS path relative to the root (for an object
    store, the key relative to the root URL); ``mtime_ns`` the file's mtime or the object's
    last-modified time; ``version`` the object's ETag/generation (None for files)."""

    rel: str
    label: int | None
    label_name: str | None
    size: int | None
    mtime_ns: int | None
    scan_error: str | None = None
    version: str | None = None
    models: tuple[str, ...] | None = (
        None  # the models still to score it (run.skip_scored); None: every model of the run
    )

    def wants(self, model_name: str) -> bool:
        """Whether the model named ``model_name`` scores this image in this run."""
        return self.models is None or model_name in self.models

    @property
    def image_path(self) -> str:
        return display_path(self.rel)


@dataclass
class ImageIndex:
    """Result of :func:`imgscore.images.scan.scan_images`: sorted entries, classes and skipped files."""

    root: AnyPath  # a local folder, or an object-store URL
    layout: str  # "imagefolder" or "flat"
    classes: list[str]
    entries: list[ImageEntry]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"image_path", "reason"}

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def to_table(self) -> pa.Table:
        """The index as a pyarrow Table with :data:`INDEX_SCHEMA` (what shards read back)."""
        return pa.Table.from_batches([entries_batch(self.entries)], schema=INDEX_SCHEMA)


def entries_batch(entries: list[ImageEntry]) -> pa.RecordBatch:
    """``entries`` as one record batch of :data:`INDEX_SCHEMA` (column by column)."""
    posix = os.sep == "/"
    return pa.RecordBatch.from_arrays(
        [
            pa.array([e.rel if posix and e.rel.isascii() else e.image_path for e in entries], pa.string()),
            pa.array([os.fsencode(e.rel) for e in entries], pa.binary()),
            pa.array([e.label for e in entries], pa.int32()),
            pa.array([e.label_name for e in entries], pa.string()),
            pa.array([e.size for e in entries], pa.int64()),
            pa.array([e.mtime_ns for e in entries], pa.int64()),
            pa.array([e.scan_error for e in entries], pa.string()),
            pa.array([e.version for e in entries], pa.string()),
            pa.array([list(e.models) if e.models is not None else None for e in entries], pa.list_(pa.string())),
        ],
        schema=INDEX_SCHEMA,
    )


def entries_from_table(table: pa.Table) -> list[ImageEntry]:
    """Inverse of :meth:`ImageIndex.to_table` for a slice of the index (an index written before
    the ``version`` column reads with versions None)."""
    cols = table.to_pydict()
    versions = cols.get("version") or [None] * table.num_rows
    models = cols.get("models") or [None] * table.num_rows  # index files written before several models lack it
    return [
        ImageEntry(
            rel=os.fsdecode(cols["fs_path"][i]),
            label=cols["label"][i],
            label_name=cols["label_name"][i],
            size=cols["size"][i],
            mtime_ns=cols["mtime_ns"][i],
            scan_error=cols["scan_error"][i],
            version=versions[i],
            models=tuple(models[i]) if models[i] is not None else None,
        )
        for i in range(table.num_rows)
    ]
