"""Measure what a 10-million-image nightly run costs before any image is scored (docs/scaling.md).

Everything here runs on a laptop-class CPU without a GPU and without 10 M files:

- scan: ``scan_images`` over ``--scan-files`` empty ``.jpg`` files in 10 class folders (warm page
  cache: the number is the per-entry CPU cost, not a network file system's latency);
- plan: ``plan_run`` over ``--entries`` synthetic ``ImageEntry`` rows (no files): index.parquet
  with one row group per shard, and manifest.json;
- per shard: reading one shard's rows back from that index (what each task run does first);
- manifest: one ``record_shard`` (the flow rewrites manifest.json as each shard finishes);
- part file: one predictions part of ``--shard-size`` rows with realistic values.

    python benchmarks/scale_plan.py                 # 1 M entries, 20 k files, shard 1000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imgscore.tasks import manifest as mf  # noqa: E402
from imgscore.tasks.config import Config  # noqa: E402
from imgscore.tasks.parquet_io import PREDICTIONS_SCHEMA, make_table, write_table_atomic  # noqa: E402
from imgscore.tasks.plan import plan_run  # noqa: E402
from imgscore.tasks.scan import ImageEntry, ImageIndex, scan_images  # noqa: E402
from imgscore.tasks.score import read_shard_entries  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--scan-files", type=int, default=20_000)
    p.add_argument("--shard-size", type=int, default=1000)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="imgscore_scale_"))
    res: dict[str, float | int] = {}

    # scan: empty files, 10 class folders
    root = tmp / "scan"
    per = args.scan_files // 10
    for c in range(10):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True)
        for i in range(per):
            (d / f"img_{c:02d}_{i:07d}.jpg").touch()
    index, t = timed(scan_images, root)
    res["scan_files"] = len(index.entries)
    res["scan_s"] = t
    res["scan_us_per_file"] = t / len(index.entries) * 1e6

    # plan: synthetic entries, no files
    n, k = args.entries, args.shard_size
    classes = [f"class_{c:03d}" for c in range(100)]
    rss_before = rss_mib()
    entries = [
        ImageEntry(f"{classes[i % 100]}/2026/11/{i % 28 + 1:02d}/camera_{i % 7}/IMG_{i:09d}.jpg", i % 100, classes[i % 100], 180_000 + i % 9973, 1_795_000_000_000_000_000 + i)
        for i in range(n)
    ]
    res["entries_rss_mib"] = rss_mib() - rss_before  # the scan's in-memory list, for n entries
    big = ImageIndex(root=Path("/data/images"), layout="imagefolder", classes=classes, entries=entries)
    cfg = Config.model_validate({"output": {"root": str(tmp / "out")}, "run": {"shard_size": k}})
    info = {"arch": "resnet50", "model_id": "0" * 64, "classes": classes, "num_classes": 100, "source": "state_dict", "preprocess": {}}
    rss0 = rss_mib()
    plan, t = timed(plan_run, cfg, big, info)
    res["plan_entries"] = n
    res["plan_s"] = t
    res["plan_rss_growth_mib"] = rss_mib() - rss0
    res["shards"] = len(plan.shards)
    res["index_parquet_mib"] = (plan.run_dir / "index.parquet").stat().st_size / 2**20
    res["manifest_kib"] = (plan.run_dir / "manifest.json").stat().st_size / 1024

    # per shard: read one shard's rows back (middle of the file)
    _, t = timed(read_shard_entries, plan.run_dir, len(plan.shards) // 2)
    res["read_shard_ms"] = t * 1000

    # manifest: fold one finished shard in (rewrites manifest.json), with realistic results
    result = {"shard_id": 0, "state": "complete", "scored": k, "failed": 0, "failed_images": [], "attempt": 1,
              "files": [str(tmp / "a.parquet"), str(tmp / "b.parquet")], "device": "cuda:0", "worker": "gpu-07:12345",
              "seconds": 12.3, "warnings": {}}
    times = []
    for sid in range(0, min(50, len(plan.shards))):
        _, t = timed(mf.record_shard, plan.manifest, plan.run_dir, {**result, "shard_id": sid})
        times.append(t)
    res["record_shard_ms"] = sorted(times)[len(times) // 2] * 1000
    res["manifest_after_kib_per_shard"] = (plan.run_dir / "manifest.json").stat().st_size / 1024 / len(plan.shards)

    # part file: one shard of predictions
    now = datetime.now(UTC)
    rnd = random.Random(0)  # scores as incompressible as real ones
    rows = [
        {"run_id": plan.run_id, "image_path": e.image_path, "label": e.label, "label_name": e.label_name,
         "pred_index": (c := rnd.randrange(100)), "pred_label": classes[c], "score": rnd.random(),
         "topk_indices": [c, *rnd.sample(range(100), 4)], "topk_scores": sorted((rnd.random() for _ in range(5)), reverse=True),
         "model_id": "0" * 64, "device": "cuda:0", "worker": "gpu-07:12345", "shard_id": 0, "batch_id": i // 64,
         "scored_at": now, "file_size": e.size, "file_mtime_ns": e.mtime_ns}
        for i, e in enumerate(entries[:k])
    ]
    for extra in ("model_key",):
        if any(f.name == extra for f in PREDICTIONS_SCHEMA):
            for r in rows:
                r[extra] = "1" * 64
    part = tmp / "part-00000.parquet"
    _, t = timed(write_table_atomic, make_table(rows, PREDICTIONS_SCHEMA), part)
    res["part_rows"] = k
    res["part_kib"] = part.stat().st_size / 1024
    res["part_write_ms"] = t * 1000
    res["cpu_cores"] = os.cpu_count() or 1
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
