"""Photo workloads made from the real photos shipped with scikit-image and scikit-learn.

Each image is a distinct variant of one source photo (random 4:3 crop, flip, brightness jitter,
bicubic resize to an exact size, a little sensor-like grain so the JPEGs cost what photos cost
to entropy-decode), saved as a quality-90 JPEG in ImageFolder layout (class = source photo) and
cached under benchmarks/data/ (a stamp file records the recipe; a different recipe remakes them).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

GENERATOR_VERSION = 3  # bump when the image recipe changes (invalidates the cache)

SKIMAGE_SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "colorwheel",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "coins",
    "clock",
)


def sources() -> list[tuple[str, Image.Image]]:
    """The source photos as ``(name, RGB image)``: scikit-image's, then scikit-learn's samples."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    out = [(n, Image.fromarray(getattr(skd, n)()).convert("RGB")) for n in SKIMAGE_SOURCES]
    sk = load_sample_images()
    out += [(Path(f).stem, Image.fromarray(a).convert("RGB")) for f, a in zip(sk.filenames, sk.images, strict=True)]
    return out


def _variant(src: Image.Image, size: tuple[int, int], rng: np.random.Generator, grain: np.ndarray) -> Image.Image:
    """A distinct photo of exactly ``size``: random 4:3 crop (50–100 % of the largest), flip,
    brightness ×0.85–1.15, bicubic resize, and grain (a shifted tile of uniform noise)."""
    W, H = size
    sw, sh = src.size
    cw = min(sw, int(sh * W / H))
    ch = int(cw * H / W)
    f = float(rng.uniform(0.5, 1.0)) ** 0.5
    cw, ch = max(8, int(cw * f)), max(6, int(ch * f))
    left, top = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    img = src.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.resize((W, H), Image.Resampling.BICUBIC)
    a = np.asarray(img, dtype=np.int16) * float(rng.uniform(0.85, 1.15))
    th, tw = grain.shape[:2]
    dy, dx = int(rng.integers(0, th)), int(rng.integers(0, tw))
    g = np.roll(grain, (dy, dx), axis=(0, 1))
    reps = (H // th + 1, W // tw + 1, 1)
    a = a + np.tile(g, reps)[:H, :W]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


_SRC_CACHE: list[tuple[str, Image.Image]] = []  # per worker process of make_images' pool


def _make_one(args: tuple[str, int, tuple[int, int], int]) -> None:
    path, idx, size, seed = args
    srcs = _SRC_CACHE or sources()
    _SRC_CACHE[:] = srcs
    rng = np.random.default_rng([seed, idx])
    grain = np.random.default_rng(seed).integers(-6, 7, size=(509, 512, 3), dtype=np.int16)
    _, src = srcs[idx % len(srcs)]
    _variant(src, size, rng, grain).save(path, "JPEG", quality=90)


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[str]:
    """``n`` distinct JPEGs of ``size`` (width, height) in ImageFolder layout under ``folder/all``,
    made in a process pool of every core the first time and cached. Returns their paths relative
    to ``folder/all``, sorted."""
    names = [s for s, _ in sources()]
    rels = sorted(f"{names[i % len(names)]}/img_{i:05d}.jpg" for i in range(n))
    stamp = folder / "stamp.json"
    want = {"version": GENERATOR_VERSION, "size": list(size), "seed": seed}
    have = json.loads(stamp.read_text()) if stamp.exists() else {}
    all_dir = folder / "all"
    if have.get("version") != want["version"] or have.get("size") != want["size"] or have.get("seed") != seed:
        shutil.rmtree(folder, ignore_errors=True)
    todo = []
    for rel in rels:
        p = all_dir / rel
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            todo.append((str(p), int(Path(rel).stem.split("_")[1]), size, seed))
    if todo:
        t0 = time.perf_counter()
        with mp.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
            pool.map(_make_one, todo, chunksize=4)
        print(f"  made {len(todo)} {size[0]}x{size[1]} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(want))
    return rels


def spread(rels: list[str], n: int) -> list[str]:
    """The first ``n`` of ``rels`` by image number (evenly spread over the classes), sorted."""
    by_index = sorted(rels, key=lambda r: int(Path(r).stem.split("_")[1]))
    return sorted(by_index[:n])


def subset(folder: Path, rels: list[str], n: int) -> Path:
    """``folder/subN``: an ImageFolder of hard links to :func:`spread`'s ``n`` of ``rels`` (reused when it matches)."""
    pick = spread(rels, n)
    out = folder / f"sub{n}"
    if out.exists() and sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == sorted(pick):
        return out
    shutil.rmtree(out, ignore_errors=True)
    for rel in pick:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(folder / "all" / rel, out / rel)
    return out
