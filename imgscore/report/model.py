"""The run report as one typed value: what a person reads after a run.

:func:`imgscore.report.build.build_report` makes a :class:`Report` once, from the run's manifest
and Parquet; three renderers read it: the terminal (:mod:`imgscore.report.terminal`),
``report.html`` (:mod:`imgscore.report.html`) and the Prefect artifacts
(:mod:`imgscore.report.markdown`). ``imgscore report --format json`` prints :func:`dumps`.

Pydantic models, not dataclasses: the report's JSON is a contract (``--format json``), and
``model_dump`` gives it from the field order with no hand-written ``to_dict``; the accuracy
(:class:`imgscore.report.evaluate.Confusion`) and drift parts (:mod:`imgscore.report.drift`) are
pydantic models too, like the manifest and the config they come from.

Units: times in seconds, throughput in images per second, scores probabilities in [0, 1],
shares and rates fractions in [0, 1].
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from imgscore.report.drift_result import DriftComparison, NoBaseline
from imgscore.report.evaluate import Confusion
from imgscore.runstate.manifest import ABANDONED

REPORT_FILE = "report.html"  # the HTML rendering, in the run's folder beside manifest.json

# A number copied from the manifest as it was recorded: 3 stays 3 and 3.0 stays 3.0 in the JSON.
Number = int | float


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputInfo(_Part):
    root: str | None
    layout: str | None
    classes: list[str] | None  # folder classes (ImageFolder); None for a flat folder
    formats: JsonValue  # input.formats as recorded: not trusted (imgscore.images.formats.recorded_formats)


class ModelInfo(_Part):
    name: str | None
    arch: str | None
    model_id: str | None
    source: str | None
    num_classes: int | None


class ModelTally(_Part):
    """One model of a several-model run, with its (image, model) pairs."""

    name: str | None
    arch: str | None
    model_id: str | None
    scored: int  # its predictions rows
    failed: int  # its errors rows


class Counts(_Part):
    """The manifest's counts ((image, model) pairs with several models)."""

    scanned: int
    scored: int
    failed: int
    skipped: int
    already_scored: int
    already_failed: int
    pending: int


class KnownBad(_Part):
    """Images carried by the failure ledger: failed before with the same bytes, not retried."""

    count: int
    file: str  # the Parquet file that lists them
    by_error_type: dict[str, int]
    by_run: dict[str, int]  # by the run that recorded the failure

    def line(self) -> str:
        """The one line every rendering shows."""
        kinds = ", ".join(f"{k} {v}" for k, v in list(self.by_error_type.items())[:3])
        return (
            f"{self.count} image(s) failed before with the same bytes and were not retried ({kinds}; "
            f"run.retry_failed=true retries them): {self.file}"
        )


class Rows(_Part):
    """What the Parquet holds for the run (the counts come from the manifest: a mismatch shows)."""

    predictions: int
    errors: int


class Timing(_Part):
    wall_s: Number | None
    images_per_s: Number | None
    pairs_per_s: Number | None  # (image, model) pairs; None in older manifests
    shard_seconds: Number | None
    scan_s: Number | None


class ClassCount(_Part):
    index: int  # model output index
    name: str
    predicted: int
    share: float  # of all predictions


class ClassesLeftOut(_Part):
    """The model classes the per-class table does not list (it lists at most MAX_CLASS_ROWS)."""

    count: int
    never_predicted: int

    def line(self) -> str:
        """``and N more classes …``, under the per-class table."""
        return (
            f"and {self.count} more classes, not listed: {self.never_predicted} of the model's classes "
            "were never predicted"
        )


class Histogram(_Part):
    edges: list[float]  # HIST_BINS + 1 bin edges over [0, 1]
    counts: list[int]


class ScoreStats(_Part):
    """Top-1 probability distribution; the numbers are None when nothing was scored."""

    count: int
    mean: float | None
    min: float | None
    max: float | None
    percentiles: dict[str, float | None]  # "p1" … "p99"
    histogram: Histogram


class ErrorGroup(_Part):
    stage: str
    error_type: str
    count: int
    examples: list[str]  # distinct image paths; none for whole-batch failures
    message: str  # the first message seen, cut to 300 characters


