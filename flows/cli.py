"""``imgscore``: run, rerun, report, config, demo, serve.

Exit codes (docs/getting-started.md, "Score your own folder"): 0 finished within the error
budget; 1 over budget, a shard failed or a write failed (everything that could be scored is
written); 2 bad usage, config, input root or model — refused before any scoring, one line naming
the bad value and the fix, no traceback; 130 interrupted by Ctrl-C (SIGINT), 143 terminated
(SIGTERM) — the manifest says ``interrupted`` and the line printed names the ``imgscore rerun``
command that finishes the run.

:func:`main` enters :func:`imgscore.runtime.startup.session` once; each command then does its cheap
checks first (a typo fails in well under a second, before torch or Prefect is imported), starts
the temporary Prefect server, loads the model while the server boots, and imports its Prefect
side through the session. Importing this module imports neither Prefect nor torch
(tests/test_startup.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from pathlib import Path

from imgscore.config.flow_params import flow_parameters
from imgscore.config.loading import load_config, shipped_config
from imgscore.config.rerun import out_root_of, rerun_config
from imgscore.config.schema import Config
from imgscore.errors import (
    ImgscoreError,
    UsageError,
)
from imgscore.flows.outcome import Terminated, catch_sigterm, fail, flow_outcome, interrupted, restore_sigterm
from imgscore.flows.preflight import (
    check_paths,
    check_rerun,
    check_run_id_arg,
    configure_storage,
    load_model_here,
    notify_refusal,
)
from imgscore.images.scan import output_within_input
from imgscore.io import storage
from imgscore.runstate.commits import (
    adopt_committed,
    check_run_state,
    plan_rerun,
    run_dir_of,
)
from imgscore.runstate.state import load_manifest
from imgscore.runtime import startup
from imgscore.runtime.compat import run_exit_handlers
from imgscore.runtime.progress import progress_for

DEMO_CONFIG = shipped_config("demo.yaml")  # package data: a wheel install finds it from any folder


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    p = argparse.ArgumentParser(
        prog="imgscore", description="Batch-score image folders with torchvision models (Prefect 3, Parquet out)."
    )
    p.add_argument("--version", action="version", version=f"imgscore {version('imgscore')}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--config", type=Path, help="YAML config: a file, or a config shipped with imgscore by name (demo, nightly)"
        )
        sp.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set input.root=/data/images (repeatable)",
        )
        sp.add_argument("--verbose", "-v", action="store_true", help="show Prefect's logs and per-image detail")
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    keys = "every config key, its default and meaning: imgscore config"
    run = sub.add_parser("run", help="score a folder (flow score-images)", epilog=keys)
    common(run)
    rerun = sub.add_parser(
        "rerun", help="rescore a run's failed and unfinished shards (flow rerun-failed)", epilog=keys
    )
    rerun.add_argument("run_id", help="the run's folder name under output.root/runs (printed by imgscore run)")
    common(rerun)
    rep = sub.add_parser("report", help="summarise a finished run")
    rep.add_argument("run_id", help="the run's folder name under output.root/runs (printed by imgscore run)")
    rep.add_argument("--format", choices=["table", "json", "html"], default="table")
    rep.add_argument(
        "--model",
        dest="model_name",
        default=None,
        metavar="NAME",
        help="a run of several models: the model whose images the report describes (default: the first)",
    )
    common(rep)
    conf = sub.add_parser("config", help="list every config key with its default and meaning (from the config models)")
    conf.add_argument("--format", choices=["table", "markdown"], default="table")
    demo = sub.add_parser("demo", help="build the digits demo (real scans, a model trained here) and score it")
    common(demo)
    serve = sub.add_parser("serve", help="serve the scoring flow on a cron schedule from this process (flow.serve)")
    common(serve)
    serve.add_argument("--cron", default="0 2 * * *", help="cron expression (default: 0 2 * * *, nightly at 02:00)")
    serve.add_argument("--timezone", default="UTC", help="IANA timezone of the cron schedule (default: UTC)")
    serve.add_argument("--name", default="nightly-scoring", help="deployment name")
    return p


def _console(console=None):
    from rich.console import Console

    return console or Console()


def start_dask_early(cfg: Config, session: startup.Session):
    """``runner.type=dask`` without ``runner.address`` (and ``runner.warm_workers``): start the
    run's ``LocalCluster`` now, in the background, its workers warming up for the model while
    this process imports torch and loads it (:mod:`imgscore.runtime.dask_warm`); the flow's task
    runner connects to it. Returns a context manager that stops it (a null one otherwise)."""
    if cfg.runner.type != "dask" or cfg.runner.address or not cfg.runner.warm_workers:
        return contextlib.nullcontext()
    from imgscore.runtime import dask_warm

    return dask_warm.early_cluster(cfg, session.export_api_url)


def execute(
    cfg: Config, *, quiet: bool = False, console=None, session: startup.Session | None = None
) -> tuple[int, dict]:
    """Run the scoring flow for a validated config; return (exit code, summary).

    ``session``: the command's (it waits for its temporary server); None from Python code and
    tests, where Prefect finds its API as usual.
    """
    from imgscore.runstate.plan import new_run_id

    flows = (session or startup.Session(manage_server=False)).import_prefect("imgscore.flows.score_images")
    console = _console(console)
    if cfg.run.run_id is None:
        cfg.run.run_id = new_run_id()
    console.print(banner(cfg), soft_wrap=True)
    if cfg.input.root is not None and output_within_input(cfg.input.root, cfg.output.root):
        console.print(
            f"output.root {cfg.output.root} is inside input.root: it is left out of the scan",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
    try:
        with progress_for(console, enabled=not quiet), flow_parameters(cfg) as params:  # a large config: as a file
            state = flows.score_images(**params, return_state=True)
    except (KeyboardInterrupt, Terminated) as exc:
        return interrupted(cfg.run.run_id, cfg.output.root, exc), {}
    return flow_outcome(state, console, f"run {cfg.run.run_id}")


def banner(cfg: Config) -> str:
    """The run's first line (rich markup): run id, the folder (absolute and normalised,
    ``/data/imgscore/../scratch/big`` → ``/data/scratch/big``; a URL as configured), models, runner."""
    from rich.markup import escape

    root = storage.absolute(cfg.input.root) if cfg.input.root is not None else str(None)
    names = ", ".join(m.resolved_name for m in cfg.scored_models())
    return (
        f"[bold]run {escape(str(cfg.run.run_id))}[/]: scoring {escape(root)} with {escape(names)} "
        f"({cfg.runner.type} runner) …"
    )


def cmd_run(args, session: startup.Session) -> int:
    cfg = load_config(args.config, args.overrides)
    with notify_refusal(cfg):
        check_paths(cfg)
    session.start_server()  # boots beside torch's import and the model load
    with start_dask_early(cfg, session):  # a Dask cluster warms up beside them too
        with notify_refusal(cfg):
            load_model_here(cfg)
        code, _ = execute(cfg, quiet=args.quiet, session=session)
    return code


def cmd_demo(args, session: startup.Session) -> int:
    from imgscore.demo import build_digits_folder, train_demo_model
    from imgscore.report.evaluate import accuracy_of_run

    console = _console()
    cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
    checkpoint = cfg.model.checkpoint
    if checkpoint is None or isinstance(checkpoint, str):  # unset, or a URL (a local file is a Path)
        raise UsageError(
            "imgscore demo trains its model into model.checkpoint, which must be a local file; "
            "set it to one (demo.yaml does)"
        )
    demo_dir = Path(checkpoint).parent
    console.print(f"[bold]imgscore demo[/]: handwritten digits from scikit-learn → {demo_dir}")
    try:
        _, held = build_digits_folder(demo_dir / "digits")
    except ImportError as exc:
        raise UsageError(
            f"imgscore demo reads the digit scans that ship inside scikit-learn, which is not installed ({exc}); "
            "it is one of imgscore's dependencies: pip install scikit-learn"
        ) from None
    if not Path(checkpoint).exists():
        console.print("training resnet18 on the digits (CPU, cached for next time) …")
    train_demo_model(demo_dir / "digits" / "train", checkpoint, log=console.print)
    check_paths(cfg)
    session.start_server()
    with start_dask_early(cfg, session):
        load_model_here(cfg)
        code, summary = execute(cfg, quiet=args.quiet, console=console, session=session)
    if not summary:
        return code
    acc = accuracy_of_run(cfg.output.root, summary["run_id"])
    if acc["accuracy"] is None:  # folder classes that cannot be matched to the model's (a custom --config)
        console.print(f"accuracy vs folder labels: n/a ({acc.get('reason')})")
    else:
        console.print(
            f"[bold]accuracy vs folder labels: {acc['accuracy']:.4f}[/] ({acc['correct']}/{acc['labelled']} held-out "
            "digits)"
        )
    # pandas (a dependency, unlike duckdb) and this interpreter: the line works from a wheel install too
    python = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else sys.executable
    read = (
        f"import pandas as pd; df = pd.read_parquet('{cfg.output.root}/predictions', filters=[('run_id', '==', "
        f"'{summary['run_id']}')]); print(df.pred_label.value_counts().sort_index())"
    )
    console.print(f'read it back: {shlex.quote(python)} -c "{read}"', soft_wrap=True, highlight=False, markup=False)
    return code


def cmd_rerun(args, session: startup.Session) -> int:
    """``imgscore rerun RUN_ID [--config FILE] [--set K=V]...`` (flow ``rerun-failed``).

    A complete run is answered from its manifest and part-file footers alone, before the Prefect
    server starts or the model loads (a fraction of the time: benchmarks/NOTES.md, "Start-up and exit")."""
    from imgscore.runstate import lock as run_lock
    from imgscore.runstate import migrate

    check_run_id_arg(args.run_id)
    configure_storage(args)
    out = out_root_of(args.config, args.overrides)
    run_dir = run_dir_of(out, args.run_id)  # one folder name, not a link out of the output root
    if not storage.is_file(storage.path(run_dir, "manifest.json")):
        runs = storage.list_names(storage.path(out, "runs"))
        raise UsageError(
            f"run {args.run_id!r} not found: no {storage.path(run_dir, 'manifest.json')}; pass the output root it was "
            "written to with --set output.root=PATH ("
            + (("latest runs there: " + ", ".join(runs[-5:])) if runs else f"no runs under {out}")
            + ")"
        )
    migrate.migrate_output_root(out)  # runs of earlier versions: today's part-file layout (each under its lock)
    with run_lock.held(
        run_dir, "imgscore rerun"
    ):  # a live writer of this run is refused, even when nothing is left to do
        manifest = load_manifest(run_dir)
        check_run_state(manifest, out, run_dir)  # before anything is read, written or deleted by what it names
        cfg = rerun_config(manifest.config, args.config, [*args.overrides, f"output.root={out}"])
        adopt_committed(manifest, run_dir, out)  # in memory, as the flow will: the count printed is what it rescores
        todo = plan_rerun(manifest, out)
    console = _console()
    if not todo and manifest.status == "complete":
        console.print(
            f"run {args.run_id} is complete: every shard is committed and no image is recorded as failed; nothing to "
            "rescore"
        )
        return 0
    session.start_server()  # boots while the run is checked and the model loads
    check_rerun(cfg, manifest, run_dir)
    console.print(f"[bold]rerun {args.run_id}[/]: {len(todo)} shard(s) to rescore ({cfg.runner.type} runner) …")
    rerun = session.import_prefect("imgscore.flows.rerun")
    try:
        with progress_for(console, enabled=not args.quiet), flow_parameters(cfg) as params:
            state = rerun.rerun_failed(args.run_id, **params, return_state=True)
    except (KeyboardInterrupt, Terminated) as exc:
        return interrupted(args.run_id, out, exc)
    code, summary = flow_outcome(state, console, f"rerun of {args.run_id}")
    if code == 0:
        console.print(
            f"rescored {summary.get('rescored', 0)} image(s) in {len(summary.get('rescored_shards', []))} shard(s)"
        )
    return code


def cmd_config(args, session: startup.Session) -> int:
    """``imgscore config [--format table|markdown]``: every key, its default and meaning."""
    from imgscore.config.schema import config_reference

    rows = config_reference()
    if args.format == "markdown":
        print("| key | default | meaning |\n| --- | --- | --- |")
        for r in rows:
            print(f"| `{r['key']}` | {r['default']} | {r['meaning']} |")
        return 0
    width = max(len(r["key"]) for r in rows)
    section = None
    for r in rows:
        if r["key"].split(".")[0] != section:
            section = r["key"].split(".")[0]
            print(f"\n{section}:" if r is not rows[0] else f"{section}:")
        print(f"  {r['key']:<{width}}  {r['default']:<14}  {r['meaning']}")
    return 0


def cmd_report(args, session: startup.Session) -> int:
    from imgscore.flows import report_cli

    check_run_id_arg(args.run_id)
    return report_cli.main(args)


def cmd_serve(args, session: startup.Session) -> int:
    serve = session.import_prefect("imgscore.flows.serve")
    return serve.main(args, temporary_url=session.temporary_api_url)


COMMANDS = {
    "run": cmd_run,
    "rerun": cmd_rerun,
    "report": cmd_report,
    "config": cmd_config,
    "demo": cmd_demo,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command inside one start-up session; return the exit code."""
    args = _parser().parse_args(argv)
    previous = catch_sigterm()
    with startup.session(verbose=getattr(args, "verbose", False)) as session:
        try:
            return COMMANDS[args.command](args, session)
        except ImgscoreError as exc:
            return fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            return fail("interrupted", 130)
        except Terminated:
            return fail("terminated (SIGTERM)", 143)
        except startup.ServerStartError as exc:
            return fail(str(exc), 1)
        except Exception as exc:
            if getattr(args, "verbose", False):
                raise
            if "ephemeral Prefect API server" in str(exc):
                return fail(
                    f"{exc} Start a server (`prefect server start`) and export PREFECT_API_URL, or raise "
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                    1,
                )
            return fail(f"{type(exc).__name__}: {exc} (run again with --verbose for the traceback)", 1)
        finally:
            restore_sigterm(previous)


def entrypoint() -> None:
    """Console-script entry: run :func:`main`, then the exit handlers, then leave.

    The exit handlers (stopping the temporary Prefect server, closing a Dask cluster, joining
    multiprocessing children) run as on a normal exit; what is skipped is the interpreter's own
    teardown of torch, torchvision and Prefect modules, which takes seconds and does nothing
    for a process that is about to end (benchmarks/NOTES.md, "Start-up and exit").
    """
    code = main()
    try:
        run_exit_handlers()
    finally:
        os._exit(code)


if __name__ == "__main__":
    entrypoint()
