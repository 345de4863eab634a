"""End-to-end scale run: ``imgscore run`` over N real (hardlinked) image files (docs/scaling.md).

Builds an ImageFolder of ``--files`` tiny JPEGs (64 distinct 32-px crops of scikit-image photos,
hardlinked, so a million files cost a million directory entries and no image data), a seeded
``mobilenet_v3_small`` checkpoint, and runs the console script as a subprocess with a temporary
Prefect server, as a nightly run without a server has. It samples the RSS of the whole process
tree (scorer, its DataLoader workers, the temporary server) every 0.2 s and reports:

- ``peak_rss_tree_planning_mib``: the highest tree RSS before the first shard committed (import,
  server start, scan, index, manifest — what grows with the number of files);
- ``peak_rss_tree_mib``: the highest over the whole run; ``peak_rss_scorer_mib`` and
  ``peak_rss_server_mib`` the highest of the scoring process alone and of Prefect's temporary server;
- ``shards_per_s``: shards committed per second between the first and the last commit record
  (``runs/RUN/shards/*.json``, ``finished_at``), the flow's folding included (a slow fold delays
  the next shard on the thread runner);
- ``wall_s``, ``plan_s`` (launch to the manifest's ``planned_at_s``), ``images_per_s``.

    python -m benchmarks.scale_run --files 100000 --shard-size 1000
    python -m benchmarks.scale_run --files 1000000 --shard-size 100    # 10,000 shards
    python -m benchmarks.scale_run --files 20000 --shard-size 100      # the 200-shard reference

The image folder is cached under ``benchmarks/data/scale-<files>/`` (git-ignored); ``--clean``
removes it afterwards. Load average before and after is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.common import paths
from benchmarks.common.machine import loadavg
from benchmarks.common.memory import TreeRss
from benchmarks.common.models import seeded_checkpoint

DATA = Path(os.environ.get("IMGSCORE_BENCH_DATA", paths.DATA))
SOURCES = 64  # distinct JPEGs; ext4 allows 65,000 links per inode, so 64 cover 4 M files
CLASSES = 100


def make_folder(n: int, classes: int = CLASSES) -> Path:
    """``DATA/scale-N/images/class_CCC/img_IIIIIII.jpg``: N hardlinks of SOURCES small JPEGs."""
    import numpy as np
    import skimage.data as data
    from PIL import Image

    base = DATA / f"scale-{n}"
    root = base / "images"
    done = base / ".complete"
    if done.is_file():
        return root
    shutil.rmtree(base, ignore_errors=True)
    src_dir = base / "sources"
    src_dir.mkdir(parents=True)
    photos = [np.asarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    sources = []
    for i in range(SOURCES):
        img = Image.fromarray(photos[i % 4]).convert("RGB")
        w, h = img.size
        s = min(w, h) // 2
        x, y = (i * 37) % (w - s), (i * 53) % (h - s)
        p = src_dir / f"src_{i:02d}.jpg"
        img.crop((x, y, x + s, y + s)).resize((32, 32)).save(p, quality=90)
        sources.append(str(p))
    per = -(-n // classes)
    made = 0
    for c in range(classes):
        d = root / f"class_{c:03d}"
        d.mkdir(parents=True)
        for i in range(min(per, n - made)):
            os.link(sources[(made + i) % SOURCES], d / f"img_{made + i:07d}.jpg")
        made += min(per, n - made)
    done.write_text(str(n))
    return root


def run_once(root: Path, ckpt: Path, out: Path, shard_size: int, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sets = {
        "input.root": root,
        "model.arch": "mobilenet_v3_small",
        "model.checkpoint": ckpt,
        "output.root": out,
        "inference.device": "cpu",
        "inference.batch_size": 100,
        "inference.num_workers": 0,
        "preprocess.resize": 32,
        "preprocess.crop": 32,
        "run.shard_size": shard_size,
        "run.skip_scored": "false",
        "run.max_error_rate": 0.0,
    }
    cmd = [str(paths.IMGSCORE), "run", "-q", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    for s in extra:
        cmd += ["--set", s]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PREFECT_HOME": str(DATA / "prefect-home-scale")}
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    log = out.parent / f"{out.name}.log"
    t_launch = time.time()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=paths.REPO)
        with TreeRss(proc.pid, every=0.2) as rss:
            while proc.poll() is None:
                if not rss.marked and any(out.glob("runs/*/shards/*.json")):
                    rss.mark()  # the first shard committed: planning is over
                time.sleep(0.2)
    wall = time.time() - t_launch
    if proc.returncode != 0:
        raise SystemExit(f"imgscore run exited {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
    (run_dir,) = list((out / "runs").iterdir())
    m = json.loads((run_dir / "manifest.json").read_text())
    done = sorted(
        dt.datetime.fromisoformat(json.loads(p.read_text())["finished_at"]).timestamp()
        for p in (run_dir / "shards").glob("*.json")
    )
    n_shards = len(done)
    span = done[-1] - done[0] if n_shards > 1 else 0.0
    return {
        "files": m["counts"]["scanned"],
        "scored": m["counts"]["scored"],
        "shards": n_shards,
        "wall_s": round(wall, 1),
        "plan_s": round(m["timings"]["planned_at_s"] - t_launch, 1),  # launch → manifest written
        "score_s": round(done[-1] - m["timings"]["planned_at_s"], 1),
        "shards_per_s": round((n_shards - 1) / span, 2) if span else None,
        "images_per_s": round(m["counts"]["scored"] / wall, 1),
        "peak_rss_tree_planning_mib": round(rss.peak_before_mark / 2**20),
        "peak_rss_tree_mib": round(rss.peak_tree / 2**20),
        "peak_rss_scorer_mib": round(rss.peak_root / 2**20),
        "peak_rss_server_mib": round(rss.peak_server / 2**20),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--set", dest="extra", action="append", default=[], help="more --set overrides for the run")
    p.add_argument("--clean", action="store_true", help="remove the image folder afterwards")
    args = p.parse_args(argv)
    t0 = time.time()
    root = make_folder(args.files)
    print(f"folder of {args.files} files ready in {time.time() - t0:.0f} s", flush=True)
    ckpt = seeded_checkpoint("mobilenet_v3_small", DATA / f"scale-mobilenet_v3_small-{CLASSES}.pt", num_classes=CLASSES)
    load_before = loadavg()
    runs = []
    for _ in range(args.repeats):
        res = run_once(root, ckpt, DATA / f"scale-out-{args.files}-{args.shard_size}", args.shard_size, args.extra)
        print(json.dumps(res), flush=True)
        runs.append(res)
    summary = {
        "date": dt.date.today().isoformat(),
        "cpu": f"{psutil.cpu_count()} cores",
        "ram_gib": round(psutil.virtual_memory().total / 2**30),
        "load_before": load_before,
        "load_after": loadavg(),
        "runs": runs,
    }
    print(json.dumps(summary, indent=1))
    if args.clean:
        shutil.rmtree(DATA / f"scale-{args.files}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
