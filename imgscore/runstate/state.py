"""The writing and reading side of a run's state: the shard ledger, loading, and :class:`RunState`.

What the files are (``manifest.json``, ``ledger/NNNNNN.jsonl``, ``shards/SSSSS.json``) and the
typed records they hold are :mod:`imgscore.runstate.manifest`. Here: the ledger's segments
(:class:`ShardLedger`, one per writer process, appended as results arrive), reading a run back
(:func:`load_manifest`: the summary plus the segments it has not folded in), and
:class:`RunState`, held by the one process that holds the run's lock, which commits each result
in O(1) and rewrites the summary at most every ``COMPACT_EVERY_S`` seconds.

File I/O here never needs a rename to be atomic except the summary: a ledger segment is
appended, read back by lines and deleted whole, so an object store (no rename, no append) keeps
each segment as one object written when it is closed (:class:`imgscore.io.file_ops.AppendLog`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError
from upath import UPath

from imgscore.errors import OutputWriteError, RunStateError
from imgscore.io import file_ops, storage
from imgscore.io.containment import inside
from imgscore.io.parquet import write_bytes_atomic, writing
from imgscore.io.storage import AnyPath
from imgscore.runstate.manifest import (
    COMPACT_EVERY_S,
    LEDGER_DIR,
    MANIFEST,
    Manifest,
    RunEnding,
    RunStatus,
    ShardRecord,
    ShardResult,
    now_iso,
)

# ----------------------------------------------------------------------------------- ledger


def _segment_path(run_dir: AnyPath, n: int) -> UPath:
    return storage.path(run_dir, LEDGER_DIR, f"{n:06d}.jsonl")


def ledger_segments(run_dir: AnyPath, from_segment: int = 0) -> list[int]:
    """Numbers of the ledger segments of ``run_dir`` at or after ``from_segment``, ascending."""
    names = storage.list_names(storage.path(run_dir, LEDGER_DIR))
    return sorted(
        n for n in (int(x[:-6]) for x in names if x.endswith(".jsonl") and x[:-6].isdigit()) if n >= from_segment
    )


def read_segment(path: AnyPath) -> Iterator[ShardResult | RunEnding]:
    """The results in one ledger segment, in order, and a :class:`RunEnding` where the run's
    ending was recorded there. A last line without its newline (a writer killed mid-append) is
    skipped; so is a line that does not parse.

    Raises:
        FileNotFoundError: the segment is gone (compacted away meanwhile).
    """
    data = storage.read_bytes(path)
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn or empty
        try:
            yield ShardResult.model_validate_json(line)
        except ValueError:
            try:
                yield RunEnding.model_validate_json(line)
            except ValueError:
                continue


class ShardLedger:
    """The flow process's append handle on a run's ledger: one new segment per writer process.

    Each segment is an :class:`imgscore.io.file_ops.AppendLog`: on disk appended line by line; in
    an object store (no appends) its lines are kept in memory and written as one object when it is
    closed (:meth:`rotate`, at every compaction and at the end) — a writer killed before loses
    only those lines, and the next ``imgscore rerun`` adopts their shards from the commit records,
    which were written first.
    """

    def __init__(self, run_dir: AnyPath, segment: int):
        self.run_dir = storage.path(run_dir)
        self.segment = segment
        self._open: file_ops.AppendLog | None = None  # the segment being written, from its first line
        self._lock = threading.Lock()

    def append(self, result: ShardResult) -> None:
        """Append one result as a line; O(1). Flushed to the OS, not fsynced: a killed process
        loses nothing, and after a machine crash the commit records (fsynced) are adopted.

        Raises:
            OutputWriteError: the segment cannot be written (disk full, …); a torn last line is
                skipped by readers, and the commit record it repeats is adopted by a rerun.
        """
        line = (result.to_json() + "\n").encode()
        with self._lock:
            path = _segment_path(self.run_dir, self.segment)
            with writing(path):
                if self._open is None:
                    # a new segment, created new: a symlink planted at its name is removed, never appended through
                    self._open = file_ops.AppendLog(path)
                self._open.append(line)

    def rotate(self) -> int:
        """Close the current segment; later appends go to the next one. Returns the next
        segment's number: every segment before it is complete."""
        with self._lock:
            self._close()
            return self.segment

    def _close(self) -> None:
        if self._open is not None:
            if self._open.close():
                self.segment += 1
            self._open = None

    def prune(self, below: int) -> None:
        """Delete the segments numbered below ``below`` (folded into the summary)."""
        for n in ledger_segments(self.run_dir):
            if n < below:
                storage.delete(_segment_path(self.run_dir, n))

    def record(self, line: bytes) -> None:
        """Close the current segment and add ``line`` to the ledger durably (fsynced): appended in
        place to the newest segment (never through a link planted at its name), or — nothing to
        append to, or an object store, which cannot append — written as a segment of its own.

        Raises:
            OSError: neither could be written.
        """
        with self._lock:
            self._close()
            segments = ledger_segments(self.run_dir)
            if segments and file_ops.append(_segment_path(self.run_dir, segments[-1]), line):
                return
            storage.write_bytes(_segment_path(self.run_dir, self.segment), line)
            self.segment += 1

    def close(self) -> None:
        """Close the current segment (on an object store: write it).

        Raises:
            OSError: the segment object could not be written.
        """
        with self._lock:
            self._close()


# ---------------------------------------------------------------------------------- loading


