"""``imgscore``: run, rerun, report, demo, serve.

Exit codes (README, "Score your own folder"): 0 finished within the error budget; 1 over budget or a shard failed
(everything that could be scored is written); 2 bad usage, config, input root or model —
refused before any scoring, one line naming the bad value and the fix, no traceback.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
from pathlib import Path

from imgscore.flows import _env, server_guard

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
SUBCOMMAND_MODULES = {"rerun": "imgscore.flows.rerun", "report": "imgscore.flows.report_cli", "serve": "imgscore.flows.serve"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgscore", description="Batch-score image folders with torchvision models (Prefect 3, Parquet out).")
    from importlib.metadata import version

    p.add_argument("--version", action="version", version=f"imgscore {version('imgscore')}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, help="YAML config (see configs/nightly.yaml)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set input.root=/data/images (repeatable)")
        sp.add_argument("--verbose", "-v", action="store_true", help="show Prefect's logs and per-image detail")
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    run = sub.add_parser("run", help="score a folder (flow score-images)")
    common(run)
    rerun = sub.add_parser("rerun", help="rescore a run's failed and unfinished shards (flow rerun-failed)")
    rerun.add_argument("run_id")
    common(rerun)
    rep = sub.add_parser("report", help="summarise a finished run")
    rep.add_argument("run_id")
    rep.add_argument("--format", choices=["table", "json", "html"], default="table")
    common(rep)
    demo = sub.add_parser("demo", help="build the digits demo (real scans, a model trained here) and score it")
    common(demo)
    serve = sub.add_parser("serve", help="serve the scoring flow on a cron schedule from this process (flow.serve)")
    common(serve)
    serve.add_argument("--cron", default="0 2 * * *", help="cron expression (default: 0 2 * * *, nightly at 02:00)")
    serve.add_argument("--timezone", default="UTC", help="IANA timezone of the cron schedule (default: UTC)")
    serve.add_argument("--name", default="nightly-scoring", help="deployment name")
    return p


def _fail(msg: str, code: int) -> int:
    print(f"imgscore: error: {msg}", file=sys.stderr)
    return code


def _preflight(cfg, verbose: bool = False) -> None:
    """Refuse bad input root, output root or model before Prefect starts (exit 2, nothing written).

    The cheap path checks come first, before torch is imported, so a typo fails in well under a
    second. Then the temporary Prefect server is launched (it boots while the model loads).
    """
    from imgscore.tasks.errors import ConfigError, InputError

    root = cfg.input.root
    if root is None:
        raise InputError("input.root is not set; pass --set input.root=/path/to/images or set it in the config")
    if not Path(root).exists():
        raise InputError(f"input.root {str(root)!r} does not exist; set input.root to a folder of images (--set input.root=/path)")
    if not Path(root).is_dir():
        raise InputError(f"input.root {str(root)!r} is not a folder; point input.root at the folder that holds the images")
    from imgscore.tasks.scan import has_images, no_images_message

    if not has_images(root, cfg.input.follow_symlinks):
        raise InputError(no_images_message(root))
    out = Path(cfg.output.root)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".imgscore-write-check-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output.root {str(out)!r} is not a writable folder ({exc.strerror}); set output.root to a folder you can write to") from None
    server_guard.launch(verbose=verbose)  # boots beside torch's import and the model load below
    from imgscore.tasks.device import resolve_device
    from imgscore.tasks.model import load_model

    device = resolve_device(cfg.inference.device) if cfg.runner.type == "thread" else None
    import torch

    load_model(cfg.model, cfg.preprocess, device or torch.device("cpu"), channels_last=cfg.inference.channels_last)


def _print_summary(summary: dict, console) -> None:
    """One ``key  value`` line each; never wrapped, so paths stay copyable in logs and cron mail."""
    rows = [(k, summary[k]) for k in ("run_id", "status", "scanned", "scored", "failed", "skipped", "already_scored", "warnings", "images_per_s", "wall_s") if k in summary]
    rows += [("devices", ", ".join(summary.get("devices", []))), ("workers", len(summary.get("workers", [])))]
    rows += [(k, summary[k]) for k in ("predictions", "errors", "manifest", "report") if summary.get(k)]
    for k, v in rows:
        console.print(f"{k:<15} {v}", soft_wrap=True, highlight=False, markup=False)


def execute(cfg, *, quiet: bool = False, console=None) -> tuple[int, dict]:
    """Run the scoring flow for a validated config; return (exit code, summary)."""
    from rich.console import Console

    server_guard.api_url()  # exported as PREFECT_API_URL before Prefect is imported (next lines)
    from imgscore.flows.progress import progress_for
    from imgscore.flows.runner import make_task_runner
    from imgscore.flows.score_images import score_images
    from imgscore.tasks.plan import new_run_id

    server_guard.guard()  # the temporary server up (it booted while we imported) and watched

    console = console or Console()
    if cfg.run.run_id is None:
        cfg.run.run_id = new_run_id()
    console.print(f"[bold]run {cfg.run.run_id}[/]: scoring {cfg.input.root} with {cfg.model.arch} ({cfg.runner.type} runner) …", soft_wrap=True)
    flow_fn = score_images.with_options(task_runner=make_task_runner(cfg.runner))
    try:
        with progress_for(console, enabled=not quiet):
            state = flow_fn(cfg.to_dict(), return_state=True)
    except KeyboardInterrupt:
        return interrupted(cfg.run.run_id, cfg.output.root), {}
    return flow_outcome(state, console, f"run {cfg.run.run_id}")


def interrupted(run_id: str, out_root) -> int:
    """Ctrl-C: exit 130 (128 + SIGINT) with the command that finishes the run — or, when the run
    had not written its plan yet, the fact that there is nothing to finish."""
    if not (Path(out_root) / "runs" / run_id / "manifest.json").is_file():
        return _fail(f"interrupted before run {run_id} was planned; nothing was written, run the command again", 130)
    return _fail(f"interrupted; finish it with `imgscore rerun {run_id} --set output.root={out_root}`", 130)


def flow_outcome(state, console, what: str) -> tuple[int, dict]:
    """Exit code and summary from a finished flow run's state (run and rerun alike)."""
    from imgscore.tasks.errors import ErrorBudgetExceeded, ImgscoreError

    if state.is_completed():
        summary = state.result()
        _print_summary(summary, console)
        return 0, summary
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, ErrorBudgetExceeded):
        _print_summary(exc.summary, console)
        print(f"imgscore: {exc}", file=sys.stderr)
        return 1, exc.summary
    if isinstance(exc, ImgscoreError):
        return _fail(str(exc), exc.exit_code), {}
    return _fail(f"{what} failed: {type(exc).__name__}: {exc}", 1), {}


