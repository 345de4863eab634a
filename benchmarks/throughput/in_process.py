"""The paths ``make bench`` times inside its own process, on the same images and checkpoint:

- the fp32 full-decode reference every agreement figure is measured against (not timed);
- imgscore's own scoring path, for agreement (not timed);
- (a) the forward-only limit on pre-decoded tensors, with torch and with every backend;
- decode core time per image (draft and full);
- (b) the plain loop people write first, and (c) the same loop tuned.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from benchmarks.common.machine import cores, has_bf16
from benchmarks.common.memory import TreeRss
from benchmarks.common.models import fast_module, plain_module, reference_transform
from benchmarks.common.paths import DATA
from benchmarks.common.timing import rate

Predictions = dict[str, tuple[int, float]]  # image path relative to the root → (top-1 index, its score)


def top1(probs: torch.Tensor) -> tuple[list[int], list[float]]:
    """Top-1 class indices and scores of probabilities float32 [N, C]."""
    s, i = probs.max(1)
    return [int(v) for v in i], [float(v) for v in s]


def agreement(preds: Predictions, ref: Predictions) -> dict[str, Any]:
    """Top-1 agreement of ``preds`` with ``ref`` on the images both scored, the largest top-1
    score difference where they agree, and how many of ``preds`` ``ref`` lacks."""
    common = [k for k in preds if k in ref]
    if not common:
        return {"n": 0}
    same = sum(preds[k][0] == ref[k][0] for k in common)
    dscore = [abs(preds[k][1] - ref[k][1]) for k in common if preds[k][0] == ref[k][0]]
    return {
        "n": len(common),
        "top1_agreement": round(same / len(common), 4),
        "max_top1_score_diff": round(max(dscore), 4) if dscore else None,
        "missing": len(preds) - len(common),
    }


class _Decode(Dataset):
    """The tuned loop's dataset: ImageFolder samples, JPEG draft decode, the eval recipe."""

    def __init__(self, samples: list[tuple[str, int]], draft: bool):
        self.samples, self.draft = samples, draft
        self.tf = reference_transform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = Image.open(path)
        if self.draft and img.format == "JPEG" and min(img.size) >= 512:
            img.draft("RGB", (256, 256))
        return self.tf(img.convert("RGB")), i


class _Noisy:
    """±1 grey level of seeded uniform noise on the decoded image, then the eval recipe: a change
    nobody can see, to show how sensitive a model is (its noise floor)."""

    def __init__(self) -> None:
        self.tf = reference_transform()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        a = np.asarray(img, dtype=np.int16)
        a = a + np.random.default_rng(a.shape[0] * 7919 + a.shape[1]).integers(-1, 2, a.shape, dtype=np.int16)
        return self.tf(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))


