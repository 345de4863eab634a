"""A run's state as data: the typed manifest, shard results and records, commit records, the stop mark.

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
  (*compaction*), never once per shard. Readers (:func:`imgscore.runstate.state.load_manifest`)
  read it plus the ledger segments from ``from_segment`` on.

Every shard result — scored, failed after its retries, rescored, adopted from its commit record,
replayed from the ledger — changes the manifest through :meth:`Manifest.apply` and nothing else.
The ledger, loading and the writer of a run's state (``RunState``) are :mod:`imgscore.runstate.state`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from upath import UPath

from imgscore.io import storage
from imgscore.io.containment import UnsafePathError, inside
from imgscore.io.parquet import write_json_atomic
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
    model_key: str = (
        ""  # sha256 of model_id + resolved preprocessing + decode settings (imgscore.runstate.incremental.model_key)
    )
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
    split_predicted: dict[str, float] = Field(
        default_factory=dict
    )  # num_workers auto: img/s per "workers x threads" ("wxL": w lanes)
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
    full): :meth:`imgscore.runstate.state.RunState.record_ending`. Readers replay it after the
    shard results before it."""

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
            shard_id=self.shard_id,
            state=self.state,
            images=self.images,
            scored=self.scored,
            failed=self.failed,
            failed_images=self.failed_images,
            fingerprint=self.fingerprint,
            seconds=self.seconds,
            device=self.device,
            worker=self.worker,
            attempt=attempt,
            files=self.files,
            warnings=self.warnings,
            reason=reason,
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
    back. Load with :func:`imgscore.runstate.state.load_manifest` (summary + ledger), never by reading the file alone.
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
    model: dict[str, Any] = Field(
        default_factory=dict
    )  # LoadedModel.info() + decode (input.* decode settings) + model_key (+ name); with several models, the first
    models: list[dict[str, Any]] = Field(
        default_factory=list
    )  # every model scored: name + LoadedModel.info() + decode + model_key ([] before)
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved config
    incremental: dict[str, Any] = Field(default_factory=lambda: {"skip_scored": False})
    index: dict[str, Any] = Field(default_factory=dict)  # imgscore.runstate.index.IndexWriter.info()
    shards: list[ShardRecord] = Field(default_factory=list)
    outputs: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, Any] = Field(default_factory=dict)
    reruns: list[dict[str, Any]] = Field(default_factory=list)
    # backend, precision, canary (imgscore.inference.backends.canary.start_inference)
    inference: dict[str, Any] = Field(default_factory=dict)
    drift: dict[str, Any] = Field(
        default_factory=dict
    )  # against recent nights: baseline_runs, psi, warnings (imgscore.report.drift)
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


def observed_status(status: str, run_dir: AnyPath) -> str:
    """The status a reader reports: ``abandoned`` for a ``running`` (or ``planned``) run whose
    lock owner is gone (kill -9, OOM, reboot: nothing could write the ending), else ``status``."""
    if status in ("running", "planned") and not run_lock.is_locked(run_dir):
        return ABANDONED
    return status


def now_iso() -> str:
    """Now, in UTC, as ISO 8601 (``2026-03-01T02:00:00.123456+00:00``)."""
    return datetime.now(UTC).isoformat()


def request_stop(run_dir: AnyPath) -> None:
    """Mark the run as stopping (SIGINT or SIGTERM reached its flow): from now on no shard of it
    starts, and none commits (:func:`stop_requested`; ``imgscore.inference.commit``). A file (an
    object on a store), so shards on Dask workers in other processes see it too;
    :func:`clear_stop` removes it when the run is taken up again (a retry or ``imgscore rerun``)."""
    storage.path(
        run_dir, STOP_FILE
    ).touch()  # on disk no data block (works on the disk that just filled up); an object: one empty PUT


def stop_requested(run_dir: AnyPath) -> bool:
    """True while the run's stop mark exists (:func:`request_stop`): one ``stat`` (a HEAD request
    on an object store)."""
    return storage.exists(storage.path(run_dir, STOP_FILE))


def stop_check(run_dir: AnyPath, every_s: float = 1.0) -> Callable[[], bool]:
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
        return ShardResult.model_validate_json(
            storage.read_bytes(inside(run_dir, commit_record_path(run_dir, shard_id), "commit record"))
        )
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
