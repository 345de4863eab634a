"""The report's numbers from a run's rows: the score distribution, predictions per class, errors
and skipped files grouped, and the least confident predictions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from imgscore.report.model import (
    ClassCount,
    ClassesLeftOut,
    ErrorGroup,
    ErrorSummary,
    Histogram,
    LowConfidence,
    ScoreStats,
    SkippedGroup,
    SkippedSummary,
)

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
HIST_BINS = 20  # confidence histogram: equal bins over [0, 1]
MAX_CLASS_ROWS = 40  # classes listed/plotted: all when fewer, else the most predicted
LOWEST_N = 24  # thumbnails of the least confident predictions
EXAMPLES_PER_ERROR = 3


def score_stats(scores: np.ndarray) -> ScoreStats:
    """Top-1 probability distribution: count, mean, min, max, percentiles and a histogram.

    ``scores`` are probabilities in [0, 1] (float32 [N]). Percentiles use numpy's default
    (linear) interpolation; the histogram has :data:`HIST_BINS` equal bins over [0, 1], the last
    one closed. All values are None (counts empty) when N is 0.
    """
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    shown_edges = [round(float(e), 4) for e in edges]
    if scores.size == 0:
        return ScoreStats(
            count=0,
            mean=None,
            min=None,
            max=None,
            percentiles={f"p{q}": None for q in PERCENTILES},
            histogram=Histogram(edges=shown_edges, counts=[0] * HIST_BINS),
        )
    s = scores.astype(np.float64)
    counts, _ = np.histogram(np.clip(s, 0.0, 1.0), bins=edges)
    pct = np.percentile(s, PERCENTILES)
    return ScoreStats(
        count=int(s.size),
        mean=round(float(s.mean()), 6),
        min=round(float(s.min()), 6),
        max=round(float(s.max()), 6),
        percentiles={f"p{q}": round(float(v), 6) for q, v in zip(PERCENTILES, pct, strict=True)},
        histogram=Histogram(edges=shown_edges, counts=[int(c) for c in counts]),
    )


def class_counts(pred_index: np.ndarray, model_classes: list[str]) -> list[ClassCount]:
    """Predictions per model class, in class-index order.

    ``pred_index``: int [N]. Every class is listed when the model has at most
    :data:`MAX_CLASS_ROWS` classes; otherwise only the :data:`MAX_CLASS_ROWS` most predicted
    ones, and never one that nothing was predicted as (:func:`classes_left_out` says how many
    are not listed). ``share`` is a fraction of all predictions in [0, 1].
    """
    n = int(pred_index.size)
    counts = (
        np.bincount(pred_index, minlength=len(model_classes)) if n else np.zeros(len(model_classes), dtype=np.int64)
    )
    idx = list(range(len(counts)))
    if len(idx) > MAX_CLASS_ROWS:
        idx = sorted(sorted((i for i in idx if counts[i]), key=lambda i: (-counts[i], i))[:MAX_CLASS_ROWS])
    return [
        ClassCount(
            index=i,
            name=model_classes[i] if i < len(model_classes) else str(i),
            predicted=int(counts[i]),
            share=round(float(counts[i]) / n, 6) if n else 0.0,
        )
        for i in idx
    ]


def classes_left_out(
    classes: list[ClassCount], pred_index: np.ndarray, model_classes: list[str]
) -> ClassesLeftOut | None:
    """The model classes :func:`class_counts` did not list, or None when every class is listed."""
    left = len(model_classes) - len(classes)
    if left <= 0:
        return None
    predicted = int(np.unique(pred_index).size) if pred_index.size else 0
    return ClassesLeftOut(count=left, never_predicted=len(model_classes) - predicted)


def error_summary(errors: pa.Table, examples: int = EXAMPLES_PER_ERROR) -> ErrorSummary:
    """Errors rows (image_path, stage, error_type, message) grouped by (stage, error_type), most
    frequent first; each group with up to ``examples`` distinct image paths (whole-batch failures
    have none) and the first message seen, cut to 300 characters."""
    rows = errors.select(["image_path", "stage", "error_type", "message"]).to_pylist()
    groups: dict[tuple[str, str], ErrorGroup] = {}
    by_stage: dict[str, int] = {}
    for r in sorted(rows, key=lambda r: (r["stage"], r["error_type"], r["image_path"] or "")):
        by_stage[r["stage"]] = by_stage.get(r["stage"], 0) + 1
        g = groups.setdefault(
            (r["stage"], r["error_type"]),
            ErrorGroup(
                stage=r["stage"], error_type=r["error_type"], count=0, examples=[], message=(r["message"] or "")[:300]
            ),
        )
        g.count += 1
        if r["image_path"] is not None and len(g.examples) < examples and r["image_path"] not in g.examples:
            g.examples.append(r["image_path"])
    return ErrorSummary(
        total=len(rows),
        by_stage=dict(sorted(by_stage.items(), key=lambda kv: -kv[1])),
        groups=sorted(groups.values(), key=lambda g: (-g.count, g.stage, g.error_type)),
    )


def skipped_summary(skipped: list[dict[str, str]], examples: int = EXAMPLES_PER_ERROR) -> SkippedSummary:
    """The manifest's ``skipped`` list ({image_path, reason} each) grouped by reason, most frequent
    first, with up to ``examples`` paths per reason and the first 10 entries as they are."""
    groups: dict[str, SkippedGroup] = {}
    for x in skipped:
        g = groups.setdefault(x.get("reason") or "", SkippedGroup(reason=x.get("reason") or "", count=0, examples=[]))
        g.count += 1
        if len(g.examples) < examples:
            g.examples.append(x.get("image_path"))
    return SkippedSummary(
        count=len(skipped), by_reason=sorted(groups.values(), key=lambda g: (-g.count, g.reason)), examples=skipped[:10]
    )


def lowest_confidence(preds: pa.Table, n: int = LOWEST_N) -> list[LowConfidence]:
    """The ``n`` least confident predictions (score ascending, then path), with their top-k."""
    if preds.num_rows == 0:
        return []
    t = preds.sort_by([("score", "ascending"), ("image_path", "ascending")]).slice(0, n)
    return [
        LowConfidence(
            image_path=r["image_path"],
            pred_label=r["pred_label"],
            score=round(float(r["score"]), 6),
            label_name=r["label_name"],
            topk=[(int(i), round(float(s), 6)) for i, s in zip(r["topk_indices"], r["topk_scores"], strict=True)],
        )
        for r in t.to_pylist()
    ]
