"""Output roots written by earlier versions, moved into the current part-file layout in place.

Earlier versions wrote ``OUT/<table>/run_date=D/run_id=RUN/part-….parquet``: ``run_id`` both a
``key=value`` folder and a column, which ``pandas.read_parquet(dir)`` and
``pyarrow.parquet.read_table(dir)`` refuse to merge, and which breaks polars and DuckDB on a root
that holds both layouts. Their files also lack ``input_root`` (and errors lack ``file_size`` and
``file_mtime_ns``), so one schema no longer covers every file. A root that holds either is not
readable untouched, so it is migrated rather than read both ways:

:func:`migrate_output_root`, called when ``imgscore run`` plans and when ``imgscore rerun``
starts, moves every run found in the old layout that no live process holds
(:mod:`imgscore.runstate.lock`): with the run's lock held, each part file is rewritten into
:func:`~imgscore.io.parquet.part_dir` in the current schema — ``input_root`` from the run's
manifest, else from the file's own metadata (``config.input.root``), made absolute as new runs
record it (:func:`~imgscore.io.parquet.input_root_name`); columns an old file lacks are
null; rows, values and file metadata are kept — written temp-then-rename, and only then is the old
file deleted. Then the old folder goes, and the run's recorded file paths (manifest and commit
records) are rewritten. Every step is idempotent: a migration killed at any point is finished by
the next one (a file present in both places is rewritten from the old one again).

imgscore's own readers (``report``, ``rerun``, ``run.skip_scored``) find a run's files in either
layout (:func:`~imgscore.io.parquet.run_part_files`), so a run that a live writer of an
earlier version still holds reads until it is moved on a later start.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from imgscore.errors import OutputWriteError, RunLockedError
from imgscore.io import file_ops, storage
from imgscore.io.containment import UnsafePathError, inside
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    METADATA_KEY,
    PREDICTIONS_SCHEMA,
    input_root_name,
    part_dir,
    write_table_atomic,
)
from imgscore.io.storage import AnyPath
from imgscore.runstate import lock as run_lock
from imgscore.runstate.commits import run_dir_of
from imgscore.runstate.manifest import (
    COMMITS_DIR,
    MANIFEST,
    ShardResult,
    write_commit_record,
)
from imgscore.runstate.state import RunState

log = logging.getLogger("imgscore")

SCHEMAS = {"predictions": PREDICTIONS_SCHEMA, "errors": ERRORS_SCHEMA, "errors_history": ERRORS_SCHEMA}


@dataclass
class Migration:
    """What :func:`migrate_output_root` did: runs moved, part files rewritten, runs left for later
    (held by a live writer: ``{run_id: reason}``)."""

    runs: list[str] = field(default_factory=list)
    files: int = 0
    held: dict[str, str] = field(default_factory=dict)


def legacy_folders(out_root: Path) -> dict[str, list[tuple[str, str, Path]]]:
    """Folders of the old layout under the local ``out_root``: run id → [(table, run_date, folder)]."""
    found: dict[str, list[tuple[str, str, Path]]] = {}
    for table in SCHEMAS:  # the tables the layout before could hold (embeddings came after it)
        for d in sorted(out_root.glob(f"{table}/run_date=*/run_id=*")):
            if d.is_dir() and not d.is_symlink():
                found.setdefault(d.name.split("=", 1)[1], []).append((table, d.parent.name.split("=", 1)[1], d))
    return found


def conform(table: pa.Table, schema: pa.Schema, fill: dict[str, object] | None = None) -> pa.Table:
    """``table`` in ``schema``'s columns and order: columns it has are cast, columns it lacks are
    ``fill[name]`` (default null) on every row; the schema metadata (per-run ``imgscore`` JSON) is kept.

    Raises:
        pyarrow.ArrowInvalid: a column that cannot be cast to the schema's type.
    """
    fill = fill or {}
    cols = [
        table[f.name].cast(f.type)
        if f.name in table.column_names
        else pa.array([fill.get(f.name)] * table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(cols, schema=schema).replace_schema_metadata(table.schema.metadata)


def _recorded_root(run_dir: AnyPath, sample: Path | None) -> str | None:
    """The run's input root: its manifest's ``input.root``, else the one in a part file's metadata."""
    try:
        manifest = inside(run_dir, storage.path(run_dir, MANIFEST), "manifest.json")
        root = (json.loads(manifest.read_text(encoding="utf-8")).get("input") or {}).get("root")
        if root:
            return input_root_name(root)
    except (OSError, ValueError, UnsafePathError):
        pass
    if sample is not None:
        try:
            meta = json.loads(pq.read_schema(sample).metadata[METADATA_KEY.encode()])
            root = ((meta.get("config") or {}).get("input") or {}).get("root")
            return input_root_name(root) if root else None
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            return None
    return None


