"""Night-over-night drift: a run compared with the previous complete runs of the same folder and model.

"Did anything change?" is answered from the Parquet every run already writes:

- the predicted-class distribution: the population stability index
  ``PSI = Σ_c (a_c − e_c) · ln(a_c / e_c)`` between tonight's class shares ``a`` and the
  baseline's ``e`` (shares floored at :data:`PSI_FLOOR` so an empty class stays finite), and the
  classes whose share moved most. The usual reading (Siddiqi, *Credit Risk Scorecards*, 2006):
  below 0.1 no real change, 0.1–0.25 a moderate shift, above 0.25 a major one;
- the confidence distribution: mean and quantiles of the top-1 probability, and the share of
  images below ``drift.low_confidence``;
- the error rate (failed / scanned, from the manifests);
- with ``output.embeddings``, the cosine distance between tonight's mean embedding and the
  baseline's (0: same direction; a change of content moves it first).

The baseline is the previous ``drift.baseline_runs`` runs (newest first) that ended
``complete``, over the same ``input.root`` with the same model and preprocessing (the
``skip_scored`` key, ``imgscore.runstate.incremental.model_key``), started before this one: their
rows are pooled, so one odd night does not dominate. Only earlier runs count, so the answer for
a run does not change when later runs are added. A threshold crossed is a warning; too few
images (``drift.min_images``) tonight or in the baseline give the numbers without judging them.

Everything is a plain function of files under ``output.root``: no Prefect, no model. The result's
shape (:class:`DriftComparison`, :class:`NoBaseline` and their parts) is in
:mod:`imgscore.report.drift_result`.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from imgscore.config.running import DriftConfig
from imgscore.io import storage
from imgscore.io.parquet import ERRORS_SCHEMA
from imgscore.io.storage import AnyPath
from imgscore.report.drift_result import (
    Baseline,
    ClassShares,
    ClassShift,
    ConfidenceChange,
    ConfidenceStats,
    Current,
    DriftComparison,
    EmbeddingShift,
    ErrorRate,
    Night,
    NoBaseline,
    Thresholds,
)
from imgscore.runstate.incremental import part_files, prior_runs

PSI_FLOOR = 1e-4  # a class share below this counts as this in the PSI (0 would make it infinite)
QUANTILES = (0.1, 0.5, 0.9)  # ConfidenceStats.p10, p50, p90
TOP_SHIFTS = 5  # classes listed by how far their share moved


# ------------------------------------------------------------------------------------ numbers


def psi(current: dict[str, float], baseline: dict[str, float], floor: float = PSI_FLOOR) -> float:
    """Population stability index between two distributions over classes (shares summing to 1).

    ``Σ (a − e) · ln(a / e)`` over the union of classes, each share floored at ``floor``. 0 for
    identical distributions; symmetric in its two arguments; always ≥ 0.
    """
    total = 0.0
    for c in set(current) | set(baseline):
        a, e = max(current.get(c, 0.0), floor), max(baseline.get(c, 0.0), floor)
        total += (a - e) * math.log(a / e)
    return total


def shares(labels: pa.Array | pa.ChunkedArray) -> dict[str, float]:
    """Class → share of ``labels`` (fractions in [0, 1]); empty for no labels."""
    n = len(labels)
    if not n:
        return {}
    counts = pc.value_counts(labels)
    return {str(v["values"]): v["counts"] / n for v in counts.to_pylist()}


def confidence(scores: np.ndarray, low: float) -> ConfidenceStats:
    """Top-1 probabilities float [N] → mean, p10, p50, p90 and ``low_share``, the fraction below
    ``low`` (all None for N = 0)."""
    if scores.size == 0:
        return ConfidenceStats(mean=None, p10=None, p50=None, p90=None, low_share=None)
    s = scores.astype(np.float64)
    p10, p50, p90 = (round(float(v), 6) for v in np.quantile(s, QUANTILES))
    low_share = round(float((s < low).mean()), 6)
    return ConfidenceStats(mean=round(float(s.mean()), 6), p10=p10, p50=p50, p90=p90, low_share=low_share)


def _predictions(out_root: AnyPath, m: dict, model_id: str | None = None) -> pa.Table:
    """``pred_label`` and ``score`` of the run ``m``'s rows of the model ``model_id`` (a run of
    several models holds each one's rows; None: every row)."""
    files = part_files(out_root, [m], "predictions", "drift")
    if not files:
        return pa.table({"pred_label": pa.array([], pa.string()), "score": pa.array([], pa.float32())})
    flt = None if model_id is None else pc.field("model_id") == model_id
    fs, paths = storage.arrow_files(files)
    return ds.dataset(paths, format="parquet", filesystem=fs).to_table(columns=["pred_label", "score"], filter=flt)


