"""The listings planning writes beside a run's index as the scan streams through the incremental
filter (:mod:`imgscore.runstate.already_scored`): the content hashes (sha256 mode) and the images
the failure ledger carries, with the carried counts the manifest keeps.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from upath import UPath

from imgscore.io import file_ops, storage
from imgscore.runstate.already_scored import SkipFilter
from imgscore.runstate.incremental import CARRIED_FILE, CARRIED_SCHEMA, HASHES_FILE, HASHES_SCHEMA


class Listings:
    """The files planning writes beside the run's index as the scan streams through the filter:
    ``content_hashes.parquet`` (sha256 mode) and ``already_failed.parquet`` (images carried by the
    failure ledger), each put in place whole at the end (:class:`imgscore.io.file_ops.AtomicWrite`);
    and what was carried, counted per error type and per run that recorded the failure (for the
    manifest)."""

    def __init__(self, run_dir: UPath, skip: SkipFilter | None, skip_key: str):
        self.run_dir, self.skip = run_dir, skip
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.files: dict[str, file_ops.AtomicWrite] = {}
        self.schemas: dict[str, pa.Schema] = {}
        if skip is not None:
            if skip_key == "sha256":
                self.schemas[HASHES_FILE] = HASHES_SCHEMA
            self.schemas[CARRIED_FILE] = CARRIED_SCHEMA
        self.by_type: dict[str, int] = {}
        self.by_run: dict[str, int] = {}

    def _open(self, name: str) -> None:
        # created new: a symlink planted at the temp name is not written through
        f = file_ops.AtomicWrite(storage.path(self.run_dir, name))
        self.files[name] = f
        self.writers[name] = pq.ParquetWriter(f.file, self.schemas[name], compression="zstd")

    def _put(self, name: str, table: pa.Table) -> None:
        if name not in self.schemas or table.num_rows == 0:
            return
        if name not in self.writers:
            self._open(name)
        self.writers[name].write_table(table)

    def write(self) -> None:
        """Take what the filter produced since the last call and append it."""
        if self.skip is None:
            return
        if HASHES_FILE in self.schemas:
            self._put(HASHES_FILE, self.skip.take_hashes())
        carried = self.skip.take_carried()
        for col, counts in (("error_type", self.by_type), ("failed_run_id", self.by_run)):
            for row in pc.value_counts(carried[col]).to_pylist() if carried.num_rows else []:
                counts[row["values"]] = counts.get(row["values"], 0) + row["counts"]
        self._put(CARRIED_FILE, carried)

    @property
    def carried_summary(self) -> dict[str, Any]:
        """``{by_error_type: {type: n}, by_run: {run_id: n}}`` of the images carried so far (the manifest's)."""
        return {
            "by_error_type": dict(sorted(self.by_type.items(), key=lambda kv: -kv[1])),
            "by_run": dict(sorted(self.by_run.items(), reverse=True)),
        }

    def close(self) -> None:
        """Put every listing in place (the hashes file even when empty, in sha256 mode).

        Raises:
            OSError: a file could not be written or renamed (its temp file is removed).
        """
        if HASHES_FILE in self.schemas and HASHES_FILE not in self.writers:  # sha256 mode: written even when empty
            self._open(HASHES_FILE)
        for name, w in self.writers.items():
            w.close()
            self.files[name].commit()
        self.writers, self.files = {}, {}

    def abort(self) -> None:
        """Drop every listing written so far (planning failed): nothing of them stays."""
        for name, w in self.writers.items():
            try:
                w.close()
            finally:
                self.files[name].abort()
        self.writers, self.files = {}, {}
