"""A run's state: the typed manifest, the shard ledger, and the one place a shard result lands.

Files of a run, under ``OUT/runs/RUN_ID/`` (docs/architecture.md draws them):

- ``shards/SSSSS.json``: a shard's **commit record**, written by the task run that scored it,
  after its two part files. Commit records are the truth: a shard is done when its record exists
  and its part files match it (``imgscore.runstate.commits.check_shard``).
- ``ledger/NNNNNN.jsonl``: the **shard ledger**, one :class:`ShardResult` per line, appended by
  the flow process as results arrive (O(1) per shard, whatever the number of shards). Each
  writer process starts its own segment, so a line torn by a killed writer is only ever the last
  line of its segment (readers skip it).
- ``manifest.json``: the **summary** (:class:`Manifest`): run facts, counts and every shard's
  record, as of the ledger segment it names in ``ledger.from_segment``. It is derived: the flow
  rewrites it at most every :data:`COMPACT_EVERY_S` seconds and at the end of the run
  (*compaction*), never once per shard. Readers (:func:`load_manifest`) read it plus the ledger
  segments from ``from_segment`` on.

Every shard result — scored, failed after its retries, rescored, adopted from its commit record,
replayed from the ledger — changes the manifest through :meth:`Manifest.apply` and nothing else.

File I/O here never needs a rename to be atomic except the summary (``write_json_atomic``): a
ledger segment is appended, read back by lines and deleted whole, so an object store (no rename,
no append) can keep each segment as one object written when it is closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from upath import UPath

from imgscore.errors import OutputWriteError, RunStateError
from imgscore.io import storage
from imgscore.io.containment import UnsafePathError, create_new, inside
from imgscore.io.parquet import write_bytes_atomic, write_json_atomic, writing
from imgscore.io.storage import AnyPath
from imgscore.runstate import lock as run_lock

# The one place run and shard statuses are named. A run is ``running`` while its writer holds the
# lock; it ends ``complete``, ``partial`` (some images failed, within the error budget), ``failed``
# (over the budget, or a shard could not run), ``interrupted`` (SIGINT/SIGTERM, written on the way
# out) or ``crashed`` (an unexpected error, its one-line ``reason`` recorded). ``abandoned`` is never
# written: it is what readers report for a ``running`` run whose lock owner is gone (kill -9, OOM,
# reboot) — :func:`observed_status`.
RunStatus = Literal["planned", "running", "complete", "partial", "failed", "interrupted", "crashed"]
ShardState = Literal["pending", "running", "complete", "partial", "failed"]
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
ENDED_ABNORMALLY: tuple[str, ...] = ("interrupted", "crashed")
ABANDONED = "abandoned"
SHARD_STATES: tuple[str, ...] = get_args(ShardState)
FINISHED: tuple[str, ...] = ("complete", "partial", "failed")  # shard states that end an attempt

MANIFEST = "manifest.json"
LEDGER_DIR = "ledger"
COMMITS_DIR = "shards"
STOP_FILE = ".stopping"  # the run was interrupted: no shard starts or commits (request_stop)
COMPACT_EVERY_S = 5.0  # the summary is rewritten at most this often while shards finish


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


def models_id(model_ids: list[str]) -> str:
    """What a shard's ``model_id`` is: the one model's ``model_id``; with several models their
    ids joined with ``+`` in the config's order (a commit record of another set is not this shard's)."""
    return "+".join(model_ids)


class ShardRef(BaseModel):
    """What a ``score_shard`` task run is given: where the run lives and which rows are its own.

    ``index_file`` (relative to ``run_dir``) and ``row_group`` locate the shard's rows in the
    run's index (``imgscore.runstate.index``), so a task run reads one small footer, not a footer
    of every shard of the run.
    """

    run_id: str
    run_date: str  # YYYY-MM-DD (UTC), the hive partition
    run_dir: str  # OUT/runs/RUN: holds the index, shards/ and ledger/
    input_root: str
    shard_id: int
    start: int  # first row of the run's image list (inclusive)
    stop: int  # last row (exclusive)
    fingerprint: str  # sha256 of the shard's (path, size, mtime) rows
    model_key: str = ""  # sha256 of model_id + resolved preprocessing + decode settings (imgscore.runstate.incremental.model_key)
    model_id: str = ""  # the run's model (a commit record of another model is not this shard's)
    index_file: str = "index.parquet"
    row_group: int = -1  # -1: the shard id (runs planned before the index was split into files)


class ShardResult(_Model):
    """What one attempt at a shard produced: the task's return value, the commit record
    ``shards/SSSSS.json`` and one ledger line. ``attempt`` is this attempt's number."""

    shard_id: int
    state: ShardState
    images: int = 0
    scored: int = 0  # rows in the shard's predictions part
    failed: int = 0  # rows in the shard's errors part
    failed_images: list[str] = Field(default_factory=list)
    fingerprint: str | None = None
    model_id: str | None = None
    seconds: float | None = None
    device: str | None = None
    worker: str | None = None
    threads: int | None = None
    loader_workers: int | None = None  # DataLoader processes actually used (0: decoded in-process)
    batch_size: int | None = None  # images per forward (inference.batch_size, or what `auto` chose)
    split_predicted: dict[str, float] = Field(default_factory=dict)  # num_workers auto: img/s per "workers x threads" ("wxL": w lanes)
    lanes: bool | None = None  # True: the forward ran inside the DataLoader processes (num_workers auto's lanes)
    setup_s: float | None = None  # device, model, backend and split before the first batch (a warm worker skips most)
    backend: str | None = None  # torch | onnxruntime | openvino: what scored (auto resolves per worker)
    precision: str | None = None  # what the backend reports it ran (fp32, bf16, fp16)
    attempt: int = 1
    files: list[str] = Field(default_factory=list)
    warnings: dict[str, int] = Field(default_factory=dict)  # Pillow warning → count
    oom_events: int = 0
    rescored: int | None = None  # a rerun: images scored in this attempt
    reason: str | None = None  # why the shard failed, or why a rerun could not rescore it
    finished_at: str | None = None  # ISO 8601, UTC

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


