"""``imgscore report RUN_ID [--config FILE] [--set K=V]... [--format table|json|html]``.

``table`` prints rich tables on the terminal (``imgscore.report.terminal``), ``json`` prints the
report (``imgscore.report.build.build_report``) on stdout, ``html`` (re)writes
``OUT/runs/RUN_ID/report.html`` and prints its path. ``OUT`` is ``output.root`` from the config
and overrides (default ``outputs``). Exit 0 when the report was produced, whatever the run's own
status; 2 when the run is not there (one line naming the run and the runs that are).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

PIPED_WIDTH = 400  # columns when not a terminal: tables are as wide as their content, at most this


def main(args: argparse.Namespace) -> int:
    """Entry point for ``imgscore report`` (``args``: run_id, format, config, overrides, model_name)."""
    from imgscore.config.loading import load_config
    from imgscore.io import object_store
    from imgscore.report.build import build_report
    from imgscore.report.html import write_html_report
    from imgscore.report.model import dumps
    from imgscore.report.terminal import print_report

    cfg = load_config(args.config, args.overrides)
    object_store.configure(cfg.storage.settings())
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


def report_console() -> Console:
    """A rich Console for the report: the terminal's width on a terminal; piped to a file or a
    pager, wide enough that no path or message is wrapped mid-word (rich's default is 80 columns)."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_WIDTH)
