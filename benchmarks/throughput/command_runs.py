"""(d) ``imgscore run --config configs/nightly.yaml`` as a whole subprocess, as a nightly run
without a server starts it (a temporary Prefect server of its own): wall time, peak memory of
the process tree, and from its manifest and commit records the start-up, the scoring phase and
the time spent outside the shards."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from benchmarks.common.memory import TreeRss
from benchmarks.common.paths import DATA, IMGSCORE, REPO

RunSpec = tuple[Path, str, Path, Path, list[str]]  # (images root, arch, checkpoint, output root, --set overrides)


def bench_env() -> dict[str, str]:
    """The environment of every subprocess: its own Prefect home, a temporary server, no telemetry."""
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PREFECT_HOME"] = str(DATA / "prefect-home")  # own database: no contention with other runs
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # first run migrates it
    env.pop("PREFECT_API_URL", None)  # a temporary server, as a nightly run without a server has
    return env


def imgscore_run(root: Path, arch: str, ckpt: Path, out: Path, sets: list[str] | None = None) -> dict:
    """One ``imgscore run`` of ``arch``/``ckpt`` over ``root`` into ``out`` with ``--set`` ``sets``;
    its measures (:func:`_collect`). Raises RuntimeError (with the log's tail) when it fails."""
    return imgscore_runs([(root, arch, ckpt, out, list(sets or []))])[0]


def imgscore_runs(specs: list[RunSpec]) -> list[dict]:
    """Several ``imgscore run`` subprocesses started together (one: :func:`imgscore_run`); each
    ``(root, arch, ckpt, out, sets)``. Returns each run's measures (as :func:`imgscore_run`)."""
    launched = [_launch(*spec) for spec in specs]
    results = []
    for run in launched:
        rc = run.proc.wait()
        wall = time.perf_counter() - run.t0
        run.rss.__exit__(None, None, None)
        run.log_file.close()
        if rc != 0:
            raise RuntimeError(f"imgscore run exited {rc}; see {run.log}:\n{run.log.read_text()[-3000:]}")
        results.append(_collect(run.out, wall, run.t_launch, run.rss))
    return results


@dataclass
class _Launched:
    proc: subprocess.Popen
    log_file: IO[bytes]
    rss: TreeRss
    t0: float  # perf_counter at launch
    t_launch: float  # wall clock at launch
    out: Path
    log: Path


def _launch(root: Path, arch: str, ckpt: Path, out: Path, sets: list[str]) -> _Launched:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(IMGSCORE),
        "run",
        "--config",
        str(REPO / "configs" / "nightly.yaml"),
        "-q",
        "--set",
        f"input.root={root}",
        "--set",
        f"model.arch={arch}",
        "--set",
        f"model.checkpoint={ckpt}",
        "--set",
        f"output.root={out}",
        "--set",
        "inference.device=cpu",
        "--set",
        "run.skip_scored=false",
        *[a for s in sets for a in ("--set", s)],
    ]
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    t_launch = time.time()
    t0 = time.perf_counter()
    fh = open(log, "wb")  # noqa: SIM115 - closed by imgscore_runs
    p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=bench_env(), cwd=REPO)
    return _Launched(p, fh, TreeRss(p.pid).__enter__(), t0, t_launch, out, log)


def _collect(out: Path, wall: float, t_launch: float, rss: TreeRss) -> dict:
    """A finished run's measures from its manifest, commit records and predictions."""
    (manifest_path,) = list((out / "runs").glob("*/manifest.json"))
    m = json.loads(manifest_path.read_text())
    shards = m["shards"]
    planned = m["timings"]["planned_at_s"]
    states = [json.loads(f.read_text()) for f in sorted((manifest_path.parent / "shards").glob("*.json"))]
    finished = max(dt.datetime.fromisoformat(s["finished_at"]).timestamp() for s in states)
    shard_s = sum(s["seconds"] for s in shards)
    scored = m["counts"]["scored"]
    return {
        "planned_at": planned,
        "finished_at": finished,
        "inference": m.get("inference"),
        "splits": sorted({_split(s) for s in states}),
        "first_shard_setup_s": max((s.get("setup_s") or 0) for s in states[: max(1, len(states))]) if states else None,
        "images": scored,
        "failed": m["counts"]["failed"],
        "shards": len(shards),
        "wall_s": round(wall, 3),
        "img_per_s_end_to_end": round(scored / wall, 2),
        "launch_to_planned_s": round(planned - t_launch, 3),  # imports, server, scan, model load
        "score_phase_s": round(finished - planned, 3),
        "sum_shard_s": round(shard_s, 3),
        "in_shard_img_per_s": round(scored / shard_s, 2) if shard_s else None,
        "outside_shards_s": round(finished - planned - shard_s, 4),  # Prefect task runs, submission
        "threads": sorted({s.get("threads") for s in states}),
        **rss.mib,
        "_preds": _predictions(out),
    }


def _split(state: dict) -> str:
    """A commit record's process split: ``N lanes batch B`` or ``WxT batch B`` (workers × threads)."""
    how = (
        f"{state.get('loader_workers')} lanes"
        if state.get("lanes")
        else f"{state.get('loader_workers')}x{state.get('threads')}"
    )
    return f"{how} batch {state.get('batch_size')}"


def _predictions(out: Path) -> dict[str, tuple[int, float]]:
    import pyarrow.dataset as pads

    t = pads.dataset(out / "predictions", format="parquet", partitioning="hive").to_table(
        columns=["image_path", "pred_index", "score"]
    )
    return {r["image_path"]: (r["pred_index"], r["score"]) for r in t.to_pylist()}


def best_of(runs: list[dict]) -> dict:
    """The run with the shortest wall time, with every run's wall time as ``wall_s_all``."""
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["wall_s_all"] = [r["wall_s"] for r in runs]
    return best


def marginal(small: dict, large: dict) -> dict:
    """Δimages / Δseconds between a small and a large run, and the fixed start-up that leaves (the intercept)."""
    dn = large["images"] - small["images"]
    dtime = large["wall_s"] - small["wall_s"]
    rate = dn / dtime if dtime > 0 else float("nan")
    startup = small["wall_s"] - small["images"] / rate
    return {"images": dn, "seconds": round(dtime, 3), "img_per_s": round(rate, 2), "startup_s": round(startup, 2)}


def scoring_rate(runs: list[dict]) -> dict:
    """Images per second of the scoring phase of runs that ran at the same time: all their
    images over the window from the first plan written to the last shard committed."""
    start = min(r["planned_at"] for r in runs)
    end = max(r["finished_at"] for r in runs)
    n = sum(r["images"] for r in runs)
    return {"images": n, "seconds": round(end - start, 3), "img_per_s": round(n / (end - start), 1)}


def import_cost() -> dict:
    """Seconds for a fresh interpreter to import what ``imgscore run`` imports (no server)."""
    code = (
        "import torch, torchvision, prefect, imgscore.flows.cli, imgscore.flows.score_images, imgscore.inference.score"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=bench_env(), cwd=REPO)
    return {"seconds": round(time.perf_counter() - t0, 2)}