class RunEnding(_Model):
    """A ledger line that ends the run when manifest.json could not be rewritten (the disk is
    full): :meth:`RunState.record_ending`. Readers replay it after the shard results before it."""

    ending: RunStatus
    reason: str | None = None
    at: str


class ShardRecord(_Model):
    """A shard's entry in the manifest: its rows of the image list and its latest state.

    ``attempts`` counts attempts so far (manifests of older versions wrote it; commit records
    and task results say ``attempt``, which old manifests also accept here).
    """

    shard_id: int
    start: int = 0
    stop: int = 0
    images: int = 0
    pairs: int = 0  # (image, model) pairs to score: images × models, less those run.skip_scored found done; 0: images
    fingerprint: str | None = None
    state: ShardState = "pending"
    attempts: int = Field(0, validation_alias=AliasChoices("attempts", "attempt"))
    scored: int = 0
    failed: int = 0
    failed_images: list[str] = Field(default_factory=list)
    files: list[str] = Field(default_factory=list)
    device: str | None = None
    worker: str | None = None
    backend: str | None = None
    precision: str | None = None
    seconds: float | None = None
    warnings: dict[str, int] = Field(default_factory=dict)
    reason: str | None = None

    def unchanged(self, attempt: int, reason: str) -> ShardResult:
        """A result that keeps this record's rows and state but records another attempt and why
        it could not change anything (a rerun of failed images that could not run)."""
        return ShardResult(
            shard_id=self.shard_id, state=self.state, images=self.images, scored=self.scored, failed=self.failed,
            failed_images=self.failed_images, fingerprint=self.fingerprint, seconds=self.seconds, device=self.device,
            worker=self.worker, attempt=attempt, files=self.files, warnings=self.warnings, reason=reason,
        )


class Counts(_Model):
    """Counts of a run. ``scanned`` counts images in its shards; ``scored``, ``failed``,
    ``pending``, ``already_scored`` and ``already_failed`` count (image, model) pairs — with one
    model, images — and ``pairs`` = scored + failed + pending (0 in manifests written before
    several models: ``scanned``)."""

    scanned: int = 0
    pairs: int = 0
    scored: int = 0
    failed: int = 0
    skipped: int = 0  # files the scan listed but could not score (unsupported formats, …)
    already_scored: int = 0  # left out by run.skip_scored
    already_failed: int = 0  # left out by the failure ledger: failed before with the same bytes
    pending: int = 0


