"""How long ``run.skip_scored`` takes to find already-scored images among 100k earlier predictions.

Builds an output root with ``--rows`` prediction rows (default 100 000) spread over ``--runs``
earlier runs (default 10 nightly runs, part files of ``--shard-size`` rows, real
``PREDICTIONS_SCHEMA`` with top-5 lists, zstd), plus a scan of the same folder with ``--new``
extra images, and times:

- ``split_already_scored`` (manifests → projected, filtered ``pyarrow.dataset`` read → vectorised
  ``is_in``), the way ``imgscore run`` does it;
- the naive way for comparison: ``pandas.read_parquet`` of every column of every part file, and a
  Python set of (path, size, mtime) tuples.

No images and no model are needed (stat mode compares recorded sizes and mtimes). Run:

    .venv/bin/python -m benchmarks.bench_skip_scored [--rows 100000] [--runs 10] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from imgscore.images.entries import ImageEntry, ImageIndex
from imgscore.io.parquet import PREDICTIONS_SCHEMA, part_dir
from imgscore.runstate.already_scored import split_already_scored

MODEL = {
    "model_id": "c" * 64,
    "preprocess": {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}


def build(out: Path, root: Path, rows: int, runs: int, shard_size: int) -> list[ImageEntry]:
    entries = [
        ImageEntry(
            f"class_{i % 100:03d}/img_{i:07d}.jpg",
            i % 100,
            f"class_{i % 100:03d}",
            50_000 + i,
            1_700_000_000_000_000_000 + i,
        )
        for i in range(rows)
    ]
    per_run = rows // runs
    now = datetime.now(UTC)
    for r in range(runs):
        run_id = f"2026010{r}T020000Z-{r:06x}"
        chunk = entries[r * per_run : (r + 1) * per_run]
        d = part_dir(out, "predictions", "2026-01-01", run_id)
        d.mkdir(parents=True)
        for s, start in enumerate(range(0, len(chunk), shard_size)):
            part = chunk[start : start + shard_size]
            n = len(part)
            t = pa.table(
                {
                    "run_id": pa.array([run_id] * n),
                    "input_root": pa.array([str(root)] * n),
                    "image_path": pa.array([e.image_path for e in part]),
                    "label": pa.array([e.label for e in part], pa.int32()),
                    "label_name": pa.array([e.label_name for e in part]),
                    "pred_index": pa.array([1] * n, pa.int32()),
                    "pred_label": pa.array(["class_001"] * n),
                    "score": pa.array([0.9] * n, pa.float32()),
                    "topk_indices": pa.array([[1, 2, 3, 4, 5]] * n, pa.list_(pa.int32())),
                    "topk_scores": pa.array([[0.9, 0.05, 0.02, 0.02, 0.01]] * n, pa.list_(pa.float32())),
                    "model_id": pa.array([MODEL["model_id"]] * n),
                    "model_name": pa.array(["resnet50"] * n),
                    "device": pa.array(["cuda:0"] * n),
                    "worker": pa.array(["host:1"] * n),
                    "shard_id": pa.array([s] * n, pa.int32()),
                    "batch_id": pa.array([i // 32 for i in range(n)], pa.int32()),
                    "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                    "file_size": pa.array([e.size for e in part], pa.int64()),
                    "file_mtime_ns": pa.array([e.mtime_ns for e in part], pa.int64()),
                    "file_version": pa.nulls(n, pa.string()),
                },
                schema=PREDICTIONS_SCHEMA,
            )
            pq.write_table(t, d / f"part-{s:05d}.parquet", compression="zstd")
        (out / "runs" / run_id).mkdir(parents=True)
        (out / "runs" / run_id / "manifest.json").write_text(
            json.dumps({"run_id": run_id, "run_date": "2026-01-01", "input": {"root": str(root)}, "model": MODEL})
        )
    return entries


def naive(out: Path, index: ImageIndex) -> int:
    import pandas as pd

    df = pd.concat(
        [pd.read_parquet(f) for f in sorted((out / "predictions").rglob("part-*.parquet"))], ignore_index=True
    )
    df = df[df["model_id"] == MODEL["model_id"]]
    seen = set(zip(df["image_path"], df["file_size"], df["file_mtime_ns"], strict=True))
    return sum((e.image_path, e.size, e.mtime_ns) in seen for e in index.entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--new", type=int, default=2000, help="images in the folder not scored yet")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out, root = Path(tmp) / "out", Path(tmp) / "images"
        t0 = time.perf_counter()
        entries = build(out, root, a.rows, a.runs, a.shard_size)
        build_s = time.perf_counter() - t0
        new = [
            ImageEntry(f"new/img_{i:07d}.jpg", None, None, 1000 + i, 1_800_000_000_000_000_000 + i)
            for i in range(a.new)
        ]
        index = ImageIndex(root, "imagefolder", [], entries + new)
        disk = sum(p.stat().st_size for p in (out / "predictions").rglob("*.parquet"))
        ours, base = [], []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            r = split_already_scored(index, out, MODEL, "stat")
            ours.append(time.perf_counter() - t0)
            assert r.already_scored == a.rows and len(r.index.entries) == a.new
            t0 = time.perf_counter()
            assert naive(out, index) == a.rows
            base.append(time.perf_counter() - t0)
        files = len(list((out / "predictions").rglob("*.parquet")))
        print(
            f"predictions: {a.rows} rows in {files} part files over {a.runs} runs, {disk / 2**20:.1f} MiB; folder: "
            f"{len(index.entries)} images ({a.new} new); built in {build_s:.1f} s"
        )
        print(
            f"split_already_scored (stat): median {statistics.median(ours) * 1000:.0f} ms, min {min(ours) * 1000:.0f} "
            f"ms over {a.repeat}"
        )
        print(
            f"naive pandas full read + set: median {statistics.median(base) * 1000:.0f} ms, min {min(base) * 1000:.0f} "
            f"ms over {a.repeat}"
        )


if __name__ == "__main__":
    main()