def _rel(path: str, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def reference_predictions(root: Path, arch: str, ckpt: Path, batch: int, noise: bool = False) -> Predictions:
    """fp32 full-decode reference for every image under ``root`` (not timed): PIL full decode,
    torchvision's eval recipe, the unmodified module, default memory format."""
    torch.set_num_threads(cores())
    model = plain_module(arch, ckpt)
    dsf = ImageFolder(str(root), transform=_Noisy() if noise else reference_transform())
    loader = DataLoader(dsf, batch_size=batch, num_workers=min(2, cores()))
    out, k = {}, 0
    with torch.inference_mode():
        for x, _ in loader:
            idx, sc = top1(torch.softmax(model(x), 1))
            for j in range(len(idx)):
                out[_rel(dsf.samples[k][0], root)] = (idx[j], sc[j])
                k += 1
    return out


def load_folded(arch: str, ckpt: Path, channels_last: bool = True, fold: bool = True):
    """``imgscore.inference.model.load_model`` on the CPU with the default preprocessing, conv-BN
    folded when ``fold``."""
    from imgscore.config.scoring import ModelConfig, PreprocessConfig
    from imgscore.inference.model import load_model

    lm = load_model(
        ModelConfig(arch=arch, checkpoint=ckpt), PreprocessConfig(), torch.device("cpu"), channels_last=channels_last
    )
    return lm.folded() if fold else lm


def pipeline_predictions(root: Path, arch: str, ckpt: Path, batch: int, workers: int) -> Predictions:
    """Top-1 through imgscore's own scoring path, in process: scan, ShardDataset (JPEG draft),
    collate, load_model(channels_last).folded(), forward_probs — what score_shard runs."""
    from imgscore.images.dataset import ShardDataset, collate_samples
    from imgscore.images.preprocess import DecodeOptions
    from imgscore.images.scan import scan_images
    from imgscore.inference.backends.eager import forward_probs

    torch.set_num_threads(cores())
    lm = load_folded(arch, ckpt)
    index = scan_images(root, "auto", True)
    dsf = ShardDataset(str(root), index.entries, lm.preprocess, DecodeOptions(max_pixels=10**9))
    loader = DataLoader(
        dsf,
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate_samples,
        multiprocessing_context="fork" if workers else None,
    )
    out = {}
    with torch.inference_mode():
        for b in loader:
            idx, sc = top1(forward_probs(lm, b.tensor.contiguous(memory_format=torch.channels_last), "fp32"))
            for j, pos in enumerate(b.positions):
                out[index.entries[pos].image_path] = (idx[j], sc[j])
    return out


def forward_only(arch: str, ckpt: Path, tensors: torch.Tensor, batches: int, threads: int, fast: bool = True) -> dict:
    """img/s of the forward pass alone on pre-decoded tensors (batch of ``len(tensors)``)."""
    torch.set_num_threads(threads)
    model = fast_module(arch, ckpt) if fast else plain_module(arch, ckpt)
    x = tensors.contiguous(memory_format=torch.channels_last) if fast else tensors.contiguous()
    with torch.inference_mode():
        model(x)  # warm-up: oneDNN primitive creation, allocator
        t0 = time.perf_counter()
        for _ in range(batches):
            torch.softmax(model(x), 1)
        dt = time.perf_counter() - t0
    torch.set_num_threads(cores())
    n = batches * len(x)
    return {"images": n, "seconds": round(dt, 3), "img_per_s": rate(n, dt), "threads": threads, "batch": len(x)}


BACKENDS = (("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("torch", "bf16"))


def backend_forward_only(arch: str, ckpt: Path, tensors: torch.Tensor, batches: int, threads: int) -> dict:
    """Forward-only img/s of every backend on the same pre-decoded batch, through imgscore's own
    backends (imgscore/inference/backends/: folded torch module, ONNX export from the bench cache), and each
    one's agreement with torch fp32 on that batch (top-1, mean and max |Δscore|, as the canary)."""
    from imgscore.inference.backends.canary import compare_probs
    from imgscore.inference.backends.factory import make_forward

    torch.set_num_threads(threads)
    lm = load_folded(arch, ckpt)
    out: dict = {}
    ref = None
    for name, precision in BACKENDS:
        key = f"{name} {precision}"
        try:
            fwd = make_forward(lm, name, precision, threads, DATA / "cache")
        except Exception as exc:  # a runtime that is not installed: recorded, not fatal
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        x = tensors.contiguous(memory_format=torch.channels_last) if fwd.channels_last else tensors.contiguous()
        n = batches if precision == "fp32" or has_bf16() else 1  # emulated bf16 is slow: one batch says enough
        with torch.inference_mode():
            fwd(x)  # warm-up
            t0 = time.perf_counter()
            for _ in range(n):
                p = fwd(x)
            dt = time.perf_counter() - t0
        if ref is None:
            ref = p
        agree, mean_d, max_d = compare_probs(ref, p)
        out[key] = {
            "img_per_s": rate(n * len(x), dt),
            "images": n * len(x),
            "threads": threads,
            "precision_reported": fwd.precision,
            "top1_agreement": round(agree, 4),
            "mean_abs_dscore": round(mean_d, 5),
            "max_abs_dscore": round(max_d, 5),
        }
    torch.set_num_threads(cores())
    return out


def decode_core_time(paths: list[Path], draft: bool) -> dict:
    """Seconds of one core per image for decode + eval transform (what a DataLoader worker does),
    through imgscore's own dataset code (EXIF, mode handling, transform)."""
    from imgscore.images.dataset import ShardDataset
    from imgscore.images.entries import ImageEntry
    from imgscore.images.preprocess import DecodeOptions, PreprocessSpec

    torch.set_num_threads(1)
    root = os.path.commonpath([str(p) for p in paths])
    entries = [ImageEntry(os.path.relpath(p, root), None, None, 0, 0, None) for p in paths]
    dsf = ShardDataset(root, entries, PreprocessSpec(jpeg_draft=draft), DecodeOptions(max_pixels=10**9))
    dsf[0]  # warm-up
    t0 = time.process_time()
    w0 = time.perf_counter()
    for i in range(len(dsf)):
        s = dsf[i]
        assert hasattr(s, "tensor"), s
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    torch.set_num_threads(cores())
    return {
        "images": len(paths),
        "core_s_per_image": round(cpu / len(paths), 5),
        "wall_s_per_image": round(wall / len(paths), 5),
        "draft": draft,
    }


def plain_loop(root: Path, arch: str, ckpt: Path) -> dict:
    """(b) What people write first: ImageFolder + eval recipe, DataLoader(batch_size=1), no_grad."""
    torch.set_num_threads(cores())
    model = plain_module(arch, ckpt)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))  # warm-up outside the timed region, as for every path
    preds = {}
    with TreeRss(os.getpid()) as rss:
        t0 = time.perf_counter()
        dsf = ImageFolder(str(root), transform=reference_transform())
        loader = DataLoader(dsf, batch_size=1)
        with torch.no_grad():
            for i, (x, _) in enumerate(loader):
                idx, sc = top1(torch.softmax(model(x), 1))
                preds[_rel(dsf.samples[i][0], root)] = (idx[0], sc[0])
        dt = time.perf_counter() - t0
    n = len(preds)
    return {"images": n, "seconds": round(dt, 3), "img_per_s": rate(n, dt), **rss.mib, "_preds": preds}


def tuned_loop(root: Path, arch: str, ckpt: Path, batch: int, workers: int, threads: int) -> dict:
    """(c) The same loop, tuned: draft decode, batch, DataLoader workers, channels_last, folded
    conv-BN, inference_mode."""
    torch.set_num_threads(threads)
    model = fast_module(arch, ckpt)
    with torch.inference_mode():
        model(torch.zeros(2, 3, 224, 224).contiguous(memory_format=torch.channels_last))
    preds = {}
    with TreeRss(os.getpid()) as rss:
        t0 = time.perf_counter()
        samples = ImageFolder(str(root)).samples
        loader = DataLoader(
            _Decode(samples, draft=True),
            batch_size=batch,
            num_workers=workers,
            multiprocessing_context="fork" if workers else None,
        )
        with torch.inference_mode():
            for x, ids in loader:
                idx, sc = top1(torch.softmax(model(x.contiguous(memory_format=torch.channels_last)), 1))
                for j, i in enumerate(ids.tolist()):
                    preds[_rel(samples[i][0], root)] = (idx[j], sc[j])
        dt = time.perf_counter() - t0
    torch.set_num_threads(cores())
    n = len(preds)
    return {
        "images": n,
        "seconds": round(dt, 3),
        "img_per_s": rate(n, dt),
        "batch": batch,
        "workers": workers,
        "threads": threads,
        **rss.mib,
        "_preds": preds,
    }
