"""Two models on one decode, the mechanism only: what sharing the decode of 12-megapixel JPEGs can give.

Several models scored in one pass over the images (``models:``) share each image's decode; this
measures that gain without the rest of the run, on the benchmark's 4000×3000 JPEGs
(``benchmarks.common.images``, the generator of ``make bench``) in one process:

- ``two_passes``: for each of two models, decode + resize + crop every image (imgscore's
  ``decode_image`` with ``preprocess.jpeg_draft`` and its transform) and forward it in batches —
  what two ``imgscore run`` s do, without their Prefect and Parquet overhead;
- ``one_pass``: decode + transform each image once and forward the batch through both models.

Both models are mobilenet_v3_large (production + candidate: two checkpoints, same
preprocessing), seeded random weights (the cost does not depend on the values). Decoding runs
in the main thread, the forwards with ``--threads`` torch threads; the three ways are timed in
turn, ``--repeats`` times, and the best of each is kept (a load change hits all alike).

    .venv/bin/python -m benchmarks.decode_share [--images 24] [--batch 8] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torchvision

from benchmarks.common.images import make_images
from benchmarks.common.machine import cores, cpu_model, loadavg, utc_now
from benchmarks.common.paths import DATA
from benchmarks.common.results import write_json
from benchmarks.common.timing import interleaved
from imgscore.images.decode import decode_image
from imgscore.images.preprocess import DecodeOptions, PreprocessSpec, build_transform


def ways(paths: list[str], batch: int) -> dict[str, Callable[[], None]]:
    """``decode_only``, ``two_passes`` and ``one_pass`` over ``paths`` in batches of ``batch``,
    with two seeded mobilenet_v3_large in channels_last (the first warmed up)."""
    spec, opts = PreprocessSpec(), DecodeOptions(max_pixels=10**9)
    tf = build_transform(spec)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(torchvision.models.mobilenet_v3_large().eval().to(memory_format=torch.channels_last))

    def decode(batch_paths: list[str]) -> torch.Tensor:
        return torch.stack([tf(decode_image(p, spec, opts)) for p in batch_paths]).contiguous(
            memory_format=torch.channels_last
        )

    batches = [paths[i : i + batch] for i in range(0, len(paths), batch)]

    def two_passes() -> None:
        for m in models:
            for b in batches:
                m(decode(b))

    def one_pass() -> None:
        for b in batches:
            x = decode(b)
            for m in models:
                m(x)

    def decode_only() -> None:
        for b in batches:
            decode(b)

    with torch.inference_mode():
        models[0](decode(batches[0]))  # warm-up: allocator, kernels, file cache
    return {"decode_only": decode_only, "two_passes": two_passes, "one_pass": one_pass}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    folder = DATA / "decode-4000x3000"
    rels = make_images(folder, args.images, (4000, 3000), seed=0)
    paths = [str(folder / "all" / r) for r in rels]
    torch.set_num_threads(args.threads)
    load_before = loadavg()
    w = ways(paths, args.batch)
    t_decode, t_two, t_one = interleaved(
        [w["decode_only"], w["two_passes"], w["one_pass"]], args.repeats, torch.inference_mode
    )
    out = {
        "date": utc_now("%Y-%m-%dT%H:%M+00:00"),
        "cpu": cpu_model(),
        "cores": cores(),
        "torch_threads": args.threads,
        "images": len(paths),
        "batch": args.batch,
        "load_before": load_before,
        "load_after": loadavg(),
        "decode_ms_per_image": round(1000 * t_decode / len(paths), 1),
        "two_passes_s": round(t_two, 3),
        "one_pass_s": round(t_one, 3),
        "speedup": round(t_two / t_one, 3),
    }
    print(json.dumps(out, indent=2))
    write_json(out, "decode_share.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