def _recorded_model(part_file: Path) -> dict[str, str]:
    """``model_id`` and ``model_name`` for rows written before they were columns: the one model
    the part file's metadata names (its arch is the name a run of one model gives it)."""
    try:
        meta = json.loads(pq.read_schema(part_file).metadata[METADATA_KEY.encode()])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return {"model_id": "", "model_name": ""}
    return {"model_id": meta.get("model_id") or "", "model_name": meta.get("arch") or ""}


def migrate_run(out: Path, run_id: str, folders: list[tuple[str, str, Path]]) -> int:
    """Move one run's old-layout ``folders`` (under the local output root ``out``) into the
    current layout (module docstring); the caller holds the run's lock. Returns the part files
    rewritten.

    Raises:
        OSError: a file cannot be read or written (nothing is lost: the old file stays until its
            copy is in place).
    """
    run_dir = run_dir_of(out, run_id)  # one folder name, not a link out of the output root
    for _, _, d in folders:
        inside(out, d, "part-file folder")
    files = [
        (table, run_date, f)
        for table, run_date, d in folders
        for f in sorted(d.glob("*.parquet"))
        if not f.name.startswith((".", "_")) and not f.is_symlink()
    ]
    root = _recorded_root(run_dir, files[0][2] if files else None)
    for table, run_date, f in files:
        new = conform(pq.read_table(f), SCHEMAS[table], {"input_root": root, **_recorded_model(f)})
        write_table_atomic(new, storage.path(part_dir(out, table, run_date, run_id), f.name))
        f.unlink()
    for _, _, d in folders:
        file_ops.remove_temp_files(d)  # a killed writer's leftovers: the run is not live (we hold its lock)
        try:
            d.rmdir()
        except OSError as exc:
            log.warning("layout: %s is not empty after moving its part files (%s); left in place", d, exc.strerror)
    if storage.is_file(storage.path(run_dir, MANIFEST)):
        _rewrite_recorded_paths(out, run_dir, root)
    return len(files)


def _new_paths(files: list[str]) -> list[str]:
    return [f.replace(f"{os.sep}run_id=", os.sep) if "run_id=" in f else f for f in files]


def _rewrite_recorded_paths(out: Path, run_dir: AnyPath, root: str | None) -> None:
    """The run's manifest (outputs, every shard's files, input root) and commit records point at
    the moved files."""
    state = RunState.open(run_dir)
    try:
        m = state.manifest
        if m.run_date:
            m.outputs = {t: str(part_dir(out, t, m.run_date, m.run_id)) for t in ("predictions", "errors")}
        for rec in m.shards:
            rec.files = _new_paths(rec.files)
        if root and m.input.get("root"):
            m.input = {**m.input, "root": root}
        state.save()
    finally:
        state.close()
    for p in sorted(storage.path(run_dir, COMMITS_DIR).glob("*.json")):
        try:
            record = ShardResult.model_validate_json(p.read_bytes())
        except (OSError, ValueError):
            continue
        if any("run_id=" in f for f in record.files):
            write_commit_record(run_dir, record.model_copy(update={"files": _new_paths(record.files)}))


def migrate_output_root(out_root: AnyPath, held_run: str | None = None) -> Migration:
    """Move every run of ``out_root`` still in the old layout into the current one (module
    docstring). Each run is moved under its own lock; a run a live process holds is left for a
    later start and named in the result. ``held_run``: a run whose lock this process already
    holds (``imgscore rerun``), moved without taking it again. Never raises for a run that cannot
    be moved: it is logged as one warning line and stays readable where it is. An object-store
    root has nothing to move: it was only ever written in today's layout.
    """
    result = Migration()
    out = storage.local_path(out_root)
    if out is None:
        return result
    for run_id, folders in legacy_folders(out).items():
        try:
            if run_id == held_run:
                result.files += migrate_run(out, run_id, folders)
            else:
                with run_lock.held(run_dir_of(out, run_id), "imgscore layout migration"):
                    result.files += migrate_run(out, run_id, folders)
            result.runs.append(run_id)
        except RunLockedError as exc:
            result.held[run_id] = str(exc)
        except (OSError, OutputWriteError, UnsafePathError, pa.ArrowException, ValueError) as exc:
            result.held[run_id] = f"{type(exc).__name__}: {exc}"
            log.warning(
                "layout: run %s not moved to the current layout (%s); its files stay readable where they are",
                run_id,
                exc,
            )
    if result.runs:
        log.info(
            "layout: moved %d run(s), %d part file(s), into OUT/<table>/run_date=…/RUN_ID/",
            len(result.runs),
            result.files,
        )
    return result