def _scores(t: pa.Table) -> np.ndarray:
    return t["score"].to_numpy(zero_copy_only=False) if t.num_rows else np.zeros(0)


def _failed(out_root: AnyPath, m: dict, model_id: str) -> int:
    """Errors rows of the run ``m`` for ``model_id`` (files written before errors carried a
    ``model_id`` hold one model's rows: all of them count)."""
    files = part_files(out_root, [m], "errors", "drift")
    if not files:
        return 0
    fs, paths = storage.arrow_files(files)
    t = ds.dataset(paths, format="parquet", schema=ERRORS_SCHEMA, filesystem=fs).to_table(columns=["model_id"])
    return int(pc.sum(pc.fill_null(pc.equal(t["model_id"], model_id), True)).as_py() or 0) if t.num_rows else 0


def mean_embedding(out_root: AnyPath, runs: list[dict], model_id: str | None = None) -> tuple[np.ndarray | None, int]:
    """The mean of the ``runs``' embeddings (float64 [D]) of the model ``model_id`` (None:
    every row) and how many vectors it averages; (None, 0) when they wrote none or their vector
    lengths differ. Streamed batch by batch."""
    total: np.ndarray | None = None
    n, dim = 0, None
    flt = None if model_id is None else pc.field("model_id") == model_id
    for m in runs:
        files = part_files(out_root, [m], "embeddings", "drift")
        if not files:
            continue
        fs, paths = storage.arrow_files(files)
        for batch in ds.dataset(paths, format="parquet", filesystem=fs).to_batches(columns=["embedding"], filter=flt):
            col = batch.column(0)
            if not len(col):
                continue
            d = col.type.list_size
            if dim is not None and d != dim:
                return None, 0
            dim = d
            vals = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, d)
            total = vals.sum(0) if total is None else total + vals.sum(0)
            n += vals.shape[0]
    return (total / n, n) if total is not None else (None, 0)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """``1 − cos(a, b)`` in [0, 2]; None when either vector is zero."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return None
    return float(1.0 - np.dot(a, b) / (na * nb))


def _error_rate(m: dict, out_root: AnyPath | None = None, model_id: str | None = None) -> float | None:
    """Failed / scanned of the run ``m``; for a run of several models, the errors rows of
    ``model_id`` over the images (its own failed pairs; the counts mix the models)."""
    c = m.get("counts") or {}
    if not c.get("scanned"):
        return None
    if len(m.get("models") or []) > 1 and out_root is not None and model_id is not None:
        return round(_failed(out_root, m, model_id) / c["scanned"], 6)
    return round(c.get("failed", 0) / c["scanned"], 6)


def baseline_runs(out_root: AnyPath, m: dict, n: int, model: dict | None = None) -> list[dict]:
    """The previous ``n`` complete runs of ``m``'s input root that scored ``model`` (default
    the run's first model; the same model key, alone or among several), newest first."""
    root = (m.get("input") or {}).get("root")
    if not root:
        return []
    created = m.get("created_at") or ""
    earlier = [
        p
        for p in prior_runs(out_root, model or m.get("model") or {}, root, exclude=m["run_id"])
        if p.get("status") == "complete" and (p.get("created_at") or "") < created
    ]
    return sorted(earlier, key=lambda p: (p.get("created_at") or "", p["run_id"]), reverse=True)[:n]


