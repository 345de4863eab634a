"""Two models on one decode, the mechanism only: what sharing the decode of 12-megapixel JPEGs can give.

Several models scored in one pass over the images (``models:``) share each image's decode; this
measures that gain without the rest of the run, on the benchmark's 4000×3000 JPEGs
(``benchmarks/run.py``'s generator) in one process:

- ``two_passes``: for each of two models, decode + resize + crop every image (imgscore's
  ``decode_image`` with ``preprocess.jpeg_draft`` and its transform) and forward it in batches —
  what two ``imgscore run`` s do today, without their Prefect and Parquet overhead;
- ``one_pass``: decode + transform each image once and forward the batch through both models.

Both models are mobilenet_v3_large (production + candidate: two checkpoints, same
preprocessing), seeded random weights (the cost does not depend on the values). Decoding runs
in the main thread, the forwards with ``--threads`` torch threads; the three ways are timed in
turn, ``--repeats`` times, and the best of each is kept (a load change hits all alike).

    .venv/bin/python benchmarks/decode_share.py [--images 24] [--batch 8] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torchvision

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from run import DATA, cores, cpu_model, make_images  # noqa: E402

from imgscore.images.preprocess import DecodeOptions, PreprocessSpec, build_transform, decode_image  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    folder = DATA / "decode-4000x3000"
    rels = make_images(folder, args.images, (4000, 3000), seed=0)
    paths = [str(folder / "all" / r) for r in rels]
    spec, opts = PreprocessSpec(), DecodeOptions(max_pixels=10**9)
    tf = build_transform(spec)
    torch.set_num_threads(args.threads)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(torchvision.models.mobilenet_v3_large().eval().to(memory_format=torch.channels_last))

    def decode(batch_paths):
        return torch.stack([tf(decode_image(p, spec, opts)) for p in batch_paths]).contiguous(memory_format=torch.channels_last)

    batches = [paths[i : i + args.batch] for i in range(0, len(paths), args.batch)]

    def two_passes():
        for m in models:
            for b in batches:
                m(decode(b))

    def one_pass():
        for b in batches:
            x = decode(b)
            for m in models:
                m(x)

    def decode_only():
        for b in batches:
            decode(b)

    def interleaved(*fns):
        """Best time of each, measured in turn ``--repeats`` times (a load change hits all alike)."""
        times = [[] for _ in fns]
        for _ in range(args.repeats):
            for t, fn in zip(times, fns, strict=True):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    fn()
                t.append(time.perf_counter() - t0)
        return [min(t) for t in times]

    load_before = [round(x, 2) for x in os.getloadavg()]
    with torch.inference_mode():
        models[0](decode(batches[0]))  # warm-up: allocator, kernels, file cache
    t_decode, t_two, t_one = interleaved(decode_only, two_passes, one_pass)
    out = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "cpu": cpu_model(),
        "cores": cores(),
        "torch_threads": args.threads,
        "images": len(paths),
        "batch": args.batch,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "decode_ms_per_image": round(1000 * t_decode / len(paths), 1),
        "two_passes_s": round(t_two, 3),
        "one_pass_s": round(t_one, 3),
        "speedup": round(t_two / t_one, 3),
    }
    print(json.dumps(out, indent=2))
    res = REPO / "benchmarks" / "results" / "decode_share.json"
    res.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
