"""The Prefect artifacts' content (no Prefect here: :mod:`imgscore.flows.artifacts` publishes it):
the markdown summary, the one-row tables of counts and of drift, and the artifact keys."""

from __future__ import annotations

import re

from imgscore.io.storage import AnyPath
from imgscore.report.drift_result import DriftComparison
from imgscore.report.model import Report
from imgscore.report.text import NA, fmt


def artifact_key(flow_name: str, kind: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes only, e.g.
    ``artifact_key("score-images", "summary") == "score-images-summary"``.

    Stable per flow, so the UI's Artifacts page shows one history per flow, night over night.
    """
    key = re.sub(r"[^a-z0-9]+", "-", f"{flow_name}-{kind}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", key) or "imgscore"


def summary_row(report: Report) -> list[dict]:
    """One-row table (list of one dict) with the run's counts, for a Prefect table artifact.

    ``accuracy`` is None both for an unlabelled folder and when labels cannot be paired with the
    model's classes (the markdown artifact says why).
    """
    c = report.counts
    acc = report.accuracy
    return [
        {
            "run_id": report.run_id,
            "status": report.status,
            **{
                k: getattr(c, k) for k in ("scanned", "scored", "failed", "skipped", "already_scored", "already_failed")
            },
            "error_rate": report.error_rate,
            "images_per_s": report.timing.images_per_s,
            "wall_s": report.timing.wall_s,
            "accuracy": round(acc.accuracy, 6) if acc and acc.accuracy is not None else None,
            "devices": ", ".join(report.devices),
            "workers": len(report.workers),
        }
    ]


def drift_row(report: Report) -> list[dict]:
    """One-row table of the run against recent nights, for a Prefect table artifact (shares and
    rates as fractions); empty when there was nothing to compare with."""
    d = report.drift
    if not isinstance(d, DriftComparison):
        return []
    top = d.classes.shifts[0] if d.classes.shifts else None
    return [
        {
            "run_id": report.run_id,
            "baseline_runs": len(d.baseline.runs),
            "psi": d.classes.psi,
            "largest_shift": f"{top.class_name} {top.change:+.3f}" if top else None,
            "mean_confidence": d.confidence.current.mean,
            "baseline_mean_confidence": d.confidence.baseline.mean,
            "low_confidence_share": d.confidence.current.low_share,
            "error_rate": d.error_rate.current,
            "embedding_cosine_distance": d.embedding.cosine_distance if d.embedding else None,
            "warnings": " | ".join(d.warnings),
        }
    ]


def _md(v: object) -> str:
    """Text safe in a markdown table cell: no ``|`` column break, no line break."""
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_summary(report: Report, report_path: AnyPath | None) -> str:
    """Markdown for a Prefect markdown artifact: counts, accuracy, per-class table, drift, error
    summary, and where report.html is (``report_path``; None: it could not be written)."""
    r = report
    c, t = r.counts, r.timing
    lines = [
        f"# imgscore run `{r.run_id}`: {r.status}",
        "",
        f"**{c.scored}** scored · **{c.failed}** failed · {c.skipped} skipped · "
        f"{c.already_scored} already scored · {c.already_failed} already failed "
        f"of {c.scanned} scanned · {fmt(t.images_per_s, 1)} images/s · {fmt(t.wall_s, 1)} s "
        f"on {', '.join(r.devices) or '–'}",
        "",
        f"Model `{r.model.arch}` `{(r.model.model_id or '')[:12]}` · input `{r.input.root}`",
        "",
        *(f"{_md(x)}\n" for x in r.ending_lines()),
        *([f"Known bad: {_md(r.known_bad.line())}", ""] if r.known_bad else []),
    ]
    lines += _accuracy_lines(r)
    lines += _per_class_lines(r)
    d = r.drift
    if isinstance(d, DriftComparison):
        lines += [
            "",
            f"## Compared with recent nights ({len(d.baseline.runs)} runs)",
            "",
            f"PSI {fmt(d.classes.psi)} · mean confidence {fmt(d.confidence.current.mean)} "
            f"(was {fmt(d.confidence.baseline.mean)})",
            "",
        ]
        lines += [f"- **warning**: {_md(w)}" for w in d.warnings] or ["No drift threshold crossed."]
    er = r.errors
    lines += ["", f"## Errors ({er.total})", ""]
    if er.groups:
        lines += ["| stage | type | count | example |", "|---|---|---:|---|"]
        for g in er.groups:
            example = _md(g.examples[0]) if g.examples else "(whole batch)"
            lines.append(f"| {_md(g.stage)} | {_md(g.error_type)} | {g.count} | `{example}` |")
    else:
        lines.append("No errors.")
    lines += [
        "",
        f"Report: `{report_path}`" if report_path else "Report: not written (see the flow run logs)",
        f"Predictions: `{r.outputs.get('predictions')}`",
        "",
    ]
    return "\n".join(lines)


def _accuracy_lines(r: Report) -> list[str]:
    acc = r.accuracy
    if acc is None:
        return []
    if acc.accuracy is None:
        return [f"Accuracy **{NA}**: {_md(acc.reason)} ({acc.labelled} labelled)", ""]
    lines = [f"Accuracy **{acc.accuracy:.4f}** ({acc.correct}/{acc.labelled}, labels matched by {acc.matched_by})", ""]
    note = acc.normalization_note()
    return lines + ([f"Note: {_md(note)}.", ""] if note else [])


def _per_class_lines(r: Report) -> list[str]:
    acc = r.accuracy
    lines = [
        "## Per class",
        "",
        "| class | predicted | share |" + (" in folder | recall |" if acc else ""),
        "|---|---:|---:|" + ("---:|---:|" if acc else ""),
    ]
    for row in r.classes:
        extra = ""
        if acc:
            p = acc.per_class_of(row.name)
            extra = f" {p.support} | {fmt(p.recall)} |" if p else " – | – |"
        lines.append(f"| {_md(row.name)} | {row.predicted} | {row.share:.1%} |{extra}")
    return lines