class ErrorSummary(_Part):
    total: int
    by_stage: dict[str, int]  # most frequent first
    groups: list[ErrorGroup]  # by (stage, error_type), most frequent first


class SkippedGroup(_Part):
    reason: str
    count: int
    examples: list[str | None]


class SkippedSummary(_Part):
    count: int
    by_reason: list[SkippedGroup]  # most frequent first
    examples: list[dict[str, str]]  # the manifest's first 10 entries: {image_path, reason}


class LowConfidence(_Part):
    """One of the least confident predictions."""

    image_path: str
    pred_label: str
    score: float
    label_name: str | None  # its folder class, if the folder has classes
    topk: list[tuple[int, float]]  # (model index, probability)


class NotCompared(_Part):
    """A comparison with recent nights that could not be made (an unreadable earlier run)."""

    error: str  # one line
    warnings: list[str] = Field(default_factory=list)


# The run against recent nights: compared, nothing to compare with, or not comparable.
Drift = DriftComparison | NoBaseline | NotCompared


class Report(_Part):
    """Everything the report shows, from ``runs/RUN_ID/manifest.json`` and the run's Parquet.

    Counts come from the manifest; ``rows`` are what the Parquet actually holds for the run, so a
    mismatch between the two is visible. ``accuracy`` is None for a flat (unlabelled) folder;
    when the folder's classes cannot be paired with the model's (names differ and counts differ)
    its ``accuracy`` is None, ``matched_by`` ``"none"`` and ``reason`` says why, and every
    renderer shows "n/a" with that reason. ``outputs["report"]`` is None when report.html was
    never written (an abandoned run).
    """

    run_id: str
    run_date: str | None
    status: str  # the manifest's, or "abandoned" for a running run whose writer is gone
    reason: str | None  # why a run ended failed, interrupted, crashed or abandoned
    rerun: str | None  # the command that finishes a run that did not complete
    writer: str | None  # the live process writing the run, if any
    created_at: str | None
    updated_at: str | None
    generated_at: str
    input: InputInfo
    model: ModelInfo  # the model the per-image sections describe
    models: list[ModelTally]  # several models: each one; [] for one model
    counts: Counts
    known_bad: KnownBad | None
    error_rate: float  # failed / (image, model) pairs
    rows: Rows
    timing: Timing
    devices: list[str]
    workers: list[str]
    shards: dict[str, int]  # "total" and the number in each state
    classes: list[ClassCount]
    classes_left_out: ClassesLeftOut | None
    scores: ScoreStats
    accuracy: Confusion | None  # None for a flat (unlabelled) folder
    errors: ErrorSummary
    skipped: SkippedSummary
    lowest_confidence: list[LowConfidence]
    drift: Drift | None  # None when drift.enabled is off
    outputs: dict[str, str | None]  # the manifest's outputs, plus "manifest" and "report" (None: not written)

    def to_dict(self) -> dict[str, Any]:
        """The report as the JSON object ``imgscore report --format json`` prints."""
        return self.model_dump(mode="json", by_alias=True)

    def ending_lines(self) -> list[str]:
        """Why the run did not complete and how to finish it: ``reason`` and the ``imgscore rerun``
        command, for every status but ``complete`` (empty then); for a run a live process is still
        writing (``writer``), that it is still running and by whom, and no rerun command."""
        lines = []
        if self.writer:  # nothing to finish yet: the run is being written now
            lines.append(
                f"still running: {self.writer}; this report shows the shards committed so far, "
                f"run `imgscore report {self.run_id}` again once it ends"
            )
        if self.reason:
            lines.append(f"{self.status}: {self.reason}")
        if self.rerun and self.status in ("interrupted", "crashed", ABANDONED, "running", "failed", "partial"):
            lines.append(f"finish it with `{self.rerun}`")
        return lines


def dumps(report: Report) -> str:
    """The report as indented JSON (NaN-free: missing numbers are null)."""
    return json.dumps(report.to_dict(), indent=2, default=str, allow_nan=False)