def _read_summary(run_dir: AnyPath) -> Manifest:
    # not through a link out of the run folder: a parse error would quote the file it points at
    path = inside(run_dir, storage.path(run_dir, MANIFEST), "manifest.json")
    try:
        return Manifest.model_validate_json(storage.read_bytes(path))
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(x) for x in errors[0]["loc"]) if errors else ""
        why = f"{errors[0]['msg'] if errors else 'not a manifest'}{f' at {where}' if where else ''}"
        raise RunStateError(
            f"{storage.display(path)} is not a readable imgscore manifest ({why}); the run state was damaged — "
            "restore the file from a backup, or score the folder again with a new run"
        ) from None


def load_manifest(run_dir: AnyPath) -> Manifest:
    """The run's current state: ``manifest.json`` plus the ledger segments it has not folded in.

    Old manifests (no ledger, ``attempt`` instead of ``attempts``, missing fields) load too.
    A segment compacted away while this reads (a live run) makes it start over, at most 3 times.

    Raises:
        FileNotFoundError: no manifest.json in ``run_dir``.
        RunStateError: manifest.json is not a manifest (exit 2; also a ValueError).
        UnsafePathError: manifest.json or a ledger segment is a link out of ``run_dir``.
    """
    run_dir = storage.path(run_dir)
    for _ in range(3):
        m = _read_summary(run_dir)
        try:
            replayed = False
            for n in ledger_segments(run_dir, int(m.ledger.get("from_segment", 0))):
                for result in read_segment(inside(run_dir, _segment_path(run_dir, n), "ledger segment")):
                    if isinstance(result, RunEnding):
                        m.status, m.reason = result.ending, result.reason
                        replayed = True
                    elif 0 <= result.shard_id < len(m.shards):
                        m.apply(result)
                        replayed = True
        except FileNotFoundError:
            continue
        if replayed:
            m.ledger = {**m.ledger, "replayed": True}
        return m
    return _read_summary(run_dir)


def read_manifest(path: AnyPath) -> dict[str, Any]:
    """The run's current state as a dict shaped like ``manifest.json`` (summary + ledger), for
    readers that want plain data (``report``, tests). ``path`` is the manifest.json path."""
    return load_manifest(storage.parent_of(path)).to_dict()


class RunState:
    """The writing side of a run's state, held by the one process that holds the run's lock.

    ``commit(result)`` applies a shard result and appends it to the ledger — O(1) — and, at most
    every ``compact_every_s`` seconds, rewrites ``manifest.json`` (compaction). ``save()``
    compacts now (plan, status changes, end of run).
    """

    def __init__(self, run_dir: AnyPath, manifest: Manifest, compact_every_s: float = COMPACT_EVERY_S):
        self.run_dir = storage.path(run_dir)
        self.manifest = manifest
        self.compact_every_s = compact_every_s
        start = max(ledger_segments(self.run_dir, 0), default=int(manifest.ledger.get("from_segment", 0)) - 1) + 1
        self.ledger = ShardLedger(self.run_dir, start)
        self._last_compact = time.monotonic()
        self._dirty = False
        self._lock = threading.Lock()

    @classmethod
    def create(cls, run_dir: AnyPath, manifest: Manifest) -> RunState:
        """A new run's state: writes its first manifest.json."""
        state = cls(run_dir, manifest)
        state.save()
        return state

    @classmethod
    def open(cls, run_dir: AnyPath) -> RunState:
        """An existing run's state (summary + ledger), to write on (a retry or a rerun)."""
        return cls(run_dir, load_manifest(run_dir))

    def commit(self, result: ShardResult) -> ShardRecord:
        """Apply ``result`` (:meth:`Manifest.apply`), append it to the ledger, compact when due."""
        with self._lock:
            rec = self.manifest.apply(result)
            self.ledger.append(result)
            self._dirty = True
            if time.monotonic() - self._last_compact >= self.compact_every_s:
                self._compact()
            return rec

    def save(self) -> None:
        """Write manifest.json now (everything committed so far folded in)."""
        with self._lock:
            self._compact()

    def _compact(self) -> None:
        nxt = self.ledger.rotate()
        self.manifest.ledger = {"dir": LEDGER_DIR, "from_segment": nxt}
        self.manifest.updated_at = now_iso()
        write_bytes_atomic(self.manifest.model_dump_json(indent=2).encode(), storage.path(self.run_dir, MANIFEST))
        self.ledger.prune(nxt)
        self._last_compact = time.monotonic()
        self._dirty = False

    def record_ending(self, status: RunStatus, reason: str | None) -> bool:
        """When manifest.json cannot be rewritten (disk full): add the run's ending as one
        :class:`RunEnding` line to its ledger (:meth:`ShardLedger.record`), which readers replay
        after the results before it. A few hundred bytes appended to a file often fit in its last
        block where a new copy of the manifest does not. Returns whether it was written; never raises."""
        line = (RunEnding(ending=status, reason=reason, at=now_iso()).model_dump_json() + "\n").encode()
        with self._lock:
            try:
                self.ledger.record(line)
                return True
            except (OSError, OutputWriteError):
                return False

    def close(self) -> None:
        """Compact if anything is unsaved, and close the ledger. A compaction that fails here
        (the disk that already failed the run) loses nothing — the ledger holds every result —
        and does not replace the error that ended the run."""
        with self._lock:
            with contextlib.suppress(OutputWriteError):
                if self._dirty:
                    self._compact()
            self.ledger.close()
