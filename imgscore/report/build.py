"""The run report: what a person reads after a run, computed from its manifest and Parquet.

:func:`build_report` returns a JSON-ready dict (``imgscore report --format json``);
:func:`render_html` turns it into one self-contained HTML page (plots as base64 SVG made with
matplotlib's SVG backend, thumbnails as base64 JPEG, inline CSS, no scripts, nothing fetched);
:func:`write_html_report` writes it to ``OUT/runs/RUN_ID/report.html`` and is called at the end
of every run. :func:`summary_row` and :func:`markdown_summary` are the Prefect artifacts' content.

Everything here is a plain function of files on disk: no Prefect, no model, no GPU.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import os
import re
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from upath import UPath

from imgscore.errors import UsageError
from imgscore.images.formats import DEFAULT_FORMATS, open_image, recorded_formats
from imgscore.io import storage
from imgscore.io.containment import UnsafePathError, check_relative, check_relative_column
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    run_part_files,
    write_bytes_atomic,
)
from imgscore.io.storage import AnyPath
from imgscore.report import drift as drift_mod
from imgscore.report.evaluate import MAX_EXTRA_COLUMNS, confusion, nfc, read_run
from imgscore.runstate.commits import check_run_state, load_manifest, manifest_path, run_dir_of
from imgscore.runstate.manifest import ABANDONED, observed_status

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
HIST_BINS = 20  # confidence histogram: equal bins over [0, 1]
MAX_CLASS_ROWS = 40  # classes listed/plotted: all when fewer, else the most predicted
LOWEST_N = 24  # thumbnails of the least confident predictions
EXAMPLES_PER_ERROR = 3
THUMB_PX = 112
REPORT_FILE = "report.html"
NA = "n/a"  # shown for accuracy when folder labels cannot be paired with model classes

_PRED_COLS = ["image_path", "label", "label_name", "pred_index", "pred_label", "score", "topk_indices", "topk_scores", "device", "worker",
              "model_id"]
_ERR_COLS = ["image_path", "shard_id", "batch_id", "stage", "error_type", "message", "attempt", "model_id"]


# --------------------------------------------------------------------------------------------
# numbers


def load_run_manifest(out_root: AnyPath, run_id: str) -> dict:
    """The run's state (summary + ledger) as a dict shaped like ``manifest.json``.

    Raises:
        UsageError: no such run under ``out_root`` (the message lists the latest runs there);
            UnsafePathError: the run state names a path outside ``out_root``.
    """
    path = manifest_path(out_root, run_id)
    if not storage.is_file(path):
        runs_dir = storage.path(out_root, "runs")
        known = sorted((n for n in storage.list_names(runs_dir) if storage.is_file(storage.path(runs_dir, n, "manifest.json"))), reverse=True)
        hint = f"latest runs there: {', '.join(known[:5])}" if known else "no runs there yet"
        raise UsageError(f"run {run_id!r} not found in {str(runs_dir)!r} ({hint}); check RUN_ID or set output.root (--set output.root=DIR)")
    m = load_manifest(storage.parent_of(path))
    check_run_state(m, out_root, storage.parent_of(path))
    return m.to_dict()


def _read(out_root: Path, run_date: str | None, run_id: str, table: str, columns: list[str], schema: pa.Schema) -> pa.Table:
    """The run's rows of ``table``, read from its own part-file folder only (not every run's files;
    a run not yet moved from the layout before is read where it is)."""
    files = [str(f) for f in run_part_files(out_root, table, run_date, run_id)]
    if not files:
        if run_date is None and not storage.is_remote(out_root) and (out_root / table).is_dir():  # old manifest without run_date
            return read_run(out_root, run_id, table, columns=columns)
        return schema.empty_table().select(columns)
    fs, paths = storage.arrow_files(files)
    return ds.dataset(paths, format="parquet", schema=schema, filesystem=fs).to_table(columns=columns)


def score_stats(scores: np.ndarray) -> dict:
    """Top-1 probability distribution: count, mean, min, max, percentiles and a histogram.

    ``scores`` are probabilities in [0, 1] (float32 [N]). Percentiles use numpy's default
    (linear) interpolation; the histogram has :data:`HIST_BINS` equal bins over [0, 1], the last
    one closed. All values are None (counts empty) when N is 0.
    """
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    if scores.size == 0:
        return {"count": 0, "mean": None, "min": None, "max": None, "percentiles": {f"p{q}": None for q in PERCENTILES},
                "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": [0] * HIST_BINS}}
    s = scores.astype(np.float64)
    counts, _ = np.histogram(np.clip(s, 0.0, 1.0), bins=edges)
    pct = np.percentile(s, PERCENTILES)
    return {
        "count": int(s.size),
        "mean": round(float(s.mean()), 6),
        "min": round(float(s.min()), 6),
        "max": round(float(s.max()), 6),
        "percentiles": {f"p{q}": round(float(v), 6) for q, v in zip(PERCENTILES, pct, strict=True)},
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]},
    }


def class_counts(pred_index: np.ndarray, model_classes: list[str]) -> list[dict]:
    """Predictions per model class: ``[{index, name, predicted, share}]`` in class-index order.

    Every class is listed when the model has at most :data:`MAX_CLASS_ROWS` classes; otherwise
    only the :data:`MAX_CLASS_ROWS` most predicted ones, and never one that nothing was predicted
    as (:func:`classes_left_out` says how many are not listed). ``share`` is a fraction of all
    predictions in [0, 1].
    """
    n = int(pred_index.size)
    counts = np.bincount(pred_index, minlength=len(model_classes)) if n else np.zeros(len(model_classes), dtype=np.int64)
    idx = list(range(len(counts)))
    if len(idx) > MAX_CLASS_ROWS:
        idx = sorted(sorted((i for i in idx if counts[i]), key=lambda i: (-counts[i], i))[:MAX_CLASS_ROWS])
    return [
        {"index": i, "name": model_classes[i] if i < len(model_classes) else str(i), "predicted": int(counts[i]),
         "share": round(float(counts[i]) / n, 6) if n else 0.0}
        for i in idx
    ]


def classes_left_out(classes: list[dict], pred_index: np.ndarray, model_classes: list[str]) -> dict | None:
    """The model classes :func:`class_counts` did not list: ``{count, never_predicted}``, or None
    when every class is listed."""
    left = len(model_classes) - len(classes)
    if left <= 0:
        return None
    predicted = int(np.unique(pred_index).size) if pred_index.size else 0
    return {"count": left, "never_predicted": len(model_classes) - predicted}


def classes_left_out_line(report: dict) -> str | None:
    """``and N more classes …`` under the per-class table, or None when every class is listed."""
    left = report.get("classes_left_out")
    if not left:
        return None
    return f"and {left['count']} more classes, not listed: {left['never_predicted']} of the model's classes were never predicted"


def error_summary(errors: pa.Table, examples: int = EXAMPLES_PER_ERROR) -> dict:
    """Errors rows grouped by (stage, error_type), most frequent first.

    Returns:
        ``{total, by_stage: {stage: n}, groups: [{stage, error_type, count, examples: [paths],
        message}]}`` where ``examples`` are up to ``examples`` distinct image paths (whole-batch
        failures have none) and ``message`` is the first message seen, cut to 300 characters.
    """
    rows = errors.select(["image_path", "stage", "error_type", "message"]).to_pylist()
    groups: dict[tuple[str, str], dict] = {}
    by_stage: dict[str, int] = {}
    for r in sorted(rows, key=lambda r: (r["stage"], r["error_type"], r["image_path"] or "")):
        by_stage[r["stage"]] = by_stage.get(r["stage"], 0) + 1
        g = groups.setdefault((r["stage"], r["error_type"]), {"stage": r["stage"], "error_type": r["error_type"], "count": 0,
                                                                "examples": [], "message": (r["message"] or "")[:300]})
        g["count"] += 1
        if r["image_path"] is not None and len(g["examples"]) < examples and r["image_path"] not in g["examples"]:
            g["examples"].append(r["image_path"])
    return {
        "total": len(rows),
        "by_stage": dict(sorted(by_stage.items(), key=lambda kv: -kv[1])),
        "groups": sorted(groups.values(), key=lambda g: (-g["count"], g["stage"], g["error_type"])),
    }


def skipped_summary(skipped: list[dict], examples: int = EXAMPLES_PER_ERROR) -> dict:
    """The manifest's ``skipped`` list grouped by reason, most frequent first.

    Returns:
        ``{count, by_reason: [{reason, count, examples: [paths]}], examples: [first 10 entries]}``.
    """
    groups: dict[str, dict] = {}
    for x in skipped:
        g = groups.setdefault(x.get("reason") or "", {"reason": x.get("reason") or "", "count": 0, "examples": []})
        g["count"] += 1
        if len(g["examples"]) < examples:
            g["examples"].append(x.get("image_path"))
    return {"count": len(skipped), "by_reason": sorted(groups.values(), key=lambda g: (-g["count"], g["reason"])), "examples": skipped[:10]}


def lowest_confidence(preds: pa.Table, n: int = LOWEST_N) -> list[dict]:
    """The ``n`` least confident predictions (score ascending, then path), with their top-k."""
    if preds.num_rows == 0:
        return []
    t = preds.sort_by([("score", "ascending"), ("image_path", "ascending")]).slice(0, n)
    out = []
    for r in t.to_pylist():
        out.append({
            "image_path": r["image_path"],
            "pred_label": r["pred_label"],
            "score": round(float(r["score"]), 6),
            "label_name": r["label_name"],
            "topk": [[int(i), round(float(s), 6)] for i, s in zip(r["topk_indices"], r["topk_scores"], strict=True)],
        })
    return out


def _models_html(r: dict) -> list[str]:
    """A several-model run: its models, and which one the per-image sections describe."""
    if not r.get("models"):
        return []
    each = " · ".join(f"{x['name']} ({x['arch']}, {x['scored']} scored, {x['failed']} failed)" for x in r["models"])
    return [f"<p class=\"sub\">models: {_e(each)} — counts are (image, model) pairs; the sections below describe "
            f"<b>{_e(r['model'].get('name'))}</b></p>"]


def run_drift(out_root: Path, m: dict, model: dict | None = None) -> dict | None:
    """The run compared with recent nights (:func:`imgscore.report.drift.compare`, with the
    ``drift`` settings the run recorded); None when ``drift.enabled`` is off. A comparison that
    cannot be made (an unreadable earlier run) is ``{"error": one line}``, never an exception."""
    cfg = drift_mod.drift_config(m)
    if not cfg.enabled:
        return None
    try:
        return drift_mod.compare(out_root, m, cfg, model)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return {"error": one_line(exc), "warnings": []}


def _of_model(t: pa.Table, model_id: str | None) -> pa.Table:
    """Rows of ``model_id`` (rows of files written before errors carried one count as its)."""
    if model_id is None or not t.num_rows:
        return t
    return t.filter(pc.fill_null(pc.equal(t["model_id"], model_id), True))


def models_summary(m: dict, preds: pa.Table, errs: pa.Table) -> list[dict]:
    """Each model of a several-model run: name, arch, model_id, its predictions and errors rows
    (its (image, model) pairs); [] for a run of one model."""
    models = m.get("models") or []
    if len(models) < 2:
        return []
    return [{"name": x.get("name"), "arch": x.get("arch"), "model_id": x.get("model_id"),
             "scored": _of_model(preds, x.get("model_id")).num_rows, "failed": _of_model(errs, x.get("model_id")).num_rows}
            for x in models]


def build_report(out_root: AnyPath, run_id: str, lowest_n: int = LOWEST_N, model_name: str | None = None) -> dict:
    """Everything the report shows, computed from ``runs/RUN_ID/manifest.json`` and the Parquet.

    Counts come from the manifest (``scanned``, ``scored``, ``failed``, ``skipped``,
    ``already_scored``, ``pending``); ``rows`` are what the Parquet actually holds for the run,
    so a mismatch between the two is visible. ``accuracy`` is :func:`imgscore.report.evaluate.confusion`'s
    dict, or None for a flat (unlabelled) folder; when the folder's classes cannot be paired with
    the model's (names differ and counts differ) it is still a dict, with ``accuracy`` None,
    ``matched_by`` ``"none"`` and a ``reason``, and every renderer shows "n/a" with that reason.
    Times are seconds, throughput images per second, scores probabilities in [0, 1]. ``drift``
    compares the run with recent nights (:func:`run_drift`).

    ``status`` is the manifest's, except ``abandoned`` for a ``running`` run whose lock owner is
    gone (kill -9, OOM, reboot); ``reason`` says why a run ended ``failed``, ``interrupted`` or
    ``crashed``; ``rerun`` is the command that finishes a run that did not complete (else None).
    ``known_bad`` (None unless images were carried by the failure ledger): how many, the file that
    lists them, and counts by error type and by the run that recorded the failure.
    ``outputs.report`` is None when report.html was never written (an abandoned run).

    A run of several models (``models``): ``models`` lists each with its scored and failed
    pairs; the counts are (image, model) pairs; the per-image sections (classes, scores,
    accuracy, errors, lowest confidence, drift) describe one model, ``model_name`` (default the
    first), named in ``model``.

    Raises:
        UsageError: the run is not under ``out_root``, or ``model_name`` is not one of its models.
    """
    out_root = storage.path(out_root)
    m = load_run_manifest(out_root, run_id)
    all_preds = _read(out_root, m.get("run_date"), run_id, "predictions", _PRED_COLS, PREDICTIONS_SCHEMA)
    all_errs = _read(out_root, m.get("run_date"), run_id, "errors", _ERR_COLS, ERRORS_SCHEMA)
    model = m.get("model") or {}
    several = m.get("models") or []
    if len(several) > 1 or model_name is not None:
        names = [x.get("name") for x in several] or [model.get("name") or model.get("arch")]
        if model_name is not None and model_name not in names:
            raise UsageError(f"run {run_id} scored no model named {model_name!r}; its models: {', '.join(map(str, names))}")
        model = next((x for x in several if x.get("name") == model_name), several[0] if several else model)
    preds, errs = (_of_model(all_preds, model.get("model_id")), _of_model(all_errs, model.get("model_id"))) if len(several) > 1 \
        else (all_preds, all_errs)
    model_classes = list(model.get("classes") or [])
    folder_classes = (m.get("input") or {}).get("classes") or None
    shards = m.get("shards") or []
    c = m.get("counts") or {}
    timings = m.get("timings") or {}
    states: dict[str, int] = {}
    for s in shards:
        states[s["state"]] = states.get(s["state"], 0) + 1
    devices = sorted({s["device"] for s in shards if s.get("device")} | set(preds["device"].unique().to_pylist()))
    workers = sorted({s["worker"] for s in shards if s.get("worker")} | set(preds["worker"].unique().to_pylist()))
    scores = preds["score"].to_numpy() if preds.num_rows else np.zeros(0, np.float32)
    pred_index = preds["pred_index"].to_numpy() if preds.num_rows else np.zeros(0, np.int64)
    conf = confusion(preds, folder_classes, model_classes) if preds.num_rows and pc.any(pc.is_valid(preds["label"])).as_py() else None
    wall = timings.get("wall_s")
    pairs = c.get("pairs") or c.get("scanned", 0)
    run_dir = run_dir_of(out_root, run_id)
    status = observed_status(m.get("status"), run_dir)
    writer = live_writer(run_dir)  # a live run (or rerun): `imgscore rerun` would be refused, so it is not offered
    reason = m.get("reason")
    if status == ABANDONED:
        reason = "its process is gone (killed, out of memory, or the machine restarted) without recording an ending"
    carried = (m.get("incremental") or {}).get("carried") or {}
    report_file = storage.path(run_dir, REPORT_FILE)
    return {
        "run_id": m["run_id"],
        "run_date": m.get("run_date"),
        "status": status,
        "reason": reason,
        "rerun": rerun_command(run_id, out_root) if status not in ("complete", "planned") and writer is None else None,
        "writer": writer,
        "created_at": m.get("created_at"),
        "updated_at": m.get("updated_at"),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": {"root": (m.get("input") or {}).get("root"), "layout": (m.get("input") or {}).get("layout"), "classes": folder_classes,
                  "formats": (((m.get("config") or {}).get("input") or {}).get("formats"))},
        "model": {k: model.get(k) for k in ("name", "arch", "model_id", "source", "num_classes")},
        "models": models_summary(m, all_preds, all_errs),
        "counts": {k: c.get(k, 0) for k in ("scanned", "scored", "failed", "skipped", "already_scored", "already_failed", "pending")},
        "known_bad": {"count": c.get("already_failed", 0), "file": str(run_dir / carried.get("file", "already_failed.parquet")),
                      "by_error_type": carried.get("by_error_type") or {}, "by_run": carried.get("by_run") or {}}
        if c.get("already_failed") else None,
        "error_rate": round(c.get("failed", 0) / pairs, 6) if pairs else 0.0,  # of (image, model) pairs
        "rows": {"predictions": all_preds.num_rows, "errors": all_errs.num_rows},
        "timing": {
            "wall_s": wall,
            "images_per_s": timings.get("images_per_s"),
            "pairs_per_s": timings.get("pairs_per_s"),  # (image, model) pairs; None in older manifests
            "shard_seconds": timings.get("shard_seconds"),
            "scan_s": timings.get("scan_s"),
        },
        "devices": devices,
        "workers": workers,
        "shards": {"total": len(shards), **dict(sorted(states.items()))},
        "classes": (listed := class_counts(pred_index, model_classes)),
        "classes_left_out": classes_left_out(listed, pred_index, model_classes),
        "scores": score_stats(scores),
        "accuracy": conf,
        "errors": error_summary(errs),
        "skipped": skipped_summary(m.get("skipped") or []),
        "lowest_confidence": lowest_confidence(preds, lowest_n),
        "drift": run_drift(out_root, m, model),
        "outputs": {**(m.get("outputs") or {}), "manifest": str(manifest_path(out_root, run_id)),
                    "report": str(report_file) if storage.is_file(report_file) else None},
    }


def live_writer(run_dir: AnyPath) -> str | None:
    """The live process writing the run (its lock's owner: purpose, pid, host, since when), or
    None when no live process holds the run's lock, or this process does (a run writing its own
    report.html at its end)."""
    import socket

    from imgscore.runstate import lock as run_lock

    rec = run_lock.read_lock(run_dir)
    if rec is None or run_lock.is_stale(rec) or (rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname()):
        return None
    return run_lock.owner(rec)


def rerun_command(run_id: str, out_root: AnyPath) -> str:
    """The command that finishes a run: ``imgscore rerun RUN --set output.root=OUT``."""
    return f"imgscore rerun {run_id} --set output.root={out_root}"


def known_bad_line(report: dict) -> str | None:
    """One line on the images carried by the failure ledger, or None when there are none."""
    kb = report.get("known_bad")
    if not kb:
        return None
    kinds = ", ".join(f"{k} {v}" for k, v in list(kb["by_error_type"].items())[:3])
    return (f"{kb['count']} image(s) failed before with the same bytes and were not retried ({kinds}; "
            f"run.retry_failed=true retries them): {kb['file']}")


# --------------------------------------------------------------------------------------------
# plots (matplotlib's object API: no pyplot, no global backend switch, safe in worker threads)


def _literal_text(fn):
    """Run a plot function with every text drawn literally: class and file names such as
    ``price_$5_to_$10`` or ``a\\b^c`` are not parsed as math text (``$…$``, ``_``, ``^``) or TeX.
    matplotlib reads ``text.parse_math`` when each Text is made, so the setting covers the whole
    function (building and saving); ``rc_context`` restores it on the way out."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return fn(*args, **kwargs)

    return wrapper