def _night(m: dict, preds: pa.Table, low: float, out_root: AnyPath, model_id: str | None) -> Night:
    """One night's point for the plots: run, time, images, confidence, error rate, class shares."""
    conf = confidence(_scores(preds), low)
    return Night(
        run_id=m["run_id"],
        created_at=m.get("created_at"),
        images=preds.num_rows,
        mean_confidence=conf.mean,
        low_share=conf.low_share,
        error_rate=_error_rate(m, out_root, model_id),
        class_shares=shares(preds["pred_label"]),
    )


def _change(now: float | None, then: float | None) -> float | None:
    return round(now - then, 6) if now is not None and then is not None else None


# -------------------------------------------------------------------------------- comparing


def compare(
    out_root: AnyPath, m: dict, cfg: DriftConfig | None = None, model: dict | None = None
) -> DriftComparison | NoBaseline:
    """The run ``m`` (a manifest dict) compared with its baseline (module docstring), for one
    of its models: ``model`` (an entry of the manifest's ``models``; default its first model).
    Only that model's rows are read, tonight and in the baseline (filtered by ``model_id``).

    Returns :class:`NoBaseline` (with a ``reason``) when there is no earlier complete run to
    compare with, else :class:`DriftComparison`: the predicted-class PSI and the
    :data:`TOP_SHIFTS` largest class shifts, tonight's and the baseline's confidence, the error
    rate (the baseline's pooled as failed/scanned), the cosine distance of the mean embeddings,
    each night for the plots, whether there were enough images to judge (``drift.min_images``)
    and one warning per threshold crossed.

    Raises:
        OSError, ValueError, pyarrow.ArrowException: an earlier run's files cannot be read.
    """
    cfg = cfg or DriftConfig()
    model = model or m.get("model") or {}
    mid = model.get("model_id")
    base = baseline_runs(out_root, m, cfg.baseline_runs, model)
    cur = _predictions(out_root, m, mid)
    thresholds = Thresholds(**{k: getattr(cfg, k) for k in Thresholds.model_fields})
    if not base:
        return NoBaseline(
            baseline=Baseline(runs=[], images=0),
            current=Current(images=cur.num_rows),
            thresholds=thresholds,
            warnings=[],
            judged=False,
            reason="no earlier complete run of this input root with this model and preprocessing",
        )
    base_preds = [_predictions(out_root, b, mid) for b in base]
    pooled = pa.concat_tables(base_preds)
    d = DriftComparison(
        baseline=Baseline(runs=[b["run_id"] for b in base], images=pooled.num_rows),
        current=Current(images=cur.num_rows),
        thresholds=thresholds,
        warnings=[],
        judged=cur.num_rows >= cfg.min_images and pooled.num_rows >= cfg.min_images,
        classes=_class_shares(cur, pooled),
        confidence=_confidence_change(cur, pooled, cfg.low_confidence),
        error_rate=_error_rates(out_root, m, base, mid),
        embedding=_embedding_shift(out_root, m, base, mid),
        nights=[
            _night(b, p, cfg.low_confidence, out_root, mid)  # oldest first, tonight last
            for b, p in [*reversed(list(zip(base, base_preds, strict=True))), (m, cur)]
        ],
    )
    if d.judged:
        d.warnings = _warnings(d, cfg)
    return d


def _class_shares(cur: pa.Table, pooled: pa.Table) -> ClassShares:
    a, e = shares(cur["pred_label"]), shares(pooled["pred_label"])
    moves = sorted(
        (
            ClassShift(
                class_name=c,
                share=round(a.get(c, 0.0), 6),
                baseline_share=round(e.get(c, 0.0), 6),
                change=round(a.get(c, 0.0) - e.get(c, 0.0), 6),
            )
            for c in set(a) | set(e)
        ),
        key=lambda r: (-abs(r.change), r.class_name),
    )
    return ClassShares(psi=round(psi(a, e), 6) if a and e else None, shifts=moves[:TOP_SHIFTS])


def _confidence_change(cur: pa.Table, pooled: pa.Table, low: float) -> ConfidenceChange:
    now, then = confidence(_scores(cur), low), confidence(_scores(pooled), low)
    return ConfidenceChange(
        current=now,
        baseline=then,
        mean_change=_change(now.mean, then.mean),
        low_share_change=_change(now.low_share, then.low_share),
    )