def _contribution(rec: ShardRecord) -> tuple[int, int, int]:
    """(scored, failed, pending) (image, model) pairs that ``rec`` adds to the run's counts."""
    pairs = rec.pairs or rec.images
    if rec.state == "failed":
        return rec.scored, max(pairs, rec.failed), 0
    if rec.state in ("complete", "partial"):
        return rec.scored, rec.failed, 0
    return rec.scored, 0, pairs


class Manifest(_Model):
    """``manifest.json``: what a run is, and every shard's latest record.

    Unknown keys (from a newer version, or added by hand) are kept when the manifest is written
    back. Load with :func:`load_manifest` (summary + ledger), never by reading the file alone.
    """

    format_version: int = 2
    run_id: str
    run_date: str | None = None
    flow_run_id: str | None = None
    status: RunStatus = "running"
    reason: str | None = None  # interrupted / crashed: why, in one line
    created_at: str | None = None
    updated_at: str | None = None
    input: dict[str, Any] = Field(default_factory=dict)  # root, layout, classes
    counts: Counts = Field(default_factory=Counts)
    skipped: list[dict[str, str]] = Field(default_factory=list)  # {image_path, reason}
    model: dict[str, Any] = Field(default_factory=dict)  # LoadedModel.info() + decode (input.* decode settings) + model_key (+ name); with several models, the first
    models: list[dict[str, Any]] = Field(default_factory=list)  # every model scored: name + LoadedModel.info() + decode + model_key ([] before)
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved config
    incremental: dict[str, Any] = Field(default_factory=lambda: {"skip_scored": False})
    index: dict[str, Any] = Field(default_factory=dict)  # imgscore.runstate.index.IndexWriter.info()
    shards: list[ShardRecord] = Field(default_factory=list)
    outputs: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, Any] = Field(default_factory=dict)
    reruns: list[dict[str, Any]] = Field(default_factory=list)
    # backend, precision, canary (imgscore.inference.backends.canary.start_inference)
    inference: dict[str, Any] = Field(default_factory=dict)
    drift: dict[str, Any] = Field(default_factory=dict)  # against recent nights: baseline_runs, psi, warnings (imgscore.report.drift)
    ledger: dict[str, Any] = Field(default_factory=lambda: {"dir": LEDGER_DIR, "from_segment": 0})

    def apply(self, result: ShardResult) -> ShardRecord:
        """Fold one shard result into its record and the counts — the only way a result lands.

        The record takes the result's state, counts, files and facts; ``attempts`` becomes the
        larger of the two (replaying an older result never lowers it). Counts change by the
        difference the record makes, so applying is O(1) in the number of shards.
        """
        rec = self.shards[result.shard_id]
        old = _contribution(rec)
        rec.state = result.state
        rec.attempts = max(rec.attempts, result.attempt)
        rec.scored, rec.failed = result.scored, result.failed
        rec.failed_images = list(result.failed_images)
        rec.files = list(result.files)
        rec.device, rec.worker, rec.seconds = result.device, result.worker, result.seconds
        rec.backend, rec.precision = result.backend, result.precision
        rec.warnings = dict(result.warnings)
        rec.reason = result.reason
        new = _contribution(rec)
        c = self.counts
        c.scored += new[0] - old[0]
        c.failed += new[1] - old[1]
        c.pending += new[2] - old[2]
        return rec

    def recount(self) -> Manifest:
        """Recompute scored/failed/pending from every shard record (O(shards): at load and finish)."""
        scored = failed = pending = 0
        for rec in self.shards:
            s, f, p = _contribution(rec)
            scored, failed, pending = scored + s, failed + f, pending + p
        self.counts.scored, self.counts.failed, self.counts.pending = scored, failed, pending
        return self

    @property
    def scored_models(self) -> list[dict[str, Any]]:
        """The run's models (``models``; a manifest written before several models: ``[model]``)."""
        return self.models or ([self.model] if self.model else [])

    @property
    def total_pairs(self) -> int:
        """(image, model) pairs the run's shards hold (fixed at planning): the error budget's denominator."""
        return self.counts.pairs or self.counts.scanned

    @property
    def total_images(self) -> int:
        """Images in the run's shards (fixed at planning)."""
        return self.counts.scanned

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, shaped as manifest.json."""
        return self.model_dump(mode="json")

    def to_progress(self) -> dict[str, Any]:
        """``{run_id, counts}``: what progress reporters need, without the shards (O(1))."""
        return {"run_id": self.run_id, "counts": self.counts.model_dump()}


# ----------------------------------------------------------------------------------- ledger


def _segment_path(run_dir: AnyPath, n: int) -> UPath:
    return storage.path(run_dir, LEDGER_DIR, f"{n:06d}.jsonl")


def ledger_segments(run_dir: AnyPath, from_segment: int = 0) -> list[int]:
    """Numbers of the ledger segments of ``run_dir`` at or after ``from_segment``, ascending."""
    names = storage.list_names(storage.path(run_dir, LEDGER_DIR))
    return sorted(n for n in (int(x[:-6]) for x in names if x.endswith(".jsonl") and x[:-6].isdigit()) if n >= from_segment)


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

    In an object store (no appends) the current segment's lines are kept in memory and the
    segment is written as one object when it is closed (:meth:`rotate`, at every compaction and
    at the end); a writer killed before loses only those lines, and the next ``imgscore rerun``
    adopts their shards from the commit records, which were written first.
    """

    def __init__(self, run_dir: AnyPath, segment: int):
        self.run_dir = storage.path(run_dir)
        self.remote = storage.is_remote(run_dir)
        self.segment = segment
        self._file = None
        self._lines: list[bytes] = []  # object stores: the open segment's lines
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
            if self.remote:
                self._lines.append(line)
                return
            with writing(_segment_path(self.run_dir, self.segment)):
                if self._file is None:
                    path = _segment_path(self.run_dir, self.segment)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # a new segment, created new: a symlink planted at its name is removed, never appended through
                    self._file = os.fdopen(create_new(path), "wb", buffering=0)
                self._file.write(line)

    def rotate(self) -> int:
        """Close the current segment; later appends go to the next one. Returns the next
        segment's number: every segment before it is complete."""
        with self._lock:
            if self._lines:
                storage.write_bytes(_segment_path(self.run_dir, self.segment), b"".join(self._lines))
                self._lines = []
                self.segment += 1
            if self._file is not None:
                self._file.close()
                self._file = None
                self.segment += 1
            return self.segment

    def prune(self, below: int) -> None:
        """Delete the segments numbered below ``below`` (folded into the summary)."""
        for n in ledger_segments(self.run_dir):
            if n < below:
                storage.delete(_segment_path(self.run_dir, n))

    def close(self) -> None:
        if self._lines:
            self.rotate()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# ---------------------------------------------------------------------------------- loading