def _svg_data_uri(fig) -> str:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "imgscore", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@_literal_text
def plot_class_distribution(classes: list[dict]) -> str | None:
    """Horizontal bars of predictions per class; a ``data:image/svg+xml`` URI, None if empty."""
    if not classes or not any(r["predicted"] for r in classes):
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = [r["name"] for r in classes][::-1]
    vals = [r["predicted"] for r in classes][::-1]
    fig = Figure(figsize=(6.4, max(1.6, 0.26 * len(names) + 0.8)))
    ax = fig.add_subplot()
    bars = ax.barh(range(len(names)), vals, color="#3b6ea8")
    ax.set_yticks(range(len(names)), [n[:28] for n in names], fontsize=8)
    ax.bar_label(bars, fontsize=7, padding=2)
    ax.set_xlabel("predicted images")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Predicted class distribution", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    ax.margins(x=0.12)
    return _svg_data_uri(fig)


@_literal_text
def plot_confidence_histogram(scores: dict) -> str | None:
    """Histogram of top-1 probabilities with the median marked; SVG data URI, None if empty."""
    if not scores["count"]:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    edges = np.array(scores["histogram"]["edges"])
    counts = np.array(scores["histogram"]["counts"])
    fig = Figure(figsize=(6.4, 2.8))
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#5a9e6f", edgecolor="white")
    med = scores["percentiles"]["p50"]
    ax.axvline(med, color="#c0392b", lw=1.2, ls="--", label=f"median {med:.3f}")
    ax.set_xlim(0, 1)
    nz = counts[counts > 0]
    if nz.size and nz.max() / nz.min() > 50:  # one dominant bin would hide the rest
        ax.set_yscale("log")
    ax.set_xlabel("top-1 probability")
    ax.set_ylabel("images")
    if ax.get_yscale() == "linear":
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Confidence", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg_data_uri(fig)


