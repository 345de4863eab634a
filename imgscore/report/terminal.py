"""The report on the terminal: rich tables for ``imgscore report RUN_ID`` (``--format table``)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from imgscore.report.drift_result import DriftComparison
from imgscore.report.model import Report


def print_report(report: Report, console: Console) -> None:
    """The report as rich tables: counts and run facts, per-class counts, scores, errors, skipped files.

    Accuracy shows as ``n/a: <reason>`` when the folder's classes cannot be paired with the
    model's (see :mod:`imgscore.report.evaluate`), and is left out for an unlabelled folder.
    """
    console.print(_head(report))
    console.print(_per_class(report))
    if report.classes_left_out:
        console.print(report.classes_left_out.line(), highlight=False, markup=False)
    console.print(_scores(report))
    er = report.errors
    if er.groups:
        et = Table(title=f"errors ({er.total})", title_justify="left")
        for col in ("stage", "error type", "count", "examples"):
            et.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
        for g in er.groups:
            et.add_row(g.stage, g.error_type, str(g.count), "\n".join(g.examples) or "(whole batch)")
        console.print(et)
    else:
        console.print("errors: none")
    sk = report.skipped
    if sk.by_reason:
        kt = Table(title=f"skipped files ({sk.count})", title_justify="left")
        for col in ("reason", "files", "examples"):
            kt.add_column(col, justify="right" if col == "files" else "left", overflow="fold")
        for s in sk.by_reason:
            kt.add_row(s.reason, str(s.count), "\n".join(map(str, s.examples)))
        console.print(kt)


def _head(r: Report) -> Table:
    """The run: status and how it ended, counts, throughput, devices, model, accuracy, drift, report path."""
    c, t, acc = r.counts, r.timing, r.accuracy
    rows: list[tuple[str, object]] = [
        ("status", r.status),
        *(("", line) for line in r.ending_lines()),
        *(
            (k, getattr(c, k))
            for k in ("scanned", "scored", "failed", "skipped", "already_scored", "already_failed", "pending")
        ),
        *((("known_bad", r.known_bad.line()),) if r.known_bad else ()),
        ("error_rate", f"{r.error_rate:.4%}"),
        ("wall_s", t.wall_s),
        ("images_per_s", t.images_per_s),
        *((("pairs_per_s", t.pairs_per_s),) if r.models and t.pairs_per_s is not None else ()),
        ("devices", ", ".join(r.devices) or "-"),
        ("workers", f"{len(r.workers)} ({', '.join(r.workers[:4])}{' …' if len(r.workers) > 4 else ''})"),
        ("shards", ", ".join(f"{k} {v}" for k, v in r.shards.items())),
        ("model", f"{r.model.arch} {(r.model.model_id or '')[:12]}"),
        ("input", r.input.root),
    ]
    if r.models:  # several models: counts are pairs; the rest describes one model
        rows.append(
            (
                "models",
                "; ".join(f"{x.name}: {x.scored} scored, {x.failed} failed" for x in r.models)
                + f" (below: {r.model.name})",
            )
        )
    if acc and acc.accuracy is None:  # labels cannot be paired with the model's classes
        rows.append(("accuracy", f"n/a: {acc.reason} ({acc.labelled} labelled)"))
    elif acc:
        rows.append(("accuracy", f"{acc.accuracy:.4f} ({acc.correct}/{acc.labelled}, matched by {acc.matched_by})"))
        if acc.normalization_note():
            rows.append(("note", acc.normalization_note()))
    d = r.drift
    if isinstance(d, DriftComparison):
        rows.append(
            (
                "drift",
                f"PSI {d.classes.psi} against {len(d.baseline.runs)} recent run(s); "
                f"mean confidence {d.confidence.current.mean} (was {d.confidence.baseline.mean})",
            )
        )
        rows += [("drift", f"warning: {w}") for w in d.warnings]
    rows.append(
        ("report", r.outputs.get("report") or f"not written yet: imgscore report {r.run_id} --format html writes it")
    )
    head = Table(show_header=False, box=None, pad_edge=False, title=f"run {r.run_id}", title_justify="left")
    head.add_column(no_wrap=True, style="bold")
    head.add_column(overflow="fold")
    for k, v in rows:
        head.add_row(k, "-" if v is None else str(v))
    return head


def _per_class(r: Report) -> Table:
    """Predictions per model class, with each one's folder class support and recall when labelled."""
    acc = r.accuracy
    ct = Table(title="predictions per class", title_justify="left")
    ct.add_column("class")
    ct.add_column("predicted", justify="right")
    ct.add_column("share", justify="right")
    if acc:
        ct.add_column("in folder", justify="right")
        ct.add_column("recall", justify="right")
    for row in r.classes:
        cells = [row.name, str(row.predicted), f"{row.share:.1%}"]
        if acc:
            p = acc.per_class_of(row.name)
            cells += [str(p.support), "-" if p.recall is None else f"{p.recall:.3f}"] if p else ["-", "-"]
        ct.add_row(*cells)
    return ct


def _scores(r: Report) -> Table:
    """Top-1 score count, mean and percentiles."""
    s = r.scores
    st = Table(title="top-1 score (probability)", title_justify="left", box=None, pad_edge=False)
    for k in ("count", "mean", *s.percentiles):
        st.add_column(k, justify="right", min_width=5, no_wrap=True)

    def fmt(v: float | int | None) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    st.add_row(fmt(s.count), fmt(s.mean), *(fmt(v) for v in s.percentiles.values()))
    return st
