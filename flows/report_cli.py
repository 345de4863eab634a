"""``imgscore report RUN_ID [--config FILE] [--set K=V]... [--format table|json|html]``.

``table`` prints rich tables on the terminal, ``json`` prints the report dict
(``imgscore.report.build.build_report``) on stdout, ``html`` (re)writes ``OUT/runs/RUN_ID/report.html``
and prints its path. ``OUT`` is ``output.root`` from the config and overrides (default
``outputs``). Exit 0 when the report was produced, whatever the run's own status; 2 when the
run is not there (one line naming the run and the runs that are).
"""

from __future__ import annotations

import sys


def print_report(report: dict, console) -> None:
    """The report as rich tables: counts, run facts, per-class counts, scores, errors.

    Accuracy shows as ``n/a: <reason>`` when the folder's classes cannot be paired with the
    model's (``report["accuracy"]["accuracy"] is None``; see ``imgscore.report.evaluate``), and is left
    out for an unlabelled folder.
    """
    from rich.table import Table

    from imgscore.report.build import (
        classes_left_out_line,
        ending_lines,
        known_bad_line,
        normalization_note,
        per_class_lookup,
    )

    r = report
    c = r["counts"]
    t = r["timing"]
    acc = r["accuracy"]
    head = Table(show_header=False, box=None, pad_edge=False, title=f"run {r['run_id']}", title_justify="left")
    head.add_column(no_wrap=True, style="bold")
    head.add_column(overflow="fold")
    rows = [
        ("status", r["status"]),
        *(("", line) for line in ending_lines(r)),
        *((k, c[k]) for k in ("scanned", "scored", "failed", "skipped", "already_scored", "already_failed", "pending")),
        *((("known_bad", known_bad_line(r)),) if r.get("known_bad") else ()),
        ("error_rate", f"{r['error_rate']:.4%}"),
        ("wall_s", t.get("wall_s")),
        ("images_per_s", t.get("images_per_s")),
        *((("pairs_per_s", t.get("pairs_per_s")),) if r.get("models") and t.get("pairs_per_s") is not None else ()),
        ("devices", ", ".join(r["devices"]) or "-"),
        ("workers", f"{len(r['workers'])} ({', '.join(r['workers'][:4])}{' …' if len(r['workers']) > 4 else ''})"),
        ("shards", ", ".join(f"{k} {v}" for k, v in r["shards"].items())),
        ("model", f"{r['model']['arch']} {(r['model']['model_id'] or '')[:12]}"),
        ("input", r["input"]["root"]),
    ]
    if r.get("models"):  # several models: counts are pairs; the rest describes one model
        rows.append(("models", "; ".join(f"{x['name']}: {x['scored']} scored, {x['failed']} failed" for x in r["models"])
                     + f" (below: {r['model'].get('name')})"))
    if acc and acc["accuracy"] is None:  # labels cannot be paired with the model's classes
        rows.append(("accuracy", f"n/a: {acc['reason']} ({acc['labelled']} labelled)"))
    elif acc:
        rows.append(("accuracy", f"{acc['accuracy']:.4f} ({acc['correct']}/{acc['labelled']}, matched by {acc['matched_by']})"))
        if normalization_note(acc):
            rows.append(("note", normalization_note(acc)))
    d = r.get("drift")
    if d and d.get("baseline", {}).get("runs"):
        rows.append(("drift", f"PSI {d['classes']['psi']} against {len(d['baseline']['runs'])} recent run(s); "
                              f"mean confidence {d['confidence']['current']['mean']} (was {d['confidence']['baseline']['mean']})"))
        rows += [("drift", f"warning: {w}") for w in d["warnings"]]
    rows.append(("report", r["outputs"].get("report") or f"not written yet: imgscore report {r['run_id']} --format html writes it"))
    for k, v in rows:
        head.add_row(k, "-" if v is None else str(v))
    console.print(head)

    per_class = per_class_lookup(acc)
    ct = Table(title="predictions per class", title_justify="left")
    ct.add_column("class")
    ct.add_column("predicted", justify="right")
    ct.add_column("share", justify="right")
    if acc:
        ct.add_column("in folder", justify="right")
        ct.add_column("recall", justify="right")
    for row in r["classes"]:
        cells = [row["name"], str(row["predicted"]), f"{row['share']:.1%}"]
        if acc:
            p = per_class(row["name"])
            cells += [str(p["support"]), "-" if p["recall"] is None else f"{p['recall']:.3f}"] if p else ["-", "-"]
        ct.add_row(*cells)
    console.print(ct)
    if classes_left_out_line(r):
        console.print(classes_left_out_line(r), highlight=False, markup=False)

    s = r["scores"]
    st = Table(title="top-1 score (probability)", title_justify="left", box=None, pad_edge=False)
    for k in ("count", "mean", *s["percentiles"]):
        st.add_column(k, justify="right", min_width=5, no_wrap=True)
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    st.add_row(fmt(s["count"]), fmt(s["mean"]), *(fmt(v) for v in s["percentiles"].values()))
    console.print(st)

    er = r["errors"]
    if er["groups"]:
        et = Table(title=f"errors ({er['total']})", title_justify="left")
        for col in ("stage", "error type", "count", "examples"):
            et.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
        for g in er["groups"]:
            et.add_row(g["stage"], g["error_type"], str(g["count"]), "\n".join(g["examples"]) or "(whole batch)")
        console.print(et)
    else:
        console.print("errors: none")
    sk = r["skipped"]
    if sk.get("by_reason"):
        kt = Table(title=f"skipped files ({sk['count']})", title_justify="left")
        for col in ("reason", "files", "examples"):
            kt.add_column(col, justify="right" if col == "files" else "left", overflow="fold")
        for g in sk["by_reason"]:
            kt.add_row(g["reason"], str(g["count"]), "\n".join(g["examples"]))
        console.print(kt)


def main(args) -> int:
    """Entry point for ``imgscore report`` (``args``: run_id, format, config, overrides, model_name)."""
    from imgscore.config.loading import load_config
    from imgscore.io import storage
    from imgscore.report.build import build_report, dumps, write_html_report

    cfg = load_config(args.config, args.overrides)
    storage.configure(cfg.storage.settings())
    out_root = cfg.output.root
    report = build_report(out_root, args.run_id, model_name=getattr(args, "model_name", None))
    if args.format == "json":
        sys.stdout.write(dumps(report) + "\n")
    elif args.format == "html":
        path = write_html_report(report, out_root)
        print(path)
    else:
        print_report(report, report_console())
    return 0


def report_console():
    """A rich Console for the report: the terminal's width on a terminal; piped to a file or a
    pager, wide enough that no path or message is wrapped mid-word (rich's default is 80 columns)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=PIPED_WIDTH)


PIPED_WIDTH = 400  # columns when not a terminal: tables are as wide as their content, at most this
