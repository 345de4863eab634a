"""Two models, one decode, through real ``imgscore run`` commands: one run with ``models:`` vs two runs.

The workload is the benchmark's 4000×3000 JPEGs (``benchmarks.common.images``, cached in
``benchmarks/data``), scored by two mobilenet_v3_large checkpoints (production + candidate:
seeded random weights, the same preprocessing; the cost does not depend on the values):

- ``two_runs``: ``imgscore run`` with ``model:`` = the first, then again with the second — what a
  night costs without ``models:`` (each run decodes every image);
- ``one_run``: one ``imgscore run`` with ``models: [first, second]`` (each image decoded once).

Each command is timed from start to exit (``command_s``: Python and Prefect start-up included) and
by its flow (``flow_s``: the manifest's ``timings.wall_s``, scan to summary). The two ways are run
in turn ``--repeats`` times and the best of each is kept (a load change hits both alike); the
load average before and after is recorded, since the machine may be shared.

    .venv/bin/python -m benchmarks.several_models [--images 96] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common.images import make_images, subset
from benchmarks.common.machine import cores, cpu_model, loadavg, utc_now
from benchmarks.common.models import seeded_checkpoint
from benchmarks.common.paths import DATA, IMGSCORE
from benchmarks.common.results import write_json


def _run(config: dict, work: Path, run_id: str) -> dict:
    """One ``imgscore run`` with ``config`` (run id ``run_id``); its command and flow seconds."""
    cfg_file = work / f"{run_id}.yaml"
    cfg_file.write_text(yaml.safe_dump({**config, "run": {**config.get("run", {}), "run_id": run_id}}))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(IMGSCORE), "run", "--config", str(cfg_file)], capture_output=True, text=True, check=False
    )
    command_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"imgscore run {run_id} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    manifest = json.loads((Path(config["output"]["root"]) / "runs" / run_id / "manifest.json").read_text())
    return {"command_s": command_s, "flow_s": manifest["timings"]["wall_s"], "scored": manifest["counts"]["scored"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=48)
    args = ap.parse_args(argv)
    folder = DATA / "decode-4000x3000"
    rels = make_images(folder, max(args.images, 24), (4000, 3000), seed=0)
    root = subset(folder, rels, args.images)
    work = Path(tempfile.mkdtemp(prefix="imgscore_several_"))
    try:
        blocks = []
        for seed, name in ((0, "prod"), (1, "candidate")):
            ck = seeded_checkpoint("mobilenet_v3_large", work / f"{name}.pt", seed=seed)
            blocks.append({"name": name, "arch": "mobilenet_v3_large", "checkpoint": str(ck)})
        base = {
            "input": {"root": str(root), "max_pixels": 10**9},
            "inference": {"device": "cpu"},
            "run": {"shard_size": args.shard_size, "min_errors": 10**9},
            "drift": {"enabled": False},
        }
        times: dict[str, list[dict]] = {"two_runs": [], "one_run": []}
        load_before = loadavg()
        for r in range(args.repeats):
            out = work / f"out{r}"
            t = [
                _run({**base, "model": b, "output": {"root": str(out / b["name"])}}, work, f"alone-{b['name']}-{r}")
                for b in blocks
            ]
            times["two_runs"].append({k: sum(x[k] for x in t) for k in ("command_s", "flow_s", "scored")})
            times["one_run"].append(
                _run({**base, "models": blocks, "output": {"root": str(out / "both")}}, work, f"both-{r}")
            )
        best = {
            way: {k: round(min(x[k] for x in runs), 3) for k in ("command_s", "flow_s")} for way, runs in times.items()
        }
        result = {
            "date": utc_now("%Y-%m-%dT%H:%M+00:00"),
            "cpu": cpu_model(),
            "cores": cores(),
            "images": args.images,
            "image_size": [4000, 3000],
            "models": ["mobilenet_v3_large (prod)", "mobilenet_v3_large (candidate)"],
            "shard_size": args.shard_size,
            "repeats": args.repeats,
            "load_before": load_before,
            "load_after": loadavg(),
            "all": times,
            "best": best,
            "speedup_command": round(best["two_runs"]["command_s"] / best["one_run"]["command_s"], 3),
            "speedup_flow": round(best["two_runs"]["flow_s"] / best["one_run"]["flow_s"], 3),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    write_json(result, "several_models.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
