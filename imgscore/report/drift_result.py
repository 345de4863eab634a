"""The shape of a drift comparison (:func:`imgscore.report.drift.compare`): the run against its
baseline, part by part, as the report and the manifest keep it.

Shares, rates and probabilities are fractions in [0, 1].
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Baseline(_Part):
    runs: list[str]  # run ids, newest first
    images: int  # predictions pooled from them


class Current(_Part):
    images: int


class Thresholds(_Part):
    """The ``drift`` settings the run recorded (None: not checked)."""

    max_psi: float | None
    max_class_shift: float | None
    max_mean_confidence_drop: float | None
    max_low_confidence_increase: float | None
    max_error_rate_increase: float | None
    max_embedding_shift: float | None
    low_confidence: float
    min_images: int
    fail: bool


class ClassShift(_Part):
    class_name: str = Field(alias="class")
    share: float  # tonight
    baseline_share: float
    change: float  # share - baseline_share


class ClassShares(_Part):
    psi: float | None  # None when either side has no predictions
    shifts: list[ClassShift]  # the TOP_SHIFTS classes that moved most


class ConfidenceStats(_Part):
    """Top-1 probabilities: mean, quantiles, and the share below ``low_confidence`` (None: no images)."""

    mean: float | None
    p10: float | None
    p50: float | None
    p90: float | None
    low_share: float | None


class ConfidenceChange(_Part):
    current: ConfidenceStats
    baseline: ConfidenceStats
    mean_change: float | None
    low_share_change: float | None


class ErrorRate(_Part):
    current: float | None  # failed / scanned
    baseline: float | None  # pooled over the baseline runs
    change: float | None


class EmbeddingShift(_Part):
    cosine_distance: float  # between the mean embeddings, in [0, 2]
    dim: int
    images: int
    baseline_images: int


class Night(_Part):
    """One run's point on the "recent nights" plot."""

    run_id: str
    created_at: str | None
    images: int
    mean_confidence: float | None
    low_share: float | None
    error_rate: float | None
    class_shares: dict[str, float]


class _Against(_Part):
    baseline: Baseline
    current: Current
    thresholds: Thresholds
    warnings: list[str]  # one line per threshold crossed
    judged: bool  # enough images on both sides to warn


class NoBaseline(_Against):
    """No earlier complete run to compare with: ``baseline.runs`` empty, no warnings."""

    reason: str


class DriftComparison(_Against):
    """The run against its baseline (module docstring)."""

    classes: ClassShares
    confidence: ConfidenceChange
    error_rate: ErrorRate
    embedding: EmbeddingShift | None  # None without embeddings on both sides
    nights: list[Night]  # each baseline run and tonight, oldest first
