"""The report's plots, as ``data:image/svg+xml`` URIs for report.html.

matplotlib's object API (``Figure``, no pyplot): no global backend switch, safe in worker
threads, no display needed. Each plot function returns None when there is nothing to draw.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import numpy as np

from imgscore.report.drift_result import DriftComparison
from imgscore.report.evaluate import MAX_EXTRA_COLUMNS, Confusion
from imgscore.report.model import ClassCount, Drift, ScoreStats
from imgscore.report.stats import MAX_CLASS_ROWS
from imgscore.report.text import fmt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

P = ParamSpec("P")
R = TypeVar("R")


def _literal_text(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a plot function with every text drawn literally: class and file names such as
    ``price_$5_to_$10`` or ``a\\b^c`` are not parsed as math text (``$…$``, ``_``, ``^``) or TeX.
    matplotlib reads ``text.parse_math`` when each Text is made, so the setting covers the whole
    function (building and saving); ``rc_context`` restores it on the way out."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return fn(*args, **kwargs)

    return wrapper


def _svg_data_uri(fig: Figure) -> str:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "imgscore", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@_literal_text
def plot_class_distribution(classes: list[ClassCount]) -> str | None:
    """Horizontal bars of predictions per class; a ``data:image/svg+xml`` URI, None if empty."""
    if not classes or not any(r.predicted for r in classes):
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = [r.name for r in classes][::-1]
    vals = [r.predicted for r in classes][::-1]
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
def plot_confidence_histogram(scores: ScoreStats) -> str | None:
    """Histogram of top-1 probabilities with the median marked; SVG data URI, None if empty."""
    med = scores.percentiles["p50"]
    if not scores.count or med is None:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    edges = np.array(scores.histogram.edges)
    counts = np.array(scores.histogram.counts)
    fig = Figure(figsize=(6.4, 2.8))
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#5a9e6f", edgecolor="white")
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
def plot_class_shift(drift: Drift | None) -> str | None:
    """Paired bars of each class's share, baseline vs tonight (classes that moved most first);
    SVG data URI, None without a comparison."""
    if not isinstance(drift, DriftComparison) or not drift.classes.shifts:
        return None
    from matplotlib.figure import Figure

    rows = drift.classes.shifts[::-1]
    y = np.arange(len(rows))
    fig = Figure(figsize=(6.4, max(1.8, 0.42 * len(rows) + 0.9)))
    ax = fig.add_subplot()
    ax.barh(y + 0.2, [r.baseline_share for r in rows], height=0.4, color="#9aa5b1", label="recent nights")
    ax.barh(y - 0.2, [r.share for r in rows], height=0.4, color="#3b6ea8", label="this run")
    ax.set_yticks(y, [r.class_name[:28] for r in rows], fontsize=8)
    ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.set_xlabel("share of predictions")
    ax.set_title(f"Classes that moved most (PSI {fmt(drift.classes.psi)})", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg_data_uri(fig)


@_literal_text
def plot_nights(drift: Drift | None) -> str | None:
    """Mean confidence, share below the low-confidence threshold and error rate per night,
    oldest first, this run last; SVG data URI, None without a comparison."""
    nights = drift.nights if isinstance(drift, DriftComparison) else []
    if len(nights) < 2:
        return None
    from matplotlib.figure import Figure

    x = np.arange(len(nights))
    fig = Figure(figsize=(6.4, 2.8))
    ax = fig.add_subplot()
    for key, label, color in (
        ("mean_confidence", "mean confidence", "#5a9e6f"),
        ("low_share", "share below threshold", "#c0392b"),
        ("error_rate", "error rate", "#7f8c8d"),
    ):
        values = [getattr(n, key) for n in nights]
        ax.plot(x, [np.nan if v is None else v for v in values], marker="o", color=color, label=label)
    ax.set_xticks(
        x,
        [("this run" if i == len(nights) - 1 else str(n.created_at or n.run_id)[:10]) for i, n in enumerate(nights)],
        fontsize=7,
        rotation=30,
        ha="right",
    )
    ax.set_ylim(0, 1)
    ax.set_title("Recent nights", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="best")
    ax.spines[["top", "right"]].set_visible(False)
    return _svg_data_uri(fig)


def _bounded_matrix(
    rows: list[str], cols: list[str], matrix: list[list[int]], paired: bool, max_rows: int = MAX_CLASS_ROWS
) -> tuple[list[str], list[str], np.ndarray, int]:
    """The confusion matrix as drawn: at most ``max_rows`` rows (the folder classes with the most
    images, in label order) and the columns those rows use (their own class first when labels
    are ``paired``), the rest summed into ``(other)``. Returns (rows, columns, matrix float
    [R, C], rows left out). Drawing cost grows with rows × columns: 10,000 classes took minutes."""
    mat = np.array(matrix, dtype=float).reshape(len(rows), len(cols))
    if len(rows) <= max_rows and len(cols) <= max_rows + MAX_EXTRA_COLUMNS:
        return list(rows), list(cols), mat, 0
    keep = np.sort(np.argsort(-mat.sum(axis=1), kind="stable")[:max_rows])
    sub = mat[keep]
    used = sub.sum(axis=0)
    own = list(keep) if paired else []  # paired: row i's own class is column i
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
def plot_confusion_matrix(conf: Confusion | None) -> str | None:
    """Heat map of the confusion matrix (rows: folder labels, columns: predictions); SVG data URI.

    With ``matched_by == "none"`` it is a plain label × prediction count table, titled as such
    (accuracy n/a), since no cell means "correct".
    """
    if not conf:
        return None
    from matplotlib.figure import Figure

    rows, cols, mat, left_out = _bounded_matrix(conf.rows, conf.columns, conf.matrix, conf.matched_by != "none")
    norm = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)  # row-normalised: recall on the diagonal
    w = min(11.0, 1.6 + 0.42 * len(cols))
    h = min(11.0, 1.4 + 0.42 * len(rows))
    fig = Figure(figsize=(max(w, 3.6), max(h, 2.6)))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    wide = len(cols) > 6
    ax.set_xticks(
        range(len(cols)),
        [c[:16] for c in cols],
        rotation=60 if wide else 0,
        ha="right" if wide else "center",
        fontsize=8,
    )
    ax.set_yticks(range(len(rows)), [r[:20] for r in rows], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("folder label")
    more = f"; the {len(rows)} largest of {len(rows) + left_out} classes" if left_out else ""
    if conf.accuracy is None:
        ax.set_title(f"Folder label vs prediction (accuracy n/a: classes do not match{more})", fontsize=10)
    else:
        ax.set_title(
            f"Confusion matrix (accuracy {conf.accuracy:.3f}, matched by {conf.matched_by}{more})", fontsize=10
        )
    if len(rows) * len(cols) <= 400:
        for i in range(len(rows)):
            for j in range(len(cols)):
                if mat[i, j]:
                    ax.text(
                        j,
                        i,
                        str(int(mat[i, j])),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.6 else "#222",
                    )
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of row")
    return _svg_data_uri(fig)
