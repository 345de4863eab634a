"""Decode-bound path: libvips shrink-on-load against Pillow's JPEG draft decode.

On the benchmark's 4000×3000 JPEGs (``python -m benchmarks.run --prepare`` makes them), per image and
one core (VIPS_CONCURRENCY=1, torch 1 thread): decode + resize 256 + center crop 224 + normalise
into the float32 [3, 224, 224] tensor the model gets, as

- ``pillow_full``: Pillow full decode, then imgscore's transform — the fidelity reference;
- ``pillow_draft``: imgscore's decode (``preprocess.jpeg_draft``: libjpeg DCT scaling to no less
  than twice the resize target), then the same transform — what imgscore runs;
- ``vips_shrink``: pyvips ``new_from_file(shrink=k)`` with the same k as the draft (libjpeg
  shrink-on-load), then the same transform;
- ``vips_thumbnail``: pyvips ``thumbnail`` (shrink-on-load, then libvips' own resize to the
  shorter side 256), then center crop and normalise.

Fidelity: mean |Δ| of each tensor against the reference (normalised units; about 0.02 is one
grey level on average) and top-1 agreement of the demo's trained resnet18 with the reference.

    .venv/bin/python -m benchmarks.decoders [--images 48]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from PIL import Image

from benchmarks.common.machine import loadavg
from benchmarks.common.paths import DATA
from benchmarks.common.results import write_json
from imgscore.images.decode import decode_image
from imgscore.images.preprocess import DecodeOptions, PreprocessSpec, build_transform

Way = Callable[[Path], torch.Tensor]


def ways(pyvips: ModuleType) -> dict[str, Way]:
    """The four ways from a JPEG path to the model's tensor (module docstring)."""
    full, draft = PreprocessSpec(jpeg_draft=False), PreprocessSpec(jpeg_draft=True)
    opts = DecodeOptions(max_pixels=10**9)
    tf = build_transform(full)
    crop_norm = build_transform(PreprocessSpec())  # resize 256 is a no-op on a 256 shorter side

    def pil_full(p: Path) -> torch.Tensor:
        return tf(decode_image(str(p), full, opts))

    def pil_draft(p: Path) -> torch.Tensor:
        return tf(decode_image(str(p), draft, opts))

    def vips_shrink(p: Path) -> torch.Tensor:
        w, h = Image.open(p).size
        k = 1
        while k < 8 and min(w, h) // (2 * k) >= 2 * draft.resize:
            k *= 2
        v = pyvips.Image.new_from_file(str(p), shrink=k, access="sequential")
        return tf(Image.fromarray(v.numpy()))

    def vips_thumb(p: Path) -> torch.Tensor:
        w, h = Image.open(p).size  # header only
        scale = draft.resize / min(w, h)
        v = pyvips.Image.thumbnail(str(p), round(w * scale), height=round(h * scale), size="force")
        return crop_norm(Image.fromarray(v.numpy()))

    return {
        "pillow_full": pil_full,
        "pillow_draft": pil_draft,
        "vips_shrink": vips_shrink,
        "vips_thumbnail": vips_thumb,
    }


def fidelity(tensors: dict[str, torch.Tensor], out: dict) -> None:
    """Each way's difference from ``pillow_full``, and the trained model's top-1 agreement when
    its checkpoint is cached (``make bench`` trains it), into ``out[way]``."""
    ref = tensors["pillow_full"]
    ckpt = DATA / "ckpt" / "digits_resnet18.pt"
    model = None
    if ckpt.exists():
        from imgscore.config.scoring import ModelConfig, PreprocessConfig
        from imgscore.inference.model import load_model

        model = load_model(
            ModelConfig(arch="resnet18", checkpoint=ckpt), PreprocessConfig(), torch.device("cpu"), channels_last=False
        )
    for name, x in tensors.items():
        out[name]["mean_abs_diff_vs_full"] = round(float((x - ref).abs().mean()), 4)
        out[name]["max_image_mean_abs_diff"] = round(float((x - ref).abs().mean((1, 2, 3)).max()), 4)
        if model is not None:
            with torch.inference_mode():
                a, b = model.module(ref).argmax(1), model.module(x).argmax(1)
            out[name]["top1_agreement_trained"] = round(float((a == b).float().mean()), 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    args = ap.parse_args(argv)
    os.environ.setdefault("VIPS_CONCURRENCY", "1")  # one core, like one DataLoader worker; read when libvips starts
    import pyvips

    pyvips.cache_set_max(0)
    torch.set_num_threads(1)
    paths = sorted((DATA / "decode-4000x3000" / "all").rglob("*.jpg"))[: args.images]
    if not paths:
        raise SystemExit("no benchmark images: run `.venv/bin/python -m benchmarks.run --prepare` first")
    out: dict = {
        "images": len(paths),
        "load_before": loadavg(),
        "pyvips": pyvips.__version__,
        "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
    }
    tensors: dict = {}
    for name, fn in ways(pyvips).items():
        fn(paths[0])  # warm-up
        best = float("inf")
        for _ in range(2):
            t0 = time.process_time()
            xs = [fn(p) for p in paths]
            best = min(best, (time.process_time() - t0) / len(paths))
        tensors[name] = torch.stack(xs)
        out[name] = {"core_ms_per_image": round(best * 1e3, 2)}
    fidelity(tensors, out)
    out["load_after"] = loadavg()
    print(json.dumps(out, indent=1))
    dest = write_json(out, "decoders.json")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
