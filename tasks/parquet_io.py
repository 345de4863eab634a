"""The analytics contract: one explicit pyarrow schema per table, atomic part files.

Layout (hive partitioning, readable by pyarrow.dataset, DuckDB, pandas, Spark, polars)::

    OUT/predictions/run_date=YYYY-MM-DD/run_id=RUN/part-SSSSS.parquet
    OUT/errors/run_date=YYYY-MM-DD/run_id=RUN/part-SSSSS.parquet

Part files are written to a temp name starting with ``.`` in the same folder and renamed into
place, so readers (which skip ``.``/``_`` files) never see half a file, and a rewrite of the same
shard replaces its file instead of adding one. The temp file is always created new
(:func:`imgscore.tasks.containment.create_new`): a symlink planted at its name is never written
through.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from imgscore.tasks.containment import check_run_date, create_new, remove_temp_files, safe_name

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("pred_index", pa.int32(), nullable=False),
        pa.field("pred_label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("topk_indices", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_scores", pa.list_(pa.float32()), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("worker", pa.string(), nullable=False),
        pa.field("shard_id", pa.int32(), nullable=False),
        pa.field("batch_id", pa.int32(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("file_size", pa.int64()),  # bytes, for incremental runs
        pa.field("file_mtime_ns", pa.int64()),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_path", pa.string()),  # null for a whole-batch failure
        pa.field("shard_id", pa.int32(), nullable=False),
        pa.field("batch_id", pa.int32()),  # null when the failure is outside any batch
        pa.field("stage", pa.string(), nullable=False),  # scan, decode, preprocess, inference, write
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("occurred_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("worker", pa.string()),
    ]
)

STAGES = ("scan", "decode", "preprocess", "inference", "write")


def part_dir(out_root: str | Path, table: str, run_date: str, run_id: str) -> Path:
    """``OUT/<table>/run_date=…/run_id=…`` for ``table`` in {predictions, errors, errors_history}.

    Raises:
        UnsafePathError: ``run_date`` is not ``YYYY-MM-DD`` or ``run_id`` is not one folder name
            (both come from run state: ``imgscore.tasks.containment``).
    """
    check_run_date(run_date, "run_date")
    return Path(out_root) / table / f"run_date={run_date}" / f"run_id={safe_name(run_id, 'run_id')}"


def part_name(shard_id: int) -> str:
    return f"part-{shard_id:05d}.parquet"


METADATA_KEY = "imgscore"  # schema-level metadata key on every part file; the value is JSON
MODEL_INFO_KEYS = ("arch", "model_id", "classes", "num_classes", "source", "preprocess")


def config_hash(config: dict | None) -> str | None:
    """sha256 hex of the resolved config as canonical JSON, ignoring ``run.run_id``.

    Two runs with the same settings (model, preprocessing, input, output, ...) get the same
    hash, so analysts can group runs by "same setup" without diffing configs.
    """
    if config is None:
        return None
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    if isinstance(cfg.get("run"), dict):
        cfg["run"].pop("run_id", None)
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
    ``model`` (``LoadedModel.info()`` limited to :data:`MODEL_INFO_KEYS`) and, flat for easy querying, ``arch``, ``model_id``,
    ``classes``, ``preprocess``, ``torch``, ``torchvision``, ``imgscore_version`` (package versions) and
    ``config_hash`` (:func:`config_hash`). Keys are sorted and nothing time-dependent is included,
    so every part file of a run (predictions, errors, empty or not) carries identical metadata.
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


def write_table_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as zstd Parquet to ``path`` via a ``.``-prefixed temp file and rename.

    Returns the final path. The rename is atomic on POSIX file systems; a killed writer leaves
    only a hidden temp file that readers skip and :func:`clean_temp_files` removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with os.fdopen(create_new(tmp), "wb") as f:
        pq.write_table(table, f, compression="zstd")
    os.replace(tmp, path)
    return path


def write_json_atomic(obj, path: str | Path) -> Path:
    """JSON with the same temp-then-rename guarantee as part files."""
    return write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=False, default=str).encode(), path)


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` via a ``.``-prefixed temp file, fsync, and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with os.fdopen(create_new(tmp), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def temp_path(path: str | Path) -> Path:
    """``.NAME.PID.tmp`` beside ``path``: where this process writes ``path`` before renaming it."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.tmp"


def clean_temp_files(folder: str | Path) -> int:
    """Delete leftover ``.*.tmp`` names under ``folder`` (from killed writers); return how many.
    Symlinks are removed, not followed (:func:`imgscore.tasks.containment.remove_temp_files`)."""
    return remove_temp_files(folder)
