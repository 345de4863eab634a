"""report.html: the report as one self-contained page, rendered from the Jinja2 template
``templates/report.html.j2``: inline CSS, plots as base64 SVG (:mod:`imgscore.report.plots`),
thumbnails as base64 JPEG (:mod:`imgscore.report.thumbnails`), no scripts, nothing fetched.

:func:`write_html_report` writes it to ``OUT/runs/RUN_ID/report.html``; it is called at the end
of every run and by ``imgscore report --format html``.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from functools import cache
from typing import NamedTuple, TypeVar

import jinja2
from markupsafe import Markup
from upath import UPath

from imgscore.io import storage
from imgscore.io.parquet import write_bytes_atomic
from imgscore.io.storage import AnyPath
from imgscore.report import plots
from imgscore.report.drift_result import DriftComparison, NoBaseline
from imgscore.report.evaluate import nfc
from imgscore.report.model import REPORT_FILE, NotCompared, Report
from imgscore.report.text import NA, fmt, one_line
from imgscore.report.thumbnails import Thumbnail, thumbnails
from imgscore.runstate.commits import run_dir_of

T = TypeVar("T")


class Plot(NamedTuple):
    """A plot on the page: its alt text, and its SVG data URI or why it was not drawn."""

    alt: str
    uri: str | None
    reason: str | None


def _plot(alt: str, draw: Callable[[T], str | None], data: T) -> Plot:
    """A plot that cannot be drawn costs its own image (the reason is shown), never the report."""
    try:
        return Plot(alt, draw(data), None)
    except Exception as exc:
        return Plot(alt, None, one_line(exc))


def _escape(value: object) -> Markup:
    """What ``{{ value }}`` prints: the text HTML-escaped with :func:`html.escape`, so quotes are
    ``&quot;`` and ``&#x27;`` (markupsafe's own escaping writes ``&#34;`` and ``&#39;``): one
    spelling for every escaped value on the page. None prints nothing; Markup (a macro's output)
    is already escaped. Autoescape stays on behind this."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("imgscore.report", "templates"),
        autoescape=True,
        finalize=_escape,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(fmt=fmt, pyfmt=format, nfc=nfc)
    env.tests.update(
        comparison=lambda d: isinstance(d, DriftComparison),
        no_baseline=lambda d: isinstance(d, NoBaseline),
        not_compared=lambda d: isinstance(d, NotCompared),
    )
    env.globals["NA"] = NA
    return env


def _cards(r: Report) -> list[tuple[str, object]]:
    """The row of big numbers at the top: (label, value)."""
    c, t = r.counts, r.timing
    cards: list[tuple[str, object]] = [
        ("scanned", c.scanned),
        ("scored", c.scored),
        ("failed", c.failed),
        ("skipped", c.skipped),
        ("already scored", c.already_scored),
        ("already failed", c.already_failed),
        ("images/s", fmt(t.images_per_s, 1)),
        ("wall s", fmt(t.wall_s, 1)),
    ]
    if r.accuracy:
        cards.append(("accuracy", NA if r.accuracy.accuracy is None else fmt(r.accuracy.accuracy, 4)))
    return cards


def _drift_rows(d: DriftComparison) -> list[list[str]]:
    """The "Compared with recent nights" table: measure, this run, recent nights, change."""
    c, er = d.confidence, d.error_rate

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v:.1%}"

    rows = [
        ["predicted-class PSI", fmt(d.classes.psi), "", ""],
        ["mean confidence", fmt(c.current.mean), fmt(c.baseline.mean), fmt(c.mean_change)],
        *[
            [f"confidence {q}", fmt(getattr(c.current, q)), fmt(getattr(c.baseline, q)), ""]
            for q in ("p10", "p50", "p90")
        ],
        [
            f"share below {d.thresholds.low_confidence}",
            pct(c.current.low_share),
            pct(c.baseline.low_share),
            pct(c.low_share_change),
        ],
        ["error rate", pct(er.current), pct(er.baseline), pct(er.change)],
    ]
    if d.embedding:
        rows.append(["mean embedding, cosine distance", fmt(d.embedding.cosine_distance, 4), "", ""])
    return rows


def render_html(report: Report, thumbs: dict[str, Thumbnail] | None = None) -> str:
    """The report as one self-contained HTML page (inline CSS, plots and thumbnails as data URIs).

    ``thumbs`` maps image_path → :class:`~imgscore.report.thumbnails.Thumbnail` as
    :func:`~imgscore.report.thumbnails.thumbnails` returns them; missing entries show a
    placeholder. All text from the run (class and file names, messages) is HTML-escaped.
    """
    r = report
    d = r.drift if isinstance(r.drift, DriftComparison) else None
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            r=r,
            status=r.status or "unknown",
            thumbs=thumbs or {},
            cards=_cards(r),
            models_line=" · ".join(f"{x.name} ({x.arch}, {x.scored} scored, {x.failed} failed)" for x in r.models),
            prediction_plots=[
                _plot("class distribution", plots.plot_class_distribution, r.classes),
                _plot("confidence histogram", plots.plot_confidence_histogram, r.scores),
                _plot("confusion matrix", plots.plot_confusion_matrix, r.accuracy),
            ],
            drift_rows=_drift_rows(d) if d else [],
            drift_plots=[
                _plot("class shares against recent nights", plots.plot_class_shift, d),
                _plot("recent nights", plots.plot_nights, d),
            ]
            if d
            else [],
        )
    )


def write_html_report(report: Report, out_root: AnyPath, path: AnyPath | None = None) -> UPath:
    """Render ``report`` with thumbnails and write it atomically; return the path.

    Default path: ``OUT/runs/RUN_ID/report.html``.

    Raises:
        OSError: the page could not be written. UnsafePathError: the run's index names a file
            outside the input root.
    """
    target = path or storage.path(run_dir_of(out_root, report.run_id), REPORT_FILE)
    page = render_html(report, thumbnails(report, out_root))
    return write_bytes_atomic(page.encode("utf-8"), target)