def cmd_run(args) -> int:
    from imgscore.tasks.config import load_config

    cfg = load_config(args.config, args.overrides)
    _preflight(cfg, verbose=args.verbose)
    code, _ = execute(cfg, quiet=args.quiet)
    return code


def cmd_demo(args) -> int:
    from rich.console import Console

    from imgscore.tasks.config import load_config
    from imgscore.tasks.demo import build_digits_folder, train_demo_model
    from imgscore.tasks.evaluate import accuracy_of_run

    console = Console()
    cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
    demo_dir = Path(cfg.model.checkpoint).parent
    console.print(f"[bold]imgscore demo[/]: handwritten digits from scikit-learn → {demo_dir}")
    _, held = build_digits_folder(demo_dir / "digits")
    if not Path(cfg.model.checkpoint).exists():
        console.print("training resnet18 on the digits (CPU, cached for next time) …")
    train_demo_model(demo_dir / "digits" / "train", cfg.model.checkpoint, log=console.print)
    _preflight(cfg, verbose=args.verbose)
    code, summary = execute(cfg, quiet=args.quiet, console=console)
    if not summary:
        return code
    acc = accuracy_of_run(cfg.output.root, summary["run_id"])
    if acc["accuracy"] is None:  # folder classes that cannot be matched to the model's (a custom --config)
        console.print(f"accuracy vs folder labels: n/a ({acc.get('reason')})")
    else:
        console.print(f"[bold]accuracy vs folder labels: {acc['accuracy']:.4f}[/] ({acc['correct']}/{acc['labelled']} held-out digits)")
    query = f"SELECT pred_label, count(*) AS n FROM read_parquet('{cfg.output.root}/predictions/**/*.parquet', hive_partitioning=true) WHERE run_id = '{summary['run_id']}' GROUP BY 1 ORDER BY 1"
    console.print(f'read it back: .venv/bin/python -c "import duckdb; duckdb.sql(\\"{query}\\").show()"', soft_wrap=True, highlight=False, markup=False)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _env.apply(verbose=args.verbose)
    # The temporary server's first start migrates a fresh SQLite DB; Prefect's 20 s default
    # timed out on a loaded 2-core machine ("Timed out while attempting to connect").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    ours = logging.getLogger("imgscore")
    if not ours.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(h)
    ours.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    from imgscore.tasks.errors import ImgscoreError

    try:
        if args.command in ("rerun", "serve"):
            # Their modules import Prefect, which must see the temporary server's URL first; rerun
            # waits for the server itself (after refusing a bad run id), serve waits here.
            server_guard.launch(verbose=args.verbose)
            if args.command == "serve":
                server_guard.guard()
            else:
                server_guard.api_url()
        if args.command == "run":
            handler = cmd_run
        elif args.command == "demo":
            handler = cmd_demo
        else:  # imported only when used
            handler = importlib.import_module(SUBCOMMAND_MODULES[args.command]).main
        return handler(args)
    except ImgscoreError as exc:
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except server_guard.ServerStartError as exc:
        return _fail(str(exc), 1)
    except Exception as exc:
        if args.verbose:
            raise
        if "ephemeral Prefect API server" in str(exc):
            return _fail(
                f"{exc} Start a server (`prefect server start`) and export PREFECT_API_URL, or raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                1,
            )
        return _fail(f"{type(exc).__name__}: {exc} (run again with --verbose for the traceback)", 1)


def entrypoint() -> None:
    """Console-script entry: run :func:`main`, then the exit handlers, then leave.

    The exit handlers (stopping the temporary Prefect server, closing a Dask cluster, joining
    multiprocessing children) run as on a normal exit; what is skipped is the interpreter's own
    teardown of torch, torchvision and Prefect modules, which took 1.6 s here and does nothing
    for a process that is about to end (benchmarks/NOTES.md, start-up).
    """
    code = main()
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    entrypoint()