def _error_rates(out_root: AnyPath, m: dict, base: list[dict], mid: str | None) -> ErrorRate:
    scanned = sum((b.get("counts") or {}).get("scanned", 0) for b in base)
    failed = sum(
        round((_error_rate(b, out_root, mid) or 0.0) * (b.get("counts") or {}).get("scanned", 0)) for b in base
    )
    now, then = _error_rate(m, out_root, mid), (round(failed / scanned, 6) if scanned else None)
    return ErrorRate(current=now, baseline=then, change=_change(now, then))


def _embedding_shift(out_root: AnyPath, m: dict, base: list[dict], mid: str | None) -> EmbeddingShift | None:
    v_now, n_now = mean_embedding(out_root, [m], mid)
    v_then, n_then = mean_embedding(out_root, base, mid)
    if v_now is None or v_then is None or v_now.shape != v_then.shape:
        return None
    dist = cosine_distance(v_now, v_then)
    if dist is None:
        return None
    return EmbeddingShift(cosine_distance=round(dist, 6), dim=int(v_now.shape[0]), images=n_now, baseline_images=n_then)


def _warnings(d: DriftComparison, cfg: DriftConfig) -> list[str]:
    """One line per threshold of ``cfg`` that ``d`` (from :func:`compare`) crosses."""
    n = len(d.baseline.runs)
    vs = f"compared with the previous {n} complete run{'s' if n != 1 else ''}"
    w = []
    p, top = d.classes.psi, d.classes.shifts[0] if d.classes.shifts else None
    if cfg.max_psi is not None and p is not None and p > cfg.max_psi:
        most = f"; largest shift: {top.class_name} {top.baseline_share:.1%} → {top.share:.1%}" if top else ""
        w.append(f"predicted-class PSI {p:.3f} > drift.max_psi {cfg.max_psi} {vs}{most}")
    if cfg.max_class_shift is not None and top is not None and abs(top.change) > cfg.max_class_shift:
        w.append(
            f"class {top.class_name!r} share moved {top.change:+.1%} "
            f"(> drift.max_class_shift {cfg.max_class_shift:.1%}) {vs}"
        )
    c = d.confidence
    if (
        cfg.max_mean_confidence_drop is not None
        and c.mean_change is not None
        and -c.mean_change > cfg.max_mean_confidence_drop
    ):
        w.append(
            f"mean confidence fell {c.baseline.mean:.3f} → {c.current.mean:.3f} "
            f"(> drift.max_mean_confidence_drop {cfg.max_mean_confidence_drop}) {vs}"
        )
    if (
        cfg.max_low_confidence_increase is not None
        and c.low_share_change is not None
        and c.low_share_change > cfg.max_low_confidence_increase
    ):
        w.append(
            f"share below {cfg.low_confidence} confidence rose "
            f"{c.baseline.low_share:.1%} → {c.current.low_share:.1%} "
            f"(> drift.max_low_confidence_increase {cfg.max_low_confidence_increase:.1%}) {vs}"
        )
    er = d.error_rate
    if cfg.max_error_rate_increase is not None and er.change is not None and er.change > cfg.max_error_rate_increase:
        w.append(
            f"error rate rose {er.baseline:.2%} → {er.current:.2%} "
            f"(> drift.max_error_rate_increase {cfg.max_error_rate_increase:.2%}) {vs}"
        )
    e = d.embedding
    if cfg.max_embedding_shift is not None and e is not None and e.cosine_distance > cfg.max_embedding_shift:
        w.append(
            f"mean embedding moved by cosine distance {e.cosine_distance:.4f} "
            f"(> drift.max_embedding_shift {cfg.max_embedding_shift}) {vs}"
        )
    return w


def drift_config(m: dict) -> DriftConfig:
    """The ``drift`` section a run recorded (defaults for runs recorded before it existed)."""
    return DriftConfig.model_validate((m.get("config") or {}).get("drift") or {})