@_literal_text
def plot_class_shift(drift: dict | None) -> str | None:
    """Paired bars of each class's share, baseline vs tonight (classes that moved most first);
    SVG data URI, None without a comparison."""
    if not drift or not (drift.get("classes") or {}).get("shifts"):
        return None
    from matplotlib.figure import Figure

    rows = drift["classes"]["shifts"][::-1]
    y = np.arange(len(rows))
    fig = Figure(figsize=(6.4, max(1.8, 0.42 * len(rows) + 0.9)))
    ax = fig.add_subplot()
    ax.barh(y + 0.2, [r["baseline_share"] for r in rows], height=0.4, color="#9aa5b1", label="recent nights")
    ax.barh(y - 0.2, [r["share"] for r in rows], height=0.4, color="#3b6ea8", label="this run")
    ax.set_yticks(y, [str(r["class"])[:28] for r in rows], fontsize=8)
    ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.set_xlabel("share of predictions")
    ax.set_title(f"Classes that moved most (PSI {_fmt(drift['classes']['psi'])})", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg_data_uri(fig)


@_literal_text
def plot_nights(drift: dict | None) -> str | None:
    """Mean confidence, share below the low-confidence threshold and error rate per night,
    oldest first, this run last; SVG data URI, None without a comparison."""
    nights = (drift or {}).get("nights") or []
    if len(nights) < 2:
        return None
    from matplotlib.figure import Figure

    x = np.arange(len(nights))
    fig = Figure(figsize=(6.4, 2.8))
    ax = fig.add_subplot()
    for key, label, color in (("mean_confidence", "mean confidence", "#5a9e6f"), ("low_share", "share below threshold", "#c0392b"),
                              ("error_rate", "error rate", "#7f8c8d")):
        ax.plot(x, [np.nan if n[key] is None else n[key] for n in nights], marker="o", color=color, label=label)
    ax.set_xticks(x, [("this run" if i == len(nights) - 1 else str(n["created_at"] or n["run_id"])[:10]) for i, n in enumerate(nights)],
                  fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("Recent nights", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="best")
    ax.spines[["top", "right"]].set_visible(False)
    return _svg_data_uri(fig)


def _bounded_matrix(conf: dict, max_rows: int = MAX_CLASS_ROWS) -> tuple[list[str], list[str], np.ndarray, int]:
    """The confusion matrix as drawn: at most ``max_rows`` rows (the folder classes with the most
    images, in label order) and the columns those rows use (their own class first when labels
    are paired), the rest summed into ``(other)``. Returns (rows, columns, matrix float [R, C],
    rows left out). Drawing cost grows with rows × columns: 10,000 classes took minutes."""
    mat = np.array(conf["matrix"], dtype=float).reshape(len(conf["rows"]), len(conf["columns"]))
    rows, cols = list(conf["rows"]), list(conf["columns"])
    if len(rows) <= max_rows and len(cols) <= max_rows + MAX_EXTRA_COLUMNS:
        return rows, cols, mat, 0
    keep = np.sort(np.argsort(-mat.sum(axis=1), kind="stable")[:max_rows])
    sub = mat[keep]
    used = sub.sum(axis=0)
    own = list(keep) if conf["matched_by"] != "none" else []  # paired: row i's own class is column i
    others = [j for j in np.argsort(-used, kind="stable") if used[j] and j not in set(own)][:MAX_EXTRA_COLUMNS]
    kept_cols = own + sorted(others)
    out = sub[:, kept_cols]
    names = [cols[j] for j in kept_cols]
    rest = used.sum() - out.sum()
    if rest:
        out = np.concatenate([out, (sub.sum(axis=1) - out.sum(axis=1))[:, None]], axis=1)
        names.append("(other)")
    return [rows[i] for i in keep], names, out, len(rows) - len(keep)


@_literal_text
def plot_confusion_matrix(conf: dict | None) -> str | None:
    """Heat map of the confusion matrix (rows: folder labels, columns: predictions); SVG data URI.

    With ``matched_by == "none"`` it is a plain label × prediction count table, titled as such
    (accuracy n/a), since no cell means "correct".
    """
    if not conf:
        return None
    from matplotlib.figure import Figure

    rows, cols, mat, left_out = _bounded_matrix(conf)
    norm = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)  # row-normalised: recall on the diagonal
    w = min(11.0, 1.6 + 0.42 * len(cols))
    h = min(11.0, 1.4 + 0.42 * len(rows))
    fig = Figure(figsize=(max(w, 3.6), max(h, 2.6)))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), [c[:16] for c in cols], rotation=60 if len(cols) > 6 else 0, ha="right" if len(cols) > 6 else "center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[:20] for r in rows], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("folder label")
    more = f"; the {len(rows)} largest of {len(rows) + left_out} classes" if left_out else ""
    if conf["accuracy"] is None:
        ax.set_title(f"Folder label vs prediction (accuracy n/a: classes do not match{more})", fontsize=10)
    else:
        ax.set_title(f"Confusion matrix (accuracy {conf['accuracy']:.3f}, matched by {conf['matched_by']}{more})", fontsize=10)
    if len(rows) * len(cols) <= 400:
        for i in range(len(rows)):
            for j in range(len(cols)):
                if mat[i, j]:
                    ax.text(j, i, str(int(mat[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.6 else "#222")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of row")
    return _svg_data_uri(fig)


# --------------------------------------------------------------------------------------------
# thumbnails


def thumbnail_data_uri(path: str | os.PathLike | bytes | io.BytesIO, size: int = THUMB_PX,
                       formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS) -> tuple[str | None, str | None]:
    """A small JPEG of an image file as a ``data:`` URI: (uri, None), or (None, reason).
    ``path``: a path (``bytes`` for names that are not UTF-8) or the image's bytes in a ``BytesIO``;
    only the run's ``formats`` (``input.formats``) are opened, as scoring opens them.

    EXIF orientation is applied and transparency composited on white, like scoring does. Never
    raises for a bad or missing file: the reason is returned for the page to show.
    """
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(path, formats) as im:
                im.draft("RGB", (size * 2, size * 2))
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, rgba)
                im = im.convert("RGB")
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=82)
    except FileNotFoundError:
        return None, "file not found"
    except Exception as exc:  # shown on the page instead of the image; the report still renders
        return None, f"{type(exc).__name__}: {str(exc)[:120]}"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


def _fs_paths(out_root: AnyPath, run_id: str, wanted: set[str]) -> dict[str, bytes]:
    """image_path → fs_path (bytes, opens names that are not UTF-8) from the run's index.parquet
    (a folder of part files; a single file for runs planned before that)."""
    index = storage.path(out_root, "runs", run_id, "index.parquet")
    if not wanted or not storage.exists(index):
        return {}
    fs, where = storage.arrow_filesystem(index)
    t = pq.read_table(where, columns=["image_path", "fs_path"], filesystem=fs)
    t = t.filter(pc.is_in(t["image_path"], value_set=pa.array(sorted(wanted), pa.string())))
    check_relative_column(t["fs_path"], f"{index} fs_path")  # thumbnails are read under the input root only
    return dict(zip(t["image_path"].to_pylist(), t["fs_path"].to_pylist(), strict=True))


def _below(rel: str) -> bool:
    try:
        check_relative(rel, "image_path")
        return True
    except UnsafePathError:
        return False


def thumbnails(report: dict, out_root: AnyPath) -> dict[str, tuple[str | None, str | None]]:
    """Thumbnails of the report's lowest-confidence images, read from the run's input root.

    Only paths below the input root are opened: an ``image_path`` (from the predictions, which
    are data) that is absolute or climbs out with ``..`` gets a reason instead of a thumbnail.

    Raises:
        UnsafePathError: the run's index names a file outside the input root.
    """
    root = report["input"]["root"]
    formats = recorded_formats(report["input"].get("formats"))  # read back from output.root: not trusted
    items = report["lowest_confidence"]
    if root is None or not items:
        return {}
    fs = _fs_paths(storage.path(out_root), report["run_id"], {r["image_path"] for r in items})
    if storage.is_remote(root):  # objects: one batch of GETs (retries and timeouts as scoring has them)
        wanted = [(r["image_path"], os.fsdecode(fs.get(r["image_path"]) or r["image_path"].encode())) for r in items]
        safe = [(p, rel) for p, rel in wanted if _below(rel)]
        got = storage.read_objects([storage.join(root, rel) for _, rel in safe])
        out = {p: (None, "not read: the path leaves the input root") for p, rel in wanted if not _below(rel)}
        for (p, _), data in zip(safe, got, strict=True):
            out[p] = thumbnail_data_uri(io.BytesIO(data), formats=formats) if isinstance(data, bytes) else (None, storage.describe_error(data)[:120])
        return out
    out = {}
    for r in items:
        p = r["image_path"]
        rel = fs.get(p)
        if rel is None:
            try:
                check_relative(p, "image_path")
            except UnsafePathError:
                out[p] = (None, "not read: the path leaves the input root")
                continue
        full = os.path.join(os.fsencode(root), rel) if rel is not None else os.path.join(root, p)
        out[p] = thumbnail_data_uri(full, formats=formats)
    return out


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.sub{color:#5b6475;margin:0 0 16px}.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.status{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px;color:#fff}
.st-complete{background:#2e8b57}.st-partial{background:#d98e04}.st-failed{background:#c0392b}.st-running{background:#6b7280}
.st-interrupted{background:#7c5cbf}.st-crashed{background:#c0392b}.st-abandoned{background:#8a5a2b}
.ending{border-left:4px solid #c0392b;background:#fbf2f1;padding:6px 12px;margin:10px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #dde2ea;border-radius:8px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}.card span{color:#5b6475;font-size:12px}
table{border-collapse:collapse;margin:6px 0}td,th{border-bottom:1px solid #e6e9ef;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f4f6f9;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.plots img{max-width:100%;border:1px solid #eef0f4;border-radius:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(128px,1fr));gap:10px}
.thumb{border:1px solid #dde2ea;border-radius:6px;padding:6px;font-size:11px;overflow-wrap:anywhere}
.thumb img{width:112px;height:112px;object-fit:contain;image-rendering:pixelated;background:#f4f6f9;display:block;margin:0 auto 4px}
.thumb .na{width:112px;height:112px;display:flex;align-items:center;justify-content:center;background:#f4f6f9;color:#8a93a3;margin:0 auto 4px;text-align:center}
.wrong{color:#c0392b;font-weight:600}.ok{color:#2e8b57}.muted{color:#8a93a3}
"""


def per_class_lookup(acc: dict | None):
    """model class name → the confusion's per-class dict (support, recall) of the folder class it
    is paired with, names compared in NFC. Matched by index, folder class i is paired with model
    class i (the confusion's diagonal column), whatever either is called; matched by name (or not
    at all) the names are the same."""
    acc = acc or {}
    per_class = acc.get("per_class", [])
    if acc.get("matched_by") == "index":
        cols = acc.get("columns") or []
        by = {nfc(cols[i]): p for i, p in enumerate(per_class) if i < len(cols) and not cols[i].startswith("(none for ")}
    else:
        by = {nfc(p["name"]): p for p in per_class}
    return lambda name: by.get(nfc(name))


def normalization_note(acc: dict | None) -> str | None:
    """One sentence when folder names matched model classes only after Unicode NFC
    normalization (same letters, other bytes: macOS writes NFD), else None."""
    names = (acc or {}).get("normalized") or []
    if not names:
        return None
    shown = ", ".join(repr(n) for n in names[:3]) + (", …" if len(names) > 3 else "")
    return (f"{len(names)} folder name(s) matched the model's class names only after Unicode NFC normalization "
            f"({shown}): same letters, other bytes (macOS writes names in NFD)")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (matplotlib's parse errors span several), at most 300 characters."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else repr(exc)}"


def _plot_or_reason(fn, *args) -> tuple[str | None, str | None]:
    """(SVG data URI or None, None) from a plot function, or (None, reason) when it raised: a
    plot that cannot be drawn costs its own image, never the report."""
    try:
        return fn(*args), None
    except Exception as exc:
        return None, one_line(exc)


def _e(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(headers: list[str] | None, rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers or [])
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def ending_lines(report: dict) -> list[str]:
    """Why a run did not complete and how to finish it: ``reason`` and the ``imgscore rerun``
    command, for every status but ``complete`` (empty then); for a run a live process is still
    writing (``writer``), that it is still running and by whom, and no rerun command."""
    lines = []
    if report.get("writer"):  # nothing to finish yet: the run is being written now
        lines.append(f"still running: {report['writer']}; this report shows the shards committed so far, "
                     f"run `imgscore report {report['run_id']}` again once it ends")
    if report.get("reason"):
        lines.append(f"{report['status']}: {report['reason']}")
    if report.get("rerun") and report.get("status") in ("interrupted", "crashed", ABANDONED, "running", "failed", "partial"):
        lines.append(f"finish it with `{report['rerun']}`")
    return lines


def _ending_html(report: dict) -> list[str]:
    lines = ending_lines(report)
    return [f'<div class="ending">{"<br>".join(_e(x) for x in lines)}</div>'] if lines else []


def render_html(report: dict, thumbs: dict[str, tuple[str | None, str | None]] | None = None) -> str:
    """The report as one self-contained HTML page (inline CSS, plots and thumbnails as data URIs).

    ``thumbs`` maps image_path → (data URI, reason) as :func:`thumbnails` returns; missing
    entries show a placeholder. All text from files and paths is HTML-escaped.
    """
    thumbs = thumbs or {}
    r = report
    c = r["counts"]
    status = r.get("status") or "unknown"
    t = r["timing"]
    acc = r["accuracy"]
    cards = [("scanned", c["scanned"]), ("scored", c["scored"]), ("failed", c["failed"]), ("skipped", c["skipped"]),
             ("already scored", c["already_scored"]), ("already failed", c.get("already_failed", 0)), ("images/s", _fmt(t.get("images_per_s"), 1)), ("wall s", _fmt(t.get("wall_s"), 1))]
    if acc:
        cards.append(("accuracy", NA if acc["accuracy"] is None else _fmt(acc["accuracy"], 4)))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>imgscore run {_e(r['run_id'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>imgscore run <span class=\"mono\">{_e(r['run_id'])}</span> <span class=\"status st-{_e(status)}\">{_e(status)}</span></h1>",
        f"<p class=\"sub\">{_e(r['input']['root'])} ({_e(r['input']['layout'])}) · {_e(r['model']['arch'])} "
        f"<span class=\"mono\">{_e((r['model']['model_id'] or '')[:12])}</span> · started {_e(r.get('created_at'))} · "
        f"report generated {_e(r.get('generated_at'))}</p>",
        *_ending_html(r),
        *_models_html(r),
        '<div class="cards">' + "".join(f"<div class=\"card\"><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in cards) + "</div>",
        "<h2>Run</h2>",
        _table(None, [
            ["devices", _e(", ".join(r["devices"]) or "–")],
            ["workers", f"{len(r['workers'])} <span class=\"muted mono\">{_e(', '.join(r['workers'][:8]))}</span>"],
            ["shards", _e(", ".join(f"{k} {v}" for k, v in r["shards"].items()))],
            ["error rate", _e(f"{r['error_rate']:.4%}")],
            ["rows in Parquet", _e(f"{r['rows']['predictions']} predictions, {r['rows']['errors']} errors")],
            ["shard seconds (sum)", _e(_fmt(t.get("shard_seconds"), 2))],
            ["predictions", f"<span class=\"mono\">{_e(r['outputs'].get('predictions'))}</span>"],
            ["errors", f"<span class=\"mono\">{_e(r['outputs'].get('errors'))}</span>"],
            ["manifest", f"<span class=\"mono\">{_e(r['outputs'].get('manifest'))}</span>"],
            *([["known bad", _e(known_bad_line(r))]] if r.get("known_bad") else []),
        ]),
    ]
    drawn = [_plot_or_reason(plot_class_distribution, r["classes"]), _plot_or_reason(plot_confidence_histogram, r["scores"]),
             _plot_or_reason(plot_confusion_matrix, acc)]
    alts = ["class distribution", "confidence histogram", "confusion matrix"]
    parts.append("<h2>Predictions</h2>")
    if any(p for p, _ in drawn):
        parts.append('<div class="plots">' + "".join(f'<img alt="{a}" class="plot" src="{p}">' for (p, _), a in zip(drawn, alts, strict=True) if p) + "</div>")
    elif not any(why for _, why in drawn):
        parts.append("<p class=\"muted\">No predictions in this run.</p>")
    parts += [f'<p class="muted">{_e(a)} not drawn: {_e(why)}</p>' for (_, why), a in zip(drawn, alts, strict=True) if why]
    s = r["scores"]
    parts.append("<h3>Score percentiles</h3>")
    parts.append(_table(["count", "mean", *s["percentiles"].keys()], [[s["count"], _fmt(s["mean"]), *(_fmt(v) for v in s["percentiles"].values())]],
                        numeric=set(range(2 + len(s["percentiles"])))))
    per_class = per_class_lookup(acc)
    cls_rows = []
    for row in r["classes"]:
        pcl = per_class(row["name"])
        cls_rows.append([_e(row["name"]), row["predicted"], f"{row['share']:.1%}"] + ([pcl["support"] if pcl else "–", _fmt(pcl["recall"]) if pcl else "–"] if acc else []))
    parts.append("<h3>Per class</h3>")
    parts.append(_table(["class", "predicted", "share"] + (["in folder", "recall"] if acc else []), cls_rows, numeric={1, 2, 3, 4}))
    if classes_left_out_line(r):
        parts.append(f'<p class="muted">{_e(classes_left_out_line(r))}.</p>')
    if acc and acc["accuracy"] is None:
        parts.append(f"<p>Accuracy {NA}: {_e(acc['reason'])} ({acc['labelled']} labelled images).</p>")
    elif acc:
        how = "by name (folder name = model class name)" if acc["matched_by"] == "name" else "by index (folder class i = model output i)"
        parts.append(f"<p>Accuracy {_fmt(acc['accuracy'], 4)} ({acc['correct']}/{acc['labelled']} labelled images); labels matched {_e(how)}.</p>")
        if normalization_note(acc):
            parts.append(f"<p>Note: {_e(normalization_note(acc))}.</p>")
    parts += drift_html(r.get("drift"))
    # lowest confidence
    parts.append(f"<h2>Least confident predictions ({len(r['lowest_confidence'])})</h2>")
    if r["lowest_confidence"]:
        cells = []
        for item in r["lowest_confidence"]:
            uri, why = thumbs.get(item["image_path"], (None, "not loaded"))
            img = f'<img alt="{_e(item["image_path"])}" src="{uri}">' if uri else f'<div class="na">{_e(why)}</div>'
            lab = item["label_name"]
            verdict = ""
            if lab is not None:
                right = nfc(lab) == nfc(item["pred_label"])
                verdict = f' <span class="{"ok" if right else "wrong"}">(label {_e(lab)})</span>'
            cells.append(f'<div class="thumb">{img}<b>{_e(item["pred_label"])}</b> {item["score"]:.3f}{verdict}<br>'
                         f'<span class="mono muted">{_e(item["image_path"])}</span></div>')
        parts.append('<div class="grid">' + "".join(cells) + "</div>")
    else:
        parts.append("<p class=\"muted\">No predictions.</p>")
    # errors
    er = r["errors"]
    parts.append(f"<h2>Errors ({er['total']})</h2>")
    if er["groups"]:
        parts.append(_table(["stage", "error type", "count", "example paths", "example message"], [
            [_e(g["stage"]), _e(g["error_type"]), g["count"], "<br>".join(f'<span class="mono">{_e(p)}</span>' for p in g["examples"]) or '<span class="muted">(whole batch)</span>', _e(g["message"])]
            for g in er["groups"]
        ], numeric={2}))
    else:
        parts.append("<p class=\"ok\">No errors.</p>")
    sk = r["skipped"]
    if sk["count"]:
        parts.append(f"<h2>Skipped files ({sk['count']})</h2>")
        parts.append(_table(["reason", "files", "examples"], [
            [_e(g["reason"]), g["count"], "<br>".join(f'<span class="mono">{_e(p)}</span>' for p in g["examples"])] for g in sk["by_reason"]
        ], numeric={1}))
    parts.append(f"<p class=\"muted\">imgscore report · model_id <span class=\"mono\">{_e(r['model']['model_id'])}</span></p></body></html>")
    return "\n".join(parts)


def drift_html(d: dict | None) -> list[str]:
    """The "Compared with recent nights" section: warnings, the numbers, two plots."""
    if d is None:
        return []
    out = ["<h2>Compared with recent nights</h2>"]
    if d.get("error"):
        return [*out, f'<p class="muted">Not compared: {_e(d["error"])}</p>']
    if not d["baseline"]["runs"]:
        return [*out, f'<p class="muted">Nothing to compare with: {_e(d.get("reason"))}.</p>']
    n = len(d["baseline"]["runs"])
    out.append(f"<p>{d['current']['images']} predictions against {d['baseline']['images']} from the previous {n} complete "
               f"run{'s' if n != 1 else ''} of this folder and model (<span class=\"mono\">{_e(', '.join(d['baseline']['runs']))}</span>).</p>")
    if d["warnings"]:
        out.append('<ul class="wrong">' + "".join(f"<li>{_e(w)}</li>" for w in d["warnings"]) + "</ul>")
    elif not d["judged"]:
        out.append(f'<p class="muted">Too few images to judge (drift.min_images = {d["thresholds"]["min_images"]}); numbers only.</p>')
    else:
        out.append('<p class="ok">No drift threshold crossed.</p>')
    c, er, emb = d["confidence"], d["error_rate"], d.get("embedding")
    pct = lambda v: "–" if v is None else f"{v:.1%}"  # noqa: E731
    out.append(_table(["measure", "this run", "recent nights", "change"], [
        ["predicted-class PSI", _fmt(d["classes"]["psi"]), "", ""],
        ["mean confidence", _fmt(c["current"]["mean"]), _fmt(c["baseline"]["mean"]), _fmt(c["mean_change"])],
        *[[f"confidence {q}", _fmt(c["current"][q]), _fmt(c["baseline"][q]), ""] for q in ("p10", "p50", "p90")],
        [f"share below {d['thresholds']['low_confidence']}", pct(c["current"]["low_share"]), pct(c["baseline"]["low_share"]), pct(c["low_share_change"])],
        ["error rate", pct(er["current"]), pct(er["baseline"]), pct(er["change"])],
        *([["mean embedding, cosine distance", _fmt(emb["cosine_distance"], 4), "", ""]] if emb else []),
    ], numeric={1, 2, 3}))
    drawn = [_plot_or_reason(plot_class_shift, d), _plot_or_reason(plot_nights, d)]
    alts = ["class shares against recent nights", "recent nights"]
    out.append('<div class="plots">' + "".join(f'<img alt="{a}" class="plot" src="{p}">' for (p, _), a in zip(drawn, alts, strict=True) if p) + "</div>")
    out += [f'<p class="muted">{_e(a)} not drawn: {_e(why)}</p>' for (_, why), a in zip(drawn, alts, strict=True) if why]
    return out


def write_html_report(report: dict, out_root: AnyPath, path: AnyPath | None = None) -> UPath:
    """Render ``report`` with thumbnails and write it atomically; return the path.

    Default path: ``OUT/runs/RUN_ID/report.html`` (``report["outputs"]["report"]``).
    """
    target = path or storage.path(run_dir_of(out_root, report["run_id"]), REPORT_FILE)
    page = render_html(report, thumbnails(report, out_root))
    return write_bytes_atomic(page.encode("utf-8"), target)


# --------------------------------------------------------------------------------------------
# Prefect artifact content


def artifact_key(flow_name: str, kind: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes only, e.g.
    ``artifact_key("score-images", "summary") == "score-images-summary"``.

    Stable per flow, so the UI's Artifacts page shows one history per flow, night over night.
    """
    key = re.sub(r"[^a-z0-9]+", "-", f"{flow_name}-{kind}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", key) or "imgscore"


def summary_row(report: dict) -> list[dict]:
    """One-row table (list of one dict) with the run's counts, for a Prefect table artifact.

    ``accuracy`` is None both for an unlabelled folder and when labels cannot be paired with the
    model's classes (the markdown artifact says why).
    """
    c = report["counts"]
    acc = report["accuracy"]
    return [{
        "run_id": report["run_id"],
        "status": report["status"],
        **{k: c.get(k, 0) for k in ("scanned", "scored", "failed", "skipped", "already_scored", "already_failed")},
        "error_rate": report["error_rate"],
        "images_per_s": report["timing"].get("images_per_s"),
        "wall_s": report["timing"].get("wall_s"),
        "accuracy": round(acc["accuracy"], 6) if acc and acc["accuracy"] is not None else None,
        "devices": ", ".join(report["devices"]),
        "workers": len(report["workers"]),
    }]


def drift_row(report: dict) -> list[dict]:
    """One-row table of the run against recent nights, for a Prefect table artifact (shares and
    rates as fractions); empty when there was nothing to compare with."""
    d = report.get("drift")
    if not d or not (d.get("baseline") or {}).get("runs"):
        return []
    top = (d["classes"]["shifts"] or [None])[0]
    return [{
        "run_id": report["run_id"],
        "baseline_runs": len(d["baseline"]["runs"]),
        "psi": d["classes"]["psi"],
        "largest_shift": f"{top['class']} {top['change']:+.3f}" if top else None,
        "mean_confidence": d["confidence"]["current"]["mean"],
        "baseline_mean_confidence": d["confidence"]["baseline"]["mean"],
        "low_confidence_share": d["confidence"]["current"]["low_share"],
        "error_rate": d["error_rate"]["current"],
        "embedding_cosine_distance": (d.get("embedding") or {}).get("cosine_distance"),
        "warnings": " | ".join(d["warnings"]),
    }]


def _md(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_summary(report: dict, report_path: AnyPath | None) -> str:
    """Markdown for a Prefect markdown artifact: counts, per-class table, error summary, report path."""
    r = report
    c = r["counts"]
    acc = r["accuracy"]
    lines = [
        f"# imgscore run `{r['run_id']}`: {r['status']}",
        "",
        f"**{c['scored']}** scored · **{c['failed']}** failed · {c['skipped']} skipped · {c['already_scored']} already scored · "
        f"{c.get('already_failed', 0)} already failed "
        f"of {c['scanned']} scanned · {_fmt(r['timing'].get('images_per_s'), 1)} images/s · {_fmt(r['timing'].get('wall_s'), 1)} s "
        f"on {', '.join(r['devices']) or '–'}",
        "",
        f"Model `{r['model']['arch']}` `{(r['model']['model_id'] or '')[:12]}` · input `{r['input']['root']}`",
        "",
        *(f"{_md(x)}\n" for x in ending_lines(r)),
        *([f"Known bad: {_md(known_bad_line(r))}", ""] if r.get("known_bad") else []),
    ]
    if acc and acc["accuracy"] is None:
        lines += [f"Accuracy **{NA}**: {_md(acc['reason'])} ({acc['labelled']} labelled)", ""]
    elif acc:
        lines += [f"Accuracy **{acc['accuracy']:.4f}** ({acc['correct']}/{acc['labelled']}, labels matched by {acc['matched_by']})", ""]
        if normalization_note(acc):
            lines += [f"Note: {_md(normalization_note(acc))}.", ""]
    per_class = per_class_lookup(acc)
    lines += ["## Per class", "", "| class | predicted | share |" + (" in folder | recall |" if acc else ""),
              "|---|---:|---:|" + ("---:|---:|" if acc else "")]
    for row in r["classes"]:
        p = per_class(row["name"])
        extra = (f" {p['support']} | {_fmt(p['recall'])} |" if p else " – | – |") if acc else ""
        lines.append(f"| {_md(row['name'])} | {row['predicted']} | {row['share']:.1%} |{extra}")
    d = r.get("drift")
    if d and d.get("baseline", {}).get("runs"):
        lines += ["", f"## Compared with recent nights ({len(d['baseline']['runs'])} runs)", "",
                  f"PSI {_fmt(d['classes']['psi'])} · mean confidence {_fmt(d['confidence']['current']['mean'])} "
                  f"(was {_fmt(d['confidence']['baseline']['mean'])})", ""]
        lines += [f"- **warning**: {_md(w)}" for w in d["warnings"]] or ["No drift threshold crossed."]
    er = r["errors"]
    lines += ["", f"## Errors ({er['total']})", ""]
    if er["groups"]:
        lines += ["| stage | type | count | example |", "|---|---|---:|---|"]
        for g in er["groups"]:
            lines.append(f"| {_md(g['stage'])} | {_md(g['error_type'])} | {g['count']} | `{_md(g['examples'][0]) if g['examples'] else '(whole batch)'}` |")
    else:
        lines.append("No errors.")
    lines += ["", f"Report: `{report_path}`" if report_path else "Report: not written (see the flow run logs)",
              f"Predictions: `{r['outputs'].get('predictions')}`", ""]
    return "\n".join(lines)


def dumps(report: dict) -> str:
    """The report as indented JSON (NaN-free: missing numbers are null)."""
    return json.dumps(report, indent=2, default=str, allow_nan=False)
