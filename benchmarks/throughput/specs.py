"""The workloads of ``make bench`` and their sizes (``--sizes full`` or ``tiny``).

compute  resnet50           on 1600×1200 JPEGs  (forward pass dominates)
decode   mobilenet_v3_large on 4000×3000 JPEGs  (12-megapixel decode dominates)
memory   mobilenet_v3_large on 400×300 JPEGs, 64 vs 640 images, 32 per shard (peak RSS
         flat in the number of images; Prefect overhead per shard)
small    resnet18 on 32×32 JPEGs: one run against two at once
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common.images import GENERATOR_VERSION, make_images, spread
from benchmarks.common.machine import cores
from benchmarks.common.models import make_checkpoint
from benchmarks.common.paths import DATA


@dataclass(frozen=True)
class Workload:
    name: str
    arch: str
    size: tuple[int, int]  # (width, height) of every JPEG
    n_small: int  # imgscore run, small size
    n_large: int  # imgscore run, large size (= images generated)
    n_plain: int  # plain batch-1 loop
    n_tuned: int  # tuned plain loop
    fwd_batches: int  # timed batches of 32 for the forward-only limit
    n_decode: int  # images timed for decode core-time


@dataclass(frozen=True)
class MemorySpec:
    arch: str
    size: tuple[int, int]
    n_few: int
    n_many: int
    shard: int


@dataclass(frozen=True)
class SmallSpec:
    """Small images: ``images`` JPEGs of ``size``, ``shard`` per shard, resize = crop = height."""

    arch: str
    size: tuple[int, int]
    images: int
    shard: int


SIZES: dict[str, dict[str, Any]] = {
    # compute: 160 and 800 images (5 and 25 batches, one shard each), so both sizes run the same
    # split — with lanes a one-batch shard keeps one lane busy and a 32-image small size would not
    # (benchmarks/NOTES.md, "Lanes"); the run's duration is in NOTES.md too
    "full": {
        "compute": Workload("compute", "resnet50", (1600, 1200), 160, 800, 24, 96, 4, 24),
        "decode": Workload("decode", "mobilenet_v3_large", (4000, 3000), 48, 432, 16, 160, 6, 24),
        "memory": MemorySpec("mobilenet_v3_large", (400, 300), 64, 640, 32),
        "small": SmallSpec("resnet18", (32, 32), 2000, 500),
        "repeats": 1,
        "batch": 32,
    },
    # a smoke run of every code path, for development
    "tiny": {
        "compute": Workload("compute", "resnet50", (1600, 1200), 4, 12, 3, 8, 1, 4),
        "decode": Workload("decode", "mobilenet_v3_large", (4000, 3000), 4, 12, 3, 8, 1, 4),
        "memory": MemorySpec("mobilenet_v3_large", (400, 300), 8, 80, 8),
        "small": SmallSpec("resnet18", (32, 32), 200, 100),
        "repeats": 1,
        "batch": 8,
    },
}

# DataLoader workers × torch threads of the pipeline (nightly.yaml: 2 workers; torch threads:
# all usable cores) — the tuned loop uses the same split so (c) and (d) differ only by imgscore.
PIPELINE_SPLIT = (2, cores())


def prepared(name: str, arch: str, size: tuple[int, int], n: int, seed: int) -> tuple[Path, list[str], Path]:
    """A workload's images and calibrated checkpoint, made once and cached: ``(folder, rels, ckpt)``,
    the images under ``folder/all`` (:func:`benchmarks.common.images.make_images`), the
    checkpoint calibrated on 16 of them."""
    folder = DATA / f"{name}-{size[0]}x{size[1]}"
    rels = make_images(folder, n, size, seed=seed)
    ckpt = make_checkpoint(
        arch, [folder / "all" / r for r in spread(rels, 16)], DATA / "ckpt" / f"{arch}-{name}-v{GENERATOR_VERSION}.pt"
    )
    return folder, rels, ckpt


def prepare_workload(w: Workload) -> tuple[Path, list[str], Path]:
    """:func:`prepared` for a compute or decode workload (its ``n_large`` images)."""
    return prepared(w.name, w.arch, w.size, w.n_large, seed=1 if w.name == "compute" else 2)


def prepare_memory(ms: MemorySpec) -> tuple[Path, list[str], Path]:
    """:func:`prepared` for the memory workload (its ``n_many`` images)."""
    return prepared("memory", ms.arch, ms.size, ms.n_many, seed=3)


def prepare_small(spec: SmallSpec) -> tuple[Path, list[str], Path]:
    """:func:`prepared` for the small-image workload."""
    return prepared("small", spec.arch, spec.size, spec.images, seed=4)
