"""The analytics contract: one explicit pyarrow schema per table, atomic part files.

Layout::

    OUT/predictions/run_date=YYYY-MM-DD/RUN_ID/part-SSSSS.parquet
    OUT/errors/run_date=YYYY-MM-DD/RUN_ID/part-SSSSS.parquet
    OUT/errors_history/run_date=YYYY-MM-DD/RUN_ID/part-SSSSS-attempt-NNN.parquet

``run_date`` is the one hive partition (``key=value`` folder); the run's folder is a plain name
and ``run_id`` a string column in every file. So each table folder reads as-is, with ``run_id``
a string and ``run_date`` from the path, in ``pandas.read_parquet(dir)``,
``pyarrow.parquet.read_table(dir)``, ``pyarrow.dataset.dataset(dir, partitioning="hive")``,
polars and DuckDB (``hive_partitioning``), and Spark (whose partition discovery skips a leaf
folder that is not ``key=value``). A ``run_id=RUN`` folder as well as a ``run_id`` column — the
layout before — made pandas and ``read_table`` refuse the merge (string vs dictionary);
:mod:`imgscore.runstate.migrate` moves such folders into this layout (:func:`part_dir` is the only
place a part-file folder is named; :func:`legacy_part_dir` names the old one).

Part files are written to a temp name starting with ``.`` in the same folder and renamed into
place, so readers (which skip ``.``/``_`` files) never see half a file, and a rewrite of the same
shard replaces its file instead of adding one (:class:`imgscore.io.file_ops.AtomicWrite`; on an
object store, one PUT). The temp file is always created new: a symlink planted at its name is
never written through.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from imgscore.errors import OutputWriteError
from imgscore.io import file_ops, storage
from imgscore.io.containment import check_run_date, safe_name
from imgscore.io.storage import AnyPath

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("input_root", pa.string()),  # the run's input.root, absolute: rows of two folders never merge
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("pred_index", pa.int32(), nullable=False),
        pa.field("pred_label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("topk_indices", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_scores", pa.list_(pa.float32()), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field(
            "model_name", pa.string(), nullable=False
        ),  # the config's model name (models[i].name; model.arch by default)
        pa.field("device", pa.string(), nullable=False),
        pa.field("worker", pa.string(), nullable=False),
        pa.field("shard_id", pa.int32(), nullable=False),
        pa.field("batch_id", pa.int32(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("file_size", pa.int64()),  # bytes, for incremental runs
        pa.field("file_mtime_ns", pa.int64()),
        pa.field("file_version", pa.string()),  # object stores: the ETag (ETag@VersionId) scored; null for files
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("input_root", pa.string()),
        pa.field("image_path", pa.string()),  # null for a whole-batch failure
        pa.field("shard_id", pa.int32(), nullable=False),
        pa.field("batch_id", pa.int32()),  # null when the failure is outside any batch
        pa.field("stage", pa.string(), nullable=False),  # scan, decode, preprocess, inference, write
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("occurred_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("worker", pa.string()),
        pa.field("model_id", pa.string(), nullable=False),  # the model this (image, model) pair failed for
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("file_size", pa.int64()),  # bytes, as scanned: the failure ledger's key (run.skip_scored)
        pa.field("file_mtime_ns", pa.int64()),
        pa.field("file_version", pa.string()),  # object stores: the ETag as listed; null for files
    ]
)

# The embeddings table's key columns (the same keys as a predictions row); its ``embedding``
# column's length depends on the model: imgscore.inference.embeddings.embeddings_schema.
EMBEDDING_KEYS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("input_root", pa.string()),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("shard_id", pa.int32(), nullable=False),
        pa.field("batch_id", pa.int32(), nullable=False),
    ]
)

STAGES = ("scan", "decode", "preprocess", "inference", "write")


TABLES = ("predictions", "errors", "errors_history", "embeddings")  # the tables of part files under output.root


def part_dir(out_root: AnyPath, table: str, run_date: str, run_id: str) -> UPath:
    """``OUT/<table>/run_date=YYYY-MM-DD/RUN_ID``: the folder of a run's part files of ``table``
    (one of :data:`TABLES`). Every path to a part file is built from this.

    Raises:
        UnsafePathError: ``run_date`` is not ``YYYY-MM-DD`` or ``run_id`` is not one folder name
            (both come from run state: ``imgscore.io.containment``).
    """
    check_run_date(run_date, "run_date")
    return storage.path(out_root, table, f"run_date={run_date}", safe_name(run_id, "run_id"))


def input_root_name(root: AnyPath) -> str:
    """What a run records as its input folder — the manifest's ``input.root``, every row's
    ``input_root`` column, and part of the skip and failure-ledger keys: ``input.root`` as
    configured, made absolute (``os.path.abspath``: normalised, symlinks kept as written), so
    rows of ``/data/a`` and ``/data/b`` never merge and a relative root does not depend on
    where a reader stands. An object-store URL is recorded as configured (normalized)."""
    return storage.absolute(root)


def legacy_part_dir(out_root: AnyPath, table: str, run_date: str, run_id: str) -> UPath:
    """``OUT/<table>/run_date=…/run_id=RUN_ID``: where versions before this layout wrote the
    folder (:mod:`imgscore.runstate.migrate` moves it to :func:`part_dir`); checked as :func:`part_dir` is.

    Raises:
        UnsafePathError: as :func:`part_dir`.
    """
    check_run_date(run_date, "run_date")
    return storage.path(out_root, table, f"run_date={run_date}", f"run_id={safe_name(run_id, 'run_id')}")


def run_part_files(
    out_root: AnyPath, table: str, run_date: str | None, run_id: str, pattern: str = "part-*.parquet"
) -> list[UPath]:
    """A run's part files of ``table``, sorted: from :func:`part_dir`, or from the legacy folder
    when a run written before the layout change has not been moved yet (object stores have only
    today's layout: the legacy folder is never there). Empty when ``run_date`` is None (a
    manifest that never planned) or the run wrote none."""
    if not run_date:
        return []
    for folder in (part_dir(out_root, table, run_date, run_id), legacy_part_dir(out_root, table, run_date, run_id)):
        found = storage.glob(storage.join(folder, pattern))
        if found:
            return [storage.path(f) for f in found]
    return []


def part_name(shard_id: int) -> str:
    """``part-SSSSS.parquet``: the name of shard ``shard_id``'s part file in each table's folder."""
    return f"part-{shard_id:05d}.parquet"


METADATA_KEY = "imgscore"  # schema-level metadata key on every part file; the value is JSON
MODEL_INFO_KEYS = ("arch", "model_id", "classes", "num_classes", "source", "preprocess")


def config_hash(config: dict | None) -> str | None:
    """sha256 hex of the resolved config as canonical JSON, ignoring ``run.run_id`` and ``notify``
    (who is told about a run is not part of its setup).

    Two runs with the same settings (model, preprocessing, input, output, ...) get the same
    hash, so analysts can group runs by "same setup" without diffing configs.
    """
    if config is None:
        return None
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    if isinstance(cfg.get("run"), dict):
        cfg["run"].pop("run_id", None)
    cfg.pop("notify", None)
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def file_metadata(model_info: dict, run_id: str, extra: dict | None = None) -> dict[str, str]:
    """Schema-level metadata for a run's part files: ``{"imgscore": JSON}``.

    The JSON holds ``extra`` (the flow passes ``{"config": resolved config}``) plus ``run_id``,
    ``model`` (``LoadedModel.info()`` limited to :data:`MODEL_INFO_KEYS`) and, flat for easy
    querying, ``arch``, ``model_id``, ``classes``, ``preprocess``, ``torch``, ``torchvision``,
    ``imgscore_version`` (package versions) and ``config_hash`` (:func:`config_hash`). Keys are
    sorted and nothing time-dependent is included, so every part file of a run (predictions,
    errors, empty or not) carries identical metadata.
    Read it back with ``json.loads(pq.read_schema(path).metadata[b"imgscore"])``.
    """
    extra = dict(extra or {})
    model = {k: model_info.get(k) for k in MODEL_INFO_KEYS}  # same keys whoever describes the model
    payload = {
        **extra,
        "format_version": 1,
        "run_id": run_id,
        "model": model,
        "arch": model_info.get("arch"),
        "model_id": model_info.get("model_id"),
        "classes": model_info.get("classes"),
        "preprocess": model_info.get("preprocess"),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "imgscore_version": _version("imgscore"),
        "config_hash": config_hash(extra.get("config")),
    }
    return {METADATA_KEY: json.dumps(payload, sort_keys=True, default=str)}


def make_table(rows: list[dict], schema: pa.Schema, metadata: dict[str, str] | None = None) -> pa.Table:
    """Rows → Table with exactly ``schema`` (a missing column fails loudly; no type inference).

    ``metadata`` (str → str, JSON for structured values) goes into the schema metadata.
    """
    missing = [f.name for f in schema if rows and f.name not in rows[0] and not f.nullable]
    if missing:
        raise KeyError(f"rows lack required columns {missing}")
    table = pa.Table.from_pylist(rows, schema=schema)
    if metadata:
        table = table.replace_schema_metadata({**(schema.metadata or {}), **metadata})
    return table


@contextlib.contextmanager
def writing(path: AnyPath) -> Iterator[None]:
    """Turn an ``OSError`` of the block (disk full, quota, read-only, file too large) into
    :class:`~imgscore.errors.OutputWriteError` naming ``path``. The writes of this layer remove
    their own half-written temp files first (:class:`imgscore.io.file_ops.AtomicWrite`), so
    nothing half-written stays behind."""
    try:
        yield
    except OSError as exc:
        raise OutputWriteError.of(storage.display(path), exc) from exc


def write_table_atomic(table: pa.Table, path: AnyPath) -> UPath:
    """Write ``table`` as zstd Parquet to ``path`` via a ``.``-prefixed temp file and rename.

    Returns the final path. The rename is atomic on POSIX file systems; a killed writer leaves
    only a hidden temp file that readers skip and :func:`imgscore.io.file_ops.remove_temp_files`
    removes. An object-store URL gets one PUT of the finished file (atomic there; no temp object).

    Raises:
        OutputWriteError: the write failed (disk full, quota, a store that refused the PUT after
            its retries), naming ``path``; nothing half-written is left.
    """
    dest = storage.path(path)
    with writing(dest), file_ops.AtomicWrite(dest) as f:
        pq.write_table(table, f, compression="zstd")
    return dest


def write_json_atomic(obj: Any, path: AnyPath) -> UPath:
    """JSON with the same temp-then-rename guarantee as part files."""
    return write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=False, default=str).encode(), path)


def write_bytes_atomic(data: bytes, path: AnyPath) -> UPath:
    """Write ``data`` to ``path`` via a ``.``-prefixed temp file, fsync, and rename (an
    object-store URL: one PUT); return the path.

    Raises:
        OutputWriteError: as :func:`write_table_atomic`.
    """
    dest = storage.path(path)
    with writing(dest):
        storage.write_bytes(dest, data)
    return dest