def _read_summary(run_dir: AnyPath) -> Manifest:
    # not through a link out of the run folder: a parse error would quote the file it points at
    path = inside(run_dir, storage.path(run_dir, MANIFEST), "manifest.json")
    try:
        return Manifest.model_validate_json(storage.read_bytes(path))
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        why = f"{first.get('msg', 'not a manifest')}{f' at {where}' if where else ''}"
        raise RunStateError(f"{storage.display(path)} is not a readable imgscore manifest ({why}); the run state was damaged — "
                            "restore the file from a backup, or score the folder again with a new run") from None


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


def observed_status(status: str, run_dir: AnyPath) -> str:
    """The status a reader reports: ``abandoned`` for a ``running`` (or ``planned``) run whose
    lock owner is gone (kill -9, OOM, reboot: nothing could write the ending), else ``status``."""
    if status in ("running", "planned") and not run_lock.is_locked(run_dir):
        return ABANDONED
    return status


def read_manifest(path: AnyPath) -> dict:
    """The run's current state as a dict shaped like ``manifest.json`` (summary + ledger), for
    readers that want plain data (``report``, tests). ``path`` is the manifest.json path."""
    return load_manifest(storage.parent_of(path)).to_dict()


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


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

    def record_ending(self, status: str, reason: str | None) -> bool:
        """When manifest.json cannot be rewritten (disk full): append the run's ending as one
        :class:`RunEnding` line to its newest ledger segment, which readers replay after the
        results before it. A few hundred bytes appended to a file often fit in its last block
        where a new copy of the manifest does not. Returns whether it was written; never raises."""
        line = (RunEnding(ending=status, reason=reason, at=now_iso()).model_dump_json() + "\n").encode()
        with self._lock:
            try:
                self.ledger.close()
                if self.ledger.remote:  # an object store cannot append: the line is a segment of its own
                    storage.write_bytes(_segment_path(self.run_dir, self.ledger.segment), line)
                    self.ledger.segment += 1
                    return True
                segments = ledger_segments(self.run_dir)
                if segments:  # appended in place, never through a link planted at its name
                    fd = os.open(_segment_path(self.run_dir, segments[-1]), os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
                else:
                    path = _segment_path(self.run_dir, self.ledger.segment)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fd = create_new(path)
                with os.fdopen(fd, "wb") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
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


def request_stop(run_dir: AnyPath) -> None:
    """Mark the run as stopping (SIGINT or SIGTERM reached its flow): from now on no shard of it
    starts, and none commits (:func:`stop_requested`; ``imgscore.inference.commit``). A file (an
    object on a store), so shards on Dask workers in other processes see it too;
    :func:`clear_stop` removes it when the run is taken up again (a retry or ``imgscore rerun``)."""
    storage.path(run_dir, STOP_FILE).touch()  # on disk no data block (works on the disk that just filled up); an object: one empty PUT


def stop_requested(run_dir: AnyPath) -> bool:
    """True while the run's stop mark exists (:func:`request_stop`): one ``stat`` (a HEAD request
    on an object store)."""
    return storage.exists(storage.path(run_dir, STOP_FILE))


def stop_check(run_dir: AnyPath, every_s: float = 1.0):
    """A callable for a shard's batch loop: :func:`stop_requested`, asked at most every
    ``every_s`` seconds (on an object store each ask is a request); once True, always True."""
    last, stopped = [float("-inf")], [False]

    def check() -> bool:
        now = time.monotonic()
        if not stopped[0] and now - last[0] >= every_s:
            last[0], stopped[0] = now, stop_requested(run_dir)
        return stopped[0]

    return check


def clear_stop(run_dir: AnyPath) -> None:
    """Remove the run's stop mark, if any (the run is being resumed or rerun)."""
    storage.delete(storage.path(run_dir, STOP_FILE))


def commit_record_path(run_dir: AnyPath, shard_id: int) -> UPath:
    """``run_dir/shards/SSSSS.json``: the shard's commit record."""
    return storage.path(run_dir, COMMITS_DIR, f"{shard_id:05d}.json")


def read_commit_record(run_dir: AnyPath, shard_id: int) -> ShardResult | None:
    """The shard's commit record, or None when there is none, it does not parse, or it is a link
    out of ``run_dir``. Parsed as JSON into :class:`ShardResult` (nothing else is constructed)."""
    try:
        return ShardResult.model_validate_json(storage.read_bytes(inside(run_dir, commit_record_path(run_dir, shard_id), "commit record")))
    except (OSError, ValueError, UnsafePathError):
        return None


def write_commit_record(run_dir: AnyPath, result: ShardResult) -> UPath:
    """Write the shard's commit record (after its part files: this is what makes it done),
    replacing one that is there (``imgscore rerun``, which holds the run's lock)."""
    return write_json_atomic(json.loads(result.to_json()), commit_record_path(run_dir, result.shard_id))


def create_commit_record(run_dir: AnyPath, result: ShardResult) -> bool:
    """Write the shard's commit record only if the shard has none yet — an exclusive create (a
    PUT with ``If-None-Match: *`` in an object store, ``O_EXCL`` + link on disk), so of two
    writers of one shard (a Dask task run again after its worker was lost, a retry racing a
    slow attempt) exactly one commits. Returns whether this call created it; the loser reads the
    winner's record (:func:`read_commit_record`)."""
    data = json.dumps(json.loads(result.to_json()), indent=2).encode()
    return storage.create_new(inside(run_dir, commit_record_path(run_dir, result.shard_id), "commit record"), data)
