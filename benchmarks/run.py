"""imgscore throughput benchmark: `make bench` (``.venv/bin/python benchmarks/run.py``).

One process run measures, on the same images and the same model:

  (a) the forward-only limit: the best forward configuration on pre-decoded tensors;
  (b) the plain loop people write first: ImageFolder, torchvision's eval recipe,
      DataLoader(batch_size=1), PIL full decode, torch.no_grad;
  (c) a tuned plain loop: the same ImageFolder with JPEG draft decoding, batch 32, DataLoader
      workers, channels_last, conv-BN folding, torch.inference_mode;
  (d) ``imgscore run --config configs/nightly.yaml`` as a whole subprocess at two sizes, so the
      fixed start-up cost separates from the marginal throughput (Δimages / Δseconds).

Workloads, made here from the real photos shipped with scikit-image and scikit-learn (cropped,
flipped, brightness-jittered, resized, with a little sensor-like grain so the JPEGs have a
realistic entropy-coding cost; every file is distinct) and cached under benchmarks/data/
(git-ignored):

  compute  resnet50           on 1600×1200 JPEGs  (forward pass dominates)
  decode   mobilenet_v3_large on 4000×3000 JPEGs  (12-megapixel decode dominates)
  memory   mobilenet_v3_large on 400×300 JPEGs, 64 vs 640 images, 32 per shard (peak RSS
           flat in the number of images; Prefect overhead per shard)

Weights do not matter for speed, but agreement needs a model whose answer depends on the image:
the checkpoints are seeded random weights whose BatchNorm statistics and head bias/scale are
calibrated on 16 of the workload's photos (a random network with fresh BatchNorm statistics
predicts the same class for every image, which would make any agreement figure vacuous).

Agreement is measured against the fp32 full-decode reference: PIL full decode, torchvision's
eval recipe, the unmodified torchvision module in the default memory format, fp32.

Output: benchmarks/results/latest.md and latest.json (``--sizes full``, the default), or
benchmarks/data/results-tiny.* for ``--sizes tiny`` (a smoke run for development).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T1
from torchvision.datasets import ImageFolder

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imgscore.inference.model import fold_conv_bn  # noqa: E402

DATA = REPO / "benchmarks" / "data"
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
GENERATOR_VERSION = 3  # bump when the image recipe changes (invalidates the cache)

SKIMAGE_SOURCES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
    "immunohistochemistry", "colorwheel", "camera", "brick", "grass", "gravel", "moon", "coins", "clock",
)


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


SIZES = {
    # about 12 minutes on 2 cores with --repeats 2 and the images cached (2026-12-01; a few more
    # to make them once). compute: 160 and 800 images (5 and 25 batches, one shard each), so both
    # sizes run the same split — with lanes a one-batch shard keeps one lane busy and a 32-image
    # small size would not (benchmarks/NOTES.md)
    "full": {
        "compute": Workload("compute", "resnet50", (1600, 1200), 160, 800, 24, 96, 4, 24),
        "decode": Workload("decode", "mobilenet_v3_large", (4000, 3000), 48, 432, 16, 160, 6, 24),
        "memory": MemorySpec("mobilenet_v3_large", (400, 300), 64, 640, 32),
        "small": SmallSpec("resnet18", (32, 32), 2000, 500),
        "repeats": 1,
        "batch": 32,
    },
    # smoke test of every code path: under 2 minutes
    "tiny": {
        "compute": Workload("compute", "resnet50", (1600, 1200), 4, 12, 3, 8, 1, 4),
        "decode": Workload("decode", "mobilenet_v3_large", (4000, 3000), 4, 12, 3, 8, 1, 4),
        "memory": MemorySpec("mobilenet_v3_large", (400, 300), 8, 80, 8),
        "small": SmallSpec("resnet18", (32, 32), 200, 100),
        "repeats": 1,
        "batch": 8,
    },
}


# ----------------------------------------------------------------------------- images


def _sources() -> list[tuple[str, Image.Image]]:
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


def _make_one(args) -> None:
    path, idx, size, seed = args
    srcs = _SRC_CACHE or _sources()
    _SRC_CACHE[:] = srcs
    rng = np.random.default_rng([seed, idx])
    grain = np.random.default_rng(seed).integers(-6, 7, size=(509, 512, 3), dtype=np.int16)
    _, src = srcs[idx % len(srcs)]
    _variant(src, size, rng, grain).save(path, "JPEG", quality=90)


_SRC_CACHE: list = []


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[str]:
    """``n`` distinct JPEGs of ``size`` in ImageFolder layout (class = source photo) under
    ``folder/all``; cached (a stamp file records the recipe). Returns the relative paths, sorted."""
    names = [s for s, _ in _sources()]
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
        import multiprocessing as mp

        with mp.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
            pool.map(_make_one, todo, chunksize=4)
        print(f"  made {len(todo)} {size[0]}x{size[1]} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(want))
    return rels


def subset(folder: Path, rels: list[str], n: int) -> Path:
    """A folder with hard links to the first ``n`` of ``rels`` (evenly spread over classes)."""
    pick = _spread(rels, n)
    out = folder / f"sub{n}"
    if out.exists() and sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == sorted(pick):
        return out
    shutil.rmtree(out, ignore_errors=True)
    for rel in pick:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(folder / "all" / rel, out / rel)
    return out


def _spread(rels: list[str], n: int) -> list[str]:
    by_index = sorted(rels, key=lambda r: int(Path(r).stem.split("_")[1]))
    return sorted(by_index[:n])


# ----------------------------------------------------------------------------- models


def reference_transform(resize: int = 256, crop: int = 224):
    return T1.Compose([T1.Resize(resize), T1.CenterCrop(crop), T1.ToTensor(), T1.Normalize(MEAN, STD)])


def make_checkpoint(arch: str, calib: list[Path], path: Path) -> Path:
    """Seeded random ``arch`` with BatchNorm statistics and head calibrated on ``calib`` photos.

    BatchNorm running statistics are the exact mean/variance over the calibration batch (train
    mode, cumulative average); the head's bias is shifted so the mean logit over the batch is 0
    per class and the head is scaled so the logits' spread is about 4, so that predictions vary
    from image to image and softmax scores are not all 1/1000.
    """
    if path.exists():
        return path
    torch.manual_seed(0)
    m = torchvision.models.get_model(arch)
    tf = reference_transform()
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in calib])
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(x)
    m.eval()
    head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    with torch.no_grad():
        lo = m(x)
        head.bias.sub_(lo.mean(0))
        scale = 4.0 / (lo - lo.mean(0)).std(1).mean().item()
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(m.state_dict(), path)
    return path


def plain_module(arch: str, ckpt: Path) -> nn.Module:
    """The unmodified torchvision module (state_dict, or a training dict with ``model``)."""
    obj = torch.load(ckpt, map_location="cpu", weights_only=False)
    sd = obj["model"] if "model" in obj else obj
    head = [k for k, v in sd.items() if k.endswith("weight") and v.ndim == 2][-1]
    m = torchvision.models.get_model(arch, num_classes=sd[head].shape[0])
    m.load_state_dict(sd)
    return m.eval()


def trained_checkpoint() -> Path:
    """The demo's resnet18, trained here on scikit-learn's digit scans (imgscore.demo; cached)."""
    from imgscore.demo import build_digits_folder, train_demo_model

    ckpt = DATA / "ckpt" / "digits_resnet18.pt"
    if not ckpt.exists():
        print("  training the demo's resnet18 on the digit scans (once) …", flush=True)
        train, _ = build_digits_folder(DATA / "digits")
        train_demo_model(train, ckpt, log=lambda *a: None)
    return ckpt


def fast_module(arch: str, ckpt: Path) -> nn.Module:
    """What imgscore runs: conv-BN folded, channels_last, eval."""
    return fold_conv_bn(plain_module(arch, ckpt)).to(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- measuring


class Rss:
    """Peak memory of a process tree, sampled every ``every`` seconds: the sum of RSS (an upper
    bound: pages that forked DataLoader workers share with their parent count once per process),
    plus the root process's own exact RSS high-water mark (VmHWM).

    Not PSS: reading /proc/PID/smaps(_rollup) of a torch process costs 30–700 ms here (CUDA
    libraries map a huge address space), so sampling it ate a whole core and halved the
    throughput being measured. RSS costs microseconds."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every = pid, every
        self.peak_tree = 0
        self.hwm_root = 0
        self.peak_kind = {"server": 0, "others": 0}  # Prefect's temporary server; DataLoader workers and the rest
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
            total = 0
            kind = dict.fromkeys(self.peak_kind, 0)
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    total += rss
                    if p.pid != self.pid:
                        kind["server" if "create_app" in " ".join(p.cmdline()) else "others"] += rss
                except psutil.Error:
                    pass
            self.peak_tree = max(self.peak_tree, total)
            for k, v in kind.items():
                self.peak_kind[k] = max(self.peak_kind[k], v)
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.hwm_root = max(self.hwm_root, int(line.split()[1]) * 1024)
        except (psutil.Error, OSError):
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> Rss:
        if self.pid == os.getpid():
            try:  # reset this process's VmHWM so each phase reports its own peak
                Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            except OSError:
                pass
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        self._t.join()

    @property
    def mib(self) -> dict:
        return {"peak_rss_tree_mib": round(self.peak_tree / 2**20, 1), "peak_rss_main_mib": round(self.hwm_root / 2**20, 1),
                "peak_rss_server_mib": round(self.peak_kind["server"] / 2**20, 1),
                "peak_rss_others_mib": round(self.peak_kind["others"] / 2**20, 1)}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def top1(probs: torch.Tensor) -> tuple[list[int], list[float]]:
    s, i = probs.max(1)
    return [int(v) for v in i], [float(v) for v in s]


def agreement(preds: dict[str, tuple[int, float]], ref: dict[str, tuple[int, float]]) -> dict:
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

    def __init__(self, samples, draft: bool):
        self.samples, self.draft = samples, draft
        self.tf = reference_transform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = Image.open(path)
        if self.draft and img.format == "JPEG" and min(img.size) >= 512:
            img.draft("RGB", (256, 256))
        return self.tf(img.convert("RGB")), i


class _Noisy:
    """±1 grey level of seeded uniform noise on the decoded image, then the eval recipe: a change
    nobody can see, to show how sensitive a model is (its noise floor)."""

    def __init__(self):
        self.tf = reference_transform()

    def __call__(self, img):
        a = np.asarray(img, dtype=np.int16)
        a = a + np.random.default_rng(a.shape[0] * 7919 + a.shape[1]).integers(-1, 2, a.shape, dtype=np.int16)
        return self.tf(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))


def reference_predictions(root: Path, arch: str, ckpt: Path, batch: int, noise: bool = False) -> dict[str, tuple[int, float]]:
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
                rel = os.path.relpath(dsf.samples[k][0], root).replace(os.sep, "/")
                out[rel] = (idx[j], sc[j])
                k += 1
    return out


def pipeline_predictions(root: Path, arch: str, ckpt: Path, batch: int, workers: int) -> dict[str, tuple[int, float]]:
    """Top-1 through imgscore's own scoring path, in process: scan, ShardDataset (JPEG draft),
    collate, load_model(channels_last).folded(), forward_probs — what score_shard runs."""
    from imgscore.config.schema import ModelConfig, PreprocessConfig
    from imgscore.images.dataset import ShardDataset, collate_samples
    from imgscore.images.preprocess import DecodeOptions
    from imgscore.images.scan import scan_images
    from imgscore.inference.model import load_model
    from imgscore.inference.score import forward_probs

    torch.set_num_threads(cores())
    lm = load_model(ModelConfig(arch=arch, checkpoint=ckpt), PreprocessConfig(), torch.device("cpu"), channels_last=True).folded()
    index = scan_images(root, "auto", True)
    dsf = ShardDataset(str(root), index.entries, lm.preprocess, DecodeOptions(max_pixels=10**9))
    loader = DataLoader(dsf, batch_size=batch, num_workers=workers, collate_fn=collate_samples,
                        multiprocessing_context="fork" if workers else None)
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
        dt_ = time.perf_counter() - t0
    torch.set_num_threads(cores())
    n = batches * len(x)
    return {"images": n, "seconds": round(dt_, 3), "img_per_s": round(n / dt_, 2), "threads": threads, "batch": len(x)}


def cpu_flags() -> list[str]:
    """The CPU's SIMD flags that matter here (``lscpu``/``/proc/cpuinfo``): AVX*, AMX, FMA, F16C."""
    from imgscore.inference.backends import cpu_signature

    sig = cpu_signature()
    return sig[sig.index("[") + 1 : -1].split() if "[" in sig else []


def has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512_BF16 or AMX-BF16); without it bf16 is emulated and slow."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def backend_forward_only(arch: str, ckpt: Path, tensors: torch.Tensor, batches: int, threads: int) -> dict:
    """Forward-only img/s of every backend on the same pre-decoded batch, through imgscore's own
    backends (imgscore/inference/backends.py: folded torch module, ONNX export from the bench cache), and each
    one's agreement with torch fp32 on that batch (top-1, mean and max |Δscore|, as the canary)."""
    from imgscore.config.schema import ModelConfig, PreprocessConfig
    from imgscore.inference import backends as B
    from imgscore.inference.model import load_model

    torch.set_num_threads(threads)
    lm = load_model(ModelConfig(arch=arch, checkpoint=ckpt), PreprocessConfig(), torch.device("cpu"), channels_last=True).folded()
    out: dict = {}
    ref = None
    for name, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("torch", "bf16")):
        key = f"{name} {precision}"
        try:
            fwd = B.make_forward(lm, name, precision, threads, DATA / "cache")
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
            dt_ = time.perf_counter() - t0
        if ref is None:
            ref = p
        agree, mean_d, max_d = B.compare_probs(ref, p)
        out[key] = {"img_per_s": round(n * len(x) / dt_, 2), "images": n * len(x), "threads": threads,
                    "precision_reported": fwd.precision, "top1_agreement": round(agree, 4),
                    "mean_abs_dscore": round(mean_d, 5), "max_abs_dscore": round(max_d, 5)}
    torch.set_num_threads(cores())
    return out


def decode_core_time(paths: list[Path], draft: bool) -> dict:
    """Seconds of one core per image for decode + eval transform (what a DataLoader worker does),
    through imgscore's own dataset code (EXIF, mode handling, transform)."""
    from imgscore.images.dataset import ShardDataset
    from imgscore.images.preprocess import DecodeOptions, PreprocessSpec
    from imgscore.images.scan import ImageEntry

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
    return {"images": len(paths), "core_s_per_image": round(cpu / len(paths), 5), "wall_s_per_image": round(wall / len(paths), 5), "draft": draft}


def plain_loop(root: Path, arch: str, ckpt: Path) -> dict:
    """(b) What people write first: ImageFolder + eval recipe, DataLoader(batch_size=1), no_grad."""
    torch.set_num_threads(cores())
    model = plain_module(arch, ckpt)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))  # warm-up outside the timed region, as for every path
    preds = {}
    with Rss(os.getpid()) as rss:
        t0 = time.perf_counter()
        dsf = ImageFolder(str(root), transform=reference_transform())
        loader = DataLoader(dsf, batch_size=1)
        with torch.no_grad():
            for i, (x, _) in enumerate(loader):
                p = torch.softmax(model(x), 1)
                idx, sc = top1(p)
                preds[os.path.relpath(dsf.samples[i][0], root).replace(os.sep, "/")] = (idx[0], sc[0])
        dt_ = time.perf_counter() - t0
    n = len(preds)
    return {"images": n, "seconds": round(dt_, 3), "img_per_s": round(n / dt_, 2), **rss.mib, "_preds": preds}


def tuned_loop(root: Path, arch: str, ckpt: Path, batch: int, workers: int, threads: int) -> dict:
    """(c) The same loop, tuned: draft decode, batch, DataLoader workers, channels_last, folded
    conv-BN, inference_mode."""
    torch.set_num_threads(threads)
    model = fast_module(arch, ckpt)
    with torch.inference_mode():
        model(torch.zeros(2, 3, 224, 224).contiguous(memory_format=torch.channels_last))
    preds = {}
    with Rss(os.getpid()) as rss:
        t0 = time.perf_counter()
        samples = ImageFolder(str(root)).samples
        loader = DataLoader(_Decode(samples, draft=True), batch_size=batch, num_workers=workers,
                            multiprocessing_context="fork" if workers else None)
        with torch.inference_mode():
            for x, ids in loader:
                p = torch.softmax(model(x.contiguous(memory_format=torch.channels_last)), 1)
                idx, sc = top1(p)
                for j, i in enumerate(ids.tolist()):
                    preds[os.path.relpath(samples[i][0], root).replace(os.sep, "/")] = (idx[j], sc[j])
        dt_ = time.perf_counter() - t0
    torch.set_num_threads(cores())
    n = len(preds)
    return {"images": n, "seconds": round(dt_, 3), "img_per_s": round(n / dt_, 2), "batch": batch,
            "workers": workers, "threads": threads, **rss.mib, "_preds": preds}


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PREFECT_HOME"] = str(DATA / "prefect-home")  # own database: no contention with other runs
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # first run migrates it
    env.pop("PREFECT_API_URL", None)  # a temporary server, as a nightly run without a server has
    return env


def imgscore_run(root: Path, arch: str, ckpt: Path, out: Path, sets: list[str] = ()) -> dict:
    """(d) ``imgscore run`` as a subprocess; wall time, peak RSS, start-up and per-shard overhead."""
    return imgscore_runs([(root, arch, ckpt, out, sets)])[0]


def imgscore_runs(specs: list[tuple]) -> list[dict]:
    """Several ``imgscore run`` subprocesses started together (one: :func:`imgscore_run`); each
    ``(root, arch, ckpt, out, sets)``. Returns each run's measures (as :func:`imgscore_run`)."""
    procs = []
    for root, arch, ckpt, out, sets in specs:
        procs.append(_launch(root, arch, ckpt, out, sets))
    results = []
    for p, fh, rss, t0, t_launch, out, log in procs:
        rc = p.wait()
        wall = time.perf_counter() - t0
        rss.__exit__(None, None, None)
        fh.close()
        if rc != 0:
            raise RuntimeError(f"imgscore run exited {rc}; see {log}:\n{log.read_text()[-3000:]}")
        results.append(_collect(out, wall, t_launch, rss))
    return results


def _launch(root: Path, arch: str, ckpt: Path, out: Path, sets) -> tuple:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(BIN / "imgscore"), "run", "--config", str(REPO / "configs" / "nightly.yaml"), "-q",
        "--set", f"input.root={root}", "--set", f"model.arch={arch}", "--set", f"model.checkpoint={ckpt}",
        "--set", f"output.root={out}", "--set", "inference.device=cpu", "--set", "run.skip_scored=false",
        *[a for s in sets for a in ("--set", s)],
    ]
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    t_launch = time.time()
    t0 = time.perf_counter()
    fh = open(log, "wb")  # noqa: SIM115 - closed by imgscore_runs
    p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    rss = Rss(p.pid).__enter__()
    return p, fh, rss, t0, t_launch, out, log


def _collect(out: Path, wall: float, t_launch: float, rss: Rss) -> dict:
    (manifest_path,) = list((out / "runs").glob("*/manifest.json"))
    m = json.loads(manifest_path.read_text())
    shards = m["shards"]
    planned = m["timings"]["planned_at_s"]
    states = [json.loads(f.read_text()) for f in sorted((manifest_path.parent / "shards").glob("*.json"))]
    finished = max(dt.datetime.fromisoformat(s["finished_at"]).timestamp() for s in states)
    shard_s = sum(s["seconds"] for s in shards)
    import pyarrow.dataset as pads

    t = pads.dataset(out / "predictions", format="parquet", partitioning="hive").to_table(
        columns=["image_path", "pred_index", "score"]
    )
    preds = {r["image_path"]: (r["pred_index"], r["score"]) for r in t.to_pylist()}
    return {
        "planned_at": planned,
        "finished_at": finished,
        "inference": m.get("inference"),
        "splits": sorted({(f"{s.get('loader_workers')} lanes" if s.get("lanes") else f"{s.get('loader_workers')}x{s.get('threads')}") + f" batch {s.get('batch_size')}" for s in states}),
        "first_shard_setup_s": max((s.get("setup_s") or 0) for s in states[: max(1, len(states))]) if states else None,
        "images": m["counts"]["scored"],
        "failed": m["counts"]["failed"],
        "shards": len(shards),
        "wall_s": round(wall, 3),
        "img_per_s_end_to_end": round(m["counts"]["scored"] / wall, 2),
        "launch_to_planned_s": round(planned - t_launch, 3),  # imports, server, scan, model load
        "score_phase_s": round(finished - planned, 3),
        "sum_shard_s": round(shard_s, 3),
        "in_shard_img_per_s": round(m["counts"]["scored"] / shard_s, 2) if shard_s else None,
        "outside_shards_s": round(finished - planned - shard_s, 4),  # Prefect task runs, submission
        "threads": sorted({s.get("threads") for s in states}),
        **rss.mib,
        "_preds": preds,
    }


def best_of(runs: list[dict]) -> dict:
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["wall_s_all"] = [r["wall_s"] for r in runs]
    return best


def marginal(small: dict, large: dict) -> dict:
    dn = large["images"] - small["images"]
    dtime = large["wall_s"] - small["wall_s"]
    rate = dn / dtime if dtime > 0 else float("nan")
    startup = small["wall_s"] - small["images"] / rate
    return {"images": dn, "seconds": round(dtime, 3), "img_per_s": round(rate, 2), "startup_s": round(startup, 2)}


def strip(d):
    if isinstance(d, dict):
        return {k: strip(v) for k, v in d.items() if not k.startswith("_")}
    if isinstance(d, list):
        return [strip(v) for v in d]
    return d


# ----------------------------------------------------------------------------- workloads


def run_workload(w: Workload, sizes: dict, tag: str) -> dict:
    print(f"[{w.name}] {w.arch} on {w.size[0]}x{w.size[1]} JPEGs", flush=True)
    folder = DATA / f"{w.name}-{w.size[0]}x{w.size[1]}"
    rels = make_images(folder, w.n_large, w.size, seed=1 if w.name == "compute" else 2)
    ckpt = make_checkpoint(w.arch, [folder / "all" / r for r in _spread(rels, 16)], DATA / "ckpt" / f"{w.arch}-{w.name}-v{GENERATOR_VERSION}.pt")
    batch = sizes["batch"]
    big = subset(folder, rels, w.n_large)
    res: dict = {"workload": w.name, "arch": w.arch, "image_size": list(w.size), "images_total": w.n_large,
                 "bytes_per_image": int(np.mean([(folder / "all" / r).stat().st_size for r in rels]))}

    print("  reference (fp32, full decode) …", flush=True)
    ref = reference_predictions(big, w.arch, ckpt, batch)
    res["reference"] = {"images": len(ref), "distinct_top1": len({v[0] for v in ref.values()}),
                        "median_top1_score": round(float(np.median([v[1] for v in ref.values()])), 4)}
    # how chaotic the random model is: ±1 grey level of noise, nothing else changed
    res["random_model_noise_floor"] = agreement(reference_predictions(subset(folder, rels, w.n_tuned), w.arch, ckpt, batch, noise=True), ref)

    print("  agreement of a trained model: imgscore's path vs fp32 full decode …", flush=True)
    tck = trained_checkpoint()
    t_ref = reference_predictions(big, "resnet18", tck, batch)
    t_fast = pipeline_predictions(big, "resnet18", tck, batch, PIPELINE_SPLIT[0])
    res["agreement_trained"] = {**agreement(t_fast, t_ref), "distinct_top1": len({v[0] for v in t_ref.values()}),
                                "median_top1_score": round(float(np.median([v[1] for v in t_ref.values()])), 4)}

    print("  forward-only …", flush=True)
    tfm = reference_transform()
    pre = torch.stack([tfm(Image.open(folder / "all" / r).convert("RGB")) for r in _spread(rels, batch)])
    res["forward_only"] = forward_only(w.arch, ckpt, pre, w.fwd_batches, cores())
    res["forward_default_format"] = forward_only(w.arch, ckpt, pre, max(1, w.fwd_batches // 2), cores(), fast=False)
    res["forward_1_thread"] = forward_only(w.arch, ckpt, pre, max(1, w.fwd_batches // 2), 1)

    print("  forward-only per backend …", flush=True)
    res["backends_forward_only"] = backend_forward_only(w.arch, ckpt, pre, w.fwd_batches, cores())

    print("  decode core-time …", flush=True)
    dec_paths = [folder / "all" / r for r in _spread(rels, w.n_decode)]
    res["decode_draft"] = decode_core_time(dec_paths, draft=True)
    res["decode_full"] = decode_core_time(dec_paths, draft=False)
    per_img = res["decode_draft"]["core_s_per_image"] + 1.0 / res["forward_1_thread"]["img_per_s"]
    res["core_time_bound"] = {"img_per_s": round(cores() / per_img, 2), "core_s_per_image": round(per_img, 5),
                              "cores": cores()}

    print("  plain loop (batch 1) …", flush=True)
    res["plain_loop"] = plain_loop(subset(folder, rels, w.n_plain), w.arch, ckpt)
    print("  tuned loop …", flush=True)
    nw, th = PIPELINE_SPLIT
    res["tuned_loop"] = tuned_loop(subset(folder, rels, w.n_tuned), w.arch, ckpt, batch, nw, th)

    print("  imgscore run ×2 sizes …", flush=True)
    small_root = subset(folder, rels, w.n_small)
    runs_s, runs_l = [], []
    for r in range(sizes["repeats"]):
        runs_s.append(imgscore_run(small_root, w.arch, ckpt, DATA / "out" / f"{w.name}-small-{r}", [f"inference.batch_size={batch}"]))
        runs_l.append(imgscore_run(big, w.arch, ckpt, DATA / "out" / f"{w.name}-large-{r}", [f"inference.batch_size={batch}"]))
        print(f"    small {runs_s[-1]['wall_s']} s, large {runs_l[-1]['wall_s']} s", flush=True)
    s, lg = best_of(runs_s), best_of(runs_l)
    res["imgscore_small"], res["imgscore_large"] = s, lg
    res["imgscore_marginal"] = marginal(s, lg)

    res["backend_runs"] = {}
    for backend in ("onnxruntime", "openvino"):
        if "error" in res["backends_forward_only"].get(f"{backend} fp32", {"error": 1}):
            continue
        print(f"  imgscore run ×2 sizes, inference.backend={backend} …", flush=True)
        sets = [f"inference.batch_size={batch}", f"inference.backend={backend}", f"inference.cache_dir={DATA / 'cache'}"]
        bs = imgscore_run(small_root, w.arch, ckpt, DATA / "out" / f"{w.name}-small-{backend}", sets)
        bl = imgscore_run(big, w.arch, ckpt, DATA / "out" / f"{w.name}-large-{backend}", sets)
        print(f"    small {bs['wall_s']} s, large {bl['wall_s']} s", flush=True)
        bl["agreement_vs_torch_run"] = agreement(bl["_preds"], lg["_preds"])
        res["backend_runs"][backend] = {"small": bs, "large": bl, "marginal": marginal(bs, bl)}

    for k in ("plain_loop", "tuned_loop", "imgscore_large"):
        res[k]["agreement"] = agreement(res[k]["_preds"], ref)
    res["imgscore_large"]["agreement_all_runs"] = [agreement(r["_preds"], ref) for r in runs_l]

    fo = res["forward_only"]["img_per_s"]
    pl = res["plain_loop"]["img_per_s"]
    ort_fo = res["backends_forward_only"].get("onnxruntime fp32", {}).get("img_per_s")
    ort_mg = res["backend_runs"].get("onnxruntime", {}).get("marginal", {}).get("img_per_s")
    res["ratios_onnxruntime"] = {
        "marginal_vs_eager_forward_only": round(ort_mg / fo, 3) if ort_mg else None,
        "marginal_vs_ort_forward_only": round(ort_mg / ort_fo, 3) if ort_mg and ort_fo else None,
        "marginal_vs_plain": round(ort_mg / pl, 2) if ort_mg else None,
        "ort_forward_vs_eager_forward": round(ort_fo / fo, 3) if ort_fo else None,
    }
    bound = res["core_time_bound"]["img_per_s"]
    mg = res["imgscore_marginal"]["img_per_s"]
    res["ratios"] = {
        "marginal_vs_forward_only": round(mg / fo, 3),
        "marginal_vs_plain": round(mg / pl, 2),
        "marginal_vs_core_time_bound": round(mg / bound, 3),
        "tuned_vs_plain": round(res["tuned_loop"]["img_per_s"] / pl, 2),
        "tuned_vs_forward_only": round(res["tuned_loop"]["img_per_s"] / fo, 3),
        "draft_decode_speedup": round(res["decode_full"]["core_s_per_image"] / res["decode_draft"]["core_s_per_image"], 2),
        "channels_last_fold_speedup": round(fo / res["forward_default_format"]["img_per_s"], 2),
    }
    return res


def run_memory(ms: MemorySpec, sizes: dict) -> dict:
    print(f"[memory] {ms.arch} on {ms.size[0]}x{ms.size[1]} JPEGs: {ms.n_few} vs {ms.n_many} images, {ms.shard} per shard", flush=True)
    folder = DATA / f"memory-{ms.size[0]}x{ms.size[1]}"
    rels = make_images(folder, ms.n_many, ms.size, seed=3)
    ckpt = make_checkpoint(ms.arch, [folder / "all" / r for r in _spread(rels, 16)], DATA / "ckpt" / f"{ms.arch}-memory-v{GENERATOR_VERSION}.pt")
    few, many = subset(folder, rels, ms.n_few), subset(folder, rels, ms.n_many)
    # one process layout for both sizes (auto may pick a different split for each, and the tree's
    # RSS would then measure the layout, not growth with the number of images)
    sets = [f"run.shard_size={ms.shard}", f"inference.batch_size={min(sizes['batch'], ms.shard)}", "inference.num_workers=2"]
    r_few = imgscore_run(few, ms.arch, ckpt, DATA / "out" / "mem-few", sets)
    r_many = imgscore_run(many, ms.arch, ckpt, DATA / "out" / "mem-many", sets)
    one = [f"run.shard_size={ms.n_many}", f"inference.batch_size={min(sizes['batch'], ms.shard)}", "inference.num_workers=2"]
    r_one = imgscore_run(many, ms.arch, ckpt, DATA / "out" / "mem-one-shard", one)
    extra = r_many["shards"] - r_one["shards"]
    return {
        "few": r_few, "many": r_many, "many_one_shard": r_one,
        "rss_growth_main": round(r_many["peak_rss_main_mib"] / r_few["peak_rss_main_mib"] - 1, 4),
        "rss_growth_tree": round(r_many["peak_rss_tree_mib"] / r_few["peak_rss_tree_mib"] - 1, 4),
        # where the tree's growth is: Prefect's temporary server, or the DataLoader workers
        "rss_growth_server": round(r_many["peak_rss_server_mib"] / r_few["peak_rss_server_mib"] - 1, 4) if r_few.get("peak_rss_server_mib") else None,
        "rss_growth_others": round(r_many["peak_rss_others_mib"] / r_few["peak_rss_others_mib"] - 1, 4) if r_few.get("peak_rss_others_mib") else None,
        # everything a shard costs beyond its images: Prefect task run, DataLoader start, part files
        "overhead_per_shard_total_s": round((r_many["wall_s"] - r_one["wall_s"]) / extra, 4) if extra else None,
        # the part outside score_shard (Prefect's task-run machinery): time between the plan and
        # the last shard's end not spent inside score_shard, per extra shard
        "prefect_overhead_per_shard_s": round((r_many["outside_shards_s"] - r_one["outside_shards_s"]) / extra, 4) if extra else None,
    }


def scoring_rate(runs: list[dict]) -> dict:
    """Images per second of the scoring phase of runs that ran at the same time: all their
    images over the window from the first plan written to the last shard committed."""
    start = min(r["planned_at"] for r in runs)
    end = max(r["finished_at"] for r in runs)
    n = sum(r["images"] for r in runs)
    return {"images": n, "seconds": round(end - start, 3), "img_per_s": round(n / (end - start), 1)}


def run_small(spec: SmallSpec, repeats: int = 1) -> dict:
    """Small images: one ``imgscore run`` against two concurrent ones on the same
    folder — with ``inference.num_workers: auto`` (the measured split) and with the former fixed
    default (0 workers, all threads); the splits chosen. Each figure is the best of ``repeats``.
    ``one_vs_best_two``: one ``auto`` run against the better of the two configs' two-run
    figures (two runs at once may do better with a split one run would not choose)."""
    print(f"[small] {spec.arch} on {spec.size[0]}x{spec.size[1]} JPEGs: one run vs two at once", flush=True)
    folder = DATA / f"small-{spec.size[0]}x{spec.size[1]}"
    rels = make_images(folder, spec.images, spec.size, seed=4)
    ckpt = make_checkpoint(spec.arch, [folder / "all" / r for r in _spread(rels, 16)], DATA / "ckpt" / f"{spec.arch}-small-v{GENERATOR_VERSION}.pt")
    root = subset(folder, rels, spec.images)
    base = [f"run.shard_size={spec.shard}", f"preprocess.resize={spec.size[1]}", f"preprocess.crop={spec.size[1]}"]
    res: dict = {"spec": asdict(spec)}
    for name, extra in (("auto", ["inference.num_workers=auto", "inference.batch_size=auto"]),
                        ("fixed_0_workers", ["inference.num_workers=0", "inference.batch_size=32"])):
        sets = [*base, *extra]
        ones, twos = [], []
        for rep in range(max(1, repeats)):
            one = imgscore_run(root, spec.arch, ckpt, DATA / "out" / f"small-one-{name}-{rep}", sets)
            two = imgscore_runs([(root, spec.arch, ckpt, DATA / "out" / f"small-two-{name}-{rep}-{k}", sets) for k in "ab"])
            ones.append((scoring_rate([one]), one["splits"]))
            twos.append(scoring_rate(two))
        (r1, splits), r2 = max(ones, key=lambda o: o[0]["img_per_s"]), max(twos, key=lambda t: t["img_per_s"])
        res[name] = {"one": r1, "two": r2, "one_vs_two": round(r1["img_per_s"] / r2["img_per_s"], 3), "splits": splits,
                     "one_all": [o[0]["img_per_s"] for o in ones], "two_all": [t["img_per_s"] for t in twos], "load": loadavg()}
        print(f"    {name}: one run {res[name]['one_all']} img/s, two at once {res[name]['two_all']} img/s; split {splits}", flush=True)
    best_two = max(res[n]["two"]["img_per_s"] for n in ("auto", "fixed_0_workers"))
    res["one_vs_best_two"] = round(res["auto"]["one"]["img_per_s"] / best_two, 3)
    return res


def run_dask_cold_start(spec: SmallSpec) -> dict:
    """Dask, 2 workers, the small-image folder: flow wall time and the first shards' set-up with
    ``runner.warm_workers`` off (workers import torch and load the model at their first shard)
    and on (cluster started before the model loads, workers warmed by the plugin)."""
    folder = DATA / f"small-{spec.size[0]}x{spec.size[1]}"
    rels = make_images(folder, spec.images, spec.size, seed=4)
    ckpt = DATA / "ckpt" / f"{spec.arch}-small-v{GENERATOR_VERSION}.pt"
    root = subset(folder, rels, spec.images)
    res = {}
    for warm in ("false", "true"):
        sets = [f"run.shard_size={spec.shard // 2}", f"preprocess.resize={spec.size[1]}", f"preprocess.crop={spec.size[1]}",
                "runner.type=dask", "runner.n_workers=2", f"runner.warm_workers={warm}"]
        r = imgscore_run(root, spec.arch, ckpt, DATA / "out" / f"dask-warm-{warm}", sets)
        res[f"warm_workers={warm}"] = {"command_wall_s": r["wall_s"], "launch_to_planned_s": r["launch_to_planned_s"],
                                       "planned_to_done_s": r["score_phase_s"], "first_shard_setup_s": r["first_shard_setup_s"],
                                       "load": loadavg()}
        print(f"    dask warm_workers={warm}: {res[f'warm_workers={warm}']}", flush=True)
    return res


def import_cost() -> dict:
    """Seconds for a fresh interpreter to import what ``imgscore run`` imports (no server)."""
    code = "import torch, torchvision, prefect, imgscore.flows.cli, imgscore.flows.score_images, imgscore.inference.score"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), cwd=REPO)
    return {"seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------- report


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def render(r: dict) -> str:
    c, d, mem = r["compute"], r["decode"], r["memory"]
    L = [f"# imgscore benchmark — {r['date']}\n"]
    L.append(f"{r['cores']} cores ({r['cpu']}), {r['ram_gib']} GiB RAM, torch {r['torch']}, Pillow {r['pillow']}, "
             f"Python {r['python']}; load average (1/5/15 min) {r['load_before']} before, {r['load_after']} after; "
             f"sizes `{r['sizes']}`; `make bench` took {r['total_s'] / 60:.1f} min. `imgscore run` uses "
             f"configs/nightly.yaml (batch 32, `inference.num_workers: auto`, channels_last, folded BN, JPEG draft, "
             f"fp32) under a temporary Prefect server; the tuned loop uses {r['pipeline_split']['dataloader_workers']} "
             f"DataLoader workers beside torch threads = cores.\n")
    L.append("| workload | path | images | img/s | × plain loop | × forward-only | peak memory MiB |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")

    def row(w, name, n, rate, rss=""):
        fo, pl = w["forward_only"]["img_per_s"], w["plain_loop"]["img_per_s"]
        L.append(f"| {w['workload']}: {w['arch']}, {w['image_size'][0]}×{w['image_size'][1]} JPEG | {name} | {n} | "
                 f"{rate:.2f} | {rate / pl:.2f} | {rate / fo:.2f} | {rss} |")

    for w in (c, d):
        t, s, lg, m = w["tuned_loop"], w["imgscore_small"], w["imgscore_large"], w["imgscore_marginal"]
        row(w, "(a) forward-only limit: pre-decoded, batch 32, channels_last, folded BN", w["forward_only"]["images"], w["forward_only"]["img_per_s"])
        row(w, "decode + forward core-time bound: cores / (draft decode + 1-thread forward s/img)", "", w["core_time_bound"]["img_per_s"])
        row(w, "(b) plain loop: ImageFolder, batch 1, PIL full decode, no_grad", w["plain_loop"]["images"], w["plain_loop"]["img_per_s"], w["plain_loop"]["peak_rss_tree_mib"])
        row(w, f"(c) tuned loop: draft, batch {t['batch']}, {t['workers']} workers, channels_last, folded BN, inference_mode", t["images"], t["img_per_s"], t["peak_rss_tree_mib"])
        row(w, f"(d) `imgscore run`, {s['images']} images, end to end", s["images"], s["img_per_s_end_to_end"], s["peak_rss_tree_mib"])
        row(w, f"(d) `imgscore run`, {lg['images']} images, end to end", lg["images"], lg["img_per_s_end_to_end"], lg["peak_rss_tree_mib"])
        row(w, "**(d) `imgscore run` marginal (Δimages / Δseconds)**", m["images"], m["img_per_s"])
    L.append("")
    L.append("Peak memory: RSS summed over the process tree (DataLoader workers and the Prefect server included; pages forked workers share count once per process, so an upper bound), sampled every 0.5 s.\n")
    L.append("| measure | compute | decode |")
    L.append("| --- | ---: | ---: |")

    def both(label, f):
        L.append(f"| {label} | {f(c)} | {f(d)} |")

    both("forward-only, default memory format, BN not folded (img/s)", lambda w: w["forward_default_format"]["img_per_s"])
    both("forward-only, 1 thread (img/s)", lambda w: w["forward_1_thread"]["img_per_s"])
    both("decode + transform, full decode (ms of one core / image)", lambda w: f"{w['decode_full']['core_s_per_image'] * 1e3:.1f}")
    both("decode + transform, JPEG draft (ms of one core / image)", lambda w: f"{w['decode_draft']['core_s_per_image'] * 1e3:.1f}")
    both("`imgscore run` fixed start-up, intercept of the two sizes (s)", lambda w: w["imgscore_marginal"]["startup_s"])
    both("`imgscore run` launch → plan written (s)", lambda w: w["imgscore_small"]["launch_to_planned_s"])
    both("`imgscore run` wall times, small / large, every repeat (s)", lambda w: f"{w['imgscore_small']['wall_s_all']} / {w['imgscore_large']['wall_s_all']}")
    both("in-shard throughput of the large run, score_shard's own clock (img/s)", lambda w: w["imgscore_large"]["in_shard_img_per_s"])
    both("bytes per JPEG", lambda w: f"{w['bytes_per_image'] / 1e6:.2f} MB")
    L.append("")
    L.append("Agreement with the fp32 full-decode reference (PIL full decode, torchvision eval recipe, unmodified module):\n")
    L.append("| measure | compute | decode |")
    L.append("| --- | ---: | ---: |")

    def ag(a):
        return f"{a['top1_agreement'] * 100:.1f} % of {a['n']}, max Δscore {a['max_top1_score_diff']}"

    both("trained model (demo resnet18): imgscore's decode + model path", lambda w: ag(w["agreement_trained"]))
    both("trained model: distinct top-1 classes / median top-1 score", lambda w: f"{w['agreement_trained']['distinct_top1']} / {w['agreement_trained']['median_top1_score']}")
    both("random benchmark model: `imgscore run` (large)", lambda w: ag(w["imgscore_large"]["agreement"]))
    both("random benchmark model: tuned loop", lambda w: ag(w["tuned_loop"]["agreement"]))
    both("random benchmark model: plain loop", lambda w: ag(w["plain_loop"]["agreement"]))
    both("random benchmark model, ±1 grey level of noise only (its noise floor)", lambda w: ag(w["random_model_noise_floor"]))
    L.append("")
    sp = mem["spec"]
    L.append(f"Memory and per-shard overhead ({sp['arch']}, {sp['size'][0]}×{sp['size'][1]} JPEGs, {sp['shard']} images per shard):\n")
    L.append("| measure | value |")
    L.append("| --- | ---: |")
    L.append(f"| peak memory, {mem['few']['images']} images: main process RSS / process tree RSS (MiB) | {mem['few']['peak_rss_main_mib']} / {mem['few']['peak_rss_tree_mib']} |")
    L.append(f"| peak memory, {mem['many']['images']} images: main process RSS / process tree RSS (MiB) | {mem['many']['peak_rss_main_mib']} / {mem['many']['peak_rss_tree_mib']} |")
    L.append(f"| growth for 10× the images: main / tree | {mem['rss_growth_main'] * 100:+.1f} % / {mem['rss_growth_tree'] * 100:+.1f} % |")
    if mem.get("rss_growth_server") is not None:
        L.append(f"| of the tree: Prefect's temporary server / DataLoader workers and the rest (MiB, {mem['few']['images']} → {mem['many']['images']} images) | "
                 f"{mem['few']['peak_rss_server_mib']} → {mem['many']['peak_rss_server_mib']} / {mem['few']['peak_rss_others_mib']} → {mem['many']['peak_rss_others_mib']} |")
    L.append(f"| cost of a shard beyond its images ({mem['many']['shards']} vs {mem['many_one_shard']['shards']} shards, same images) | {mem['overhead_per_shard_total_s'] * 1e3:.0f} ms |")
    L.append(f"| of which Prefect, outside `score_shard` | {mem['prefect_overhead_per_shard_s'] * 1e3:.0f} ms |")
    L.append(f"| importing torch + torchvision + Prefect + imgscore in a fresh interpreter | {r['imports']['seconds']} s |")
    L.append("")
    splits = [f"{w['workload']} {b}: {', '.join(run['splits'])}" for w in (c, d)
              for b, run in (("torch", w["imgscore_large"]), *((k, v["large"]) for k, v in w.get("backend_runs", {}).items()))
              if run.get("splits")]
    if splits:
        L.append("Splits `auto` chose in the large runs (DataLoader processes × forward threads, or lanes): " + "; ".join(splits) + ".\n")
    L.extend(render_backends(r))
    L.append("| target | measured | met |")
    L.append("| --- | ---: | --- |")
    for t in r["targets"]:
        L.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(L) + "\n"


def render_backends(r: dict) -> list[str]:
    """The issue-16 tables: a row per backend (forward-only and `imgscore run` marginal, with the
    ONNX Runtime forward-only limit as the anchor column), small images, Dask cold start."""
    L = [f"Backends. CPU flags: {' '.join(r.get('cpu_flags', []))}; native bf16: "
         f"{'yes' if r.get('bf16_native') else 'no (bf16 rows are emulated, measured on one batch)'}; runtimes "
         f"{r.get('runtimes')}. Agreement: with torch fp32 on the forward-only batch (top-1, mean |Δscore|), "
         "what the canary measures at run start.\n"]
    L.append("| workload | backend, precision | forward-only img/s | × eager forward-only | × ORT forward-only | agreement, mean Δscore | `imgscore run` marginal img/s | × eager forward-only | × ORT forward-only |")
    L.append("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for key in ("compute", "decode"):
        w = r.get(key)
        if not w or "backends_forward_only" not in w:
            continue
        fo = w["forward_only"]["img_per_s"]
        ort = w["backends_forward_only"].get("onnxruntime fp32", {}).get("img_per_s")
        runs = {"torch fp32": w["imgscore_marginal"], **{f"{b} fp32": v["marginal"] for b, v in w.get("backend_runs", {}).items()}}
        for name, m in w["backends_forward_only"].items():
            if "error" in m:
                L.append(f"| {key}: {w['arch']} | {name} | not run: {m['error'][:80]} | | | | | | |")
                continue
            mg = runs.get(name, {}).get("img_per_s")
            L.append(f"| {key}: {w['arch']} | {name} | {m['img_per_s']:.2f} | {m['img_per_s'] / fo:.2f} | "
                     f"{m['img_per_s'] / ort:.2f} | {m['top1_agreement'] * 100:.1f} %, {m['mean_abs_dscore']} | "
                     + (f"{mg:.2f} | {mg / fo:.2f} | {mg / ort:.2f} |" if mg else " | | |"))
    L.append("")
    sm = r.get("small")
    if sm:
        sp = sm["spec"]
        L.append(f"Small images ({sp['arch']}, {sp['images']} JPEGs of {sp['size'][0]}×{sp['size'][1]}, resize = crop = {sp['size'][1]}, "
                 f"{sp['shard']} per shard): scoring-phase img/s (first plan written → last shard committed).\n")
        L.append("| inference.num_workers | one run | two runs at once, together | one ÷ two | every repeat, one / two | split chosen |")
        L.append("| --- | ---: | ---: | ---: | --- | --- |")
        for name in ("auto", "fixed_0_workers"):
            v = sm[name]
            L.append(f"| {name} | {v['one']['img_per_s']} | {v['two']['img_per_s']} | {v['one_vs_two']:.2f} | "
                     f"{v.get('one_all')} / {v.get('two_all')} | {', '.join(v['splits'])} |")
        if "one_vs_best_two" in sm:
            L.append(f"\nOne `auto` run ÷ the best two-runs-at-once figure of either setting: **{sm['one_vs_best_two']:.2f}**.")
        L.append("")
    dk = r.get("dask_cold_start")
    if dk:
        L.append("Dask cold start (2 workers, the small-image folder):\n")
        L.append("| runner.warm_workers | command wall s | launch → plan written s | plan → last shard s | slowest first-shard set-up s |")
        L.append("| --- | ---: | ---: | ---: | ---: |")
        for name, v in dk.items():
            L.append(f"| {name.split('=')[1]} | {v['command_wall_s']} | {v['launch_to_planned_s']} | {v['planned_to_done_s']} | {v['first_shard_setup_s']} |")
        L.append("")
    return L


def targets(r: dict) -> list[dict]:
    c, d, mem = r["compute"], r["decode"], r["memory"]
    startup = max(c["imgscore_marginal"]["startup_s"], d["imgscore_marginal"]["startup_s"])
    agree = min(c["agreement_trained"]["top1_agreement"], d["agreement_trained"]["top1_agreement"])
    growth = max(mem["rss_growth_tree"], mem["rss_growth_main"])
    return [
        {"target": "compute-bound: marginal ≥ 0.90 × forward-only", "measured": f"{c['ratios']['marginal_vs_forward_only']:.2f} ×", "met": c["ratios"]["marginal_vs_forward_only"] >= 0.90},
        {"target": "decode-bound: marginal ≥ 6 × plain batch-1 loop", "measured": f"{d['ratios']['marginal_vs_plain']:.1f} ×", "met": d["ratios"]["marginal_vs_plain"] >= 6},
        {"target": "decode-bound: marginal ≥ 0.8 × decode + forward core-time bound", "measured": f"{d['ratios']['marginal_vs_core_time_bound']:.2f} ×", "met": d["ratios"]["marginal_vs_core_time_bound"] >= 0.8},
        {"target": "fixed start-up of `imgscore run` ≤ 10 s", "measured": f"{startup:.1f} s", "met": startup <= 10},
        {"target": "Prefect overhead ≤ 20 ms per shard", "measured": f"{mem['prefect_overhead_per_shard_s'] * 1e3:.0f} ms", "met": mem["prefect_overhead_per_shard_s"] <= 0.020},
        {"target": "top-1 agreement with fp32 full decode ≥ 99.5 % (trained model)", "measured": f"{agree * 100:.1f} %", "met": agree >= 0.995},
        {"target": "10× the images → peak memory < +10 %", "measured": f"{growth * 100:+.1f} %", "met": growth < 0.10},
        *targets_backends(r),
    ]


def targets_backends(r: dict) -> list[dict]:
    """The backend speed targets."""
    c, d, sm = r["compute"], r["decode"], r.get("small")
    ro = c.get("ratios_onnxruntime", {})
    out = []
    if ro.get("marginal_vs_eager_forward_only") is not None:
        agree = c["backend_runs"]["onnxruntime"]["large"]["agreement_vs_torch_run"]["top1_agreement"]
        out += [
            {"target": "compute: `imgscore run` onnxruntime marginal ≥ 1.4 × eager forward-only", "measured": f"{ro['marginal_vs_eager_forward_only']:.2f} ×", "met": ro["marginal_vs_eager_forward_only"] >= 1.4},
            {"target": "compute: onnxruntime marginal ≥ 0.85 × ONNX Runtime forward-only", "measured": f"{ro['marginal_vs_ort_forward_only']:.2f} ×", "met": ro["marginal_vs_ort_forward_only"] >= 0.85},
            {"target": "compute: onnxruntime run's top-1 = torch run's top-1", "measured": f"{agree * 100:.1f} %", "met": agree == 1.0},
        ]
    bf = c["backends_forward_only"].get("openvino bf16", {})
    if bf.get("img_per_s"):
        x = bf["img_per_s"] / c["forward_only"]["img_per_s"]
        out.append({"target": "compute: bf16 (opt-in, canary passed) ≥ 2.5 × eager forward-only",
                    "measured": f"{x:.2f} × forward-only (OpenVINO bf16{'' if r.get('bf16_native') else ', emulated: this CPU has no bf16'}; agreement {bf['top1_agreement'] * 100:.1f} %)",
                    "met": x >= 2.5 and bf["top1_agreement"] >= 0.995})
    best = max([d["imgscore_marginal"]["img_per_s"], *[v["marginal"]["img_per_s"] for v in d.get("backend_runs", {}).values()]])
    x = best / d["plain_loop"]["img_per_s"]
    out.append({"target": "decode-bound: best `imgscore run` marginal ≥ 8 × plain batch-1 loop", "measured": f"{x:.1f} ×", "met": x >= 8})
    if sm:
        v = sm.get("one_vs_best_two", sm["auto"]["one_vs_two"])
        out.append({"target": "small images: one run ≥ 0.9 × two concurrent runs (the better of auto and 0 workers)",
                    "measured": f"{v:.2f} × (vs two `auto` runs: {sm['auto']['one_vs_two']:.2f} ×)", "met": v >= 0.9})
    return out


# ----------------------------------------------------------------------------- ablations


def pipeline_throughput(root: Path, arch: str, ckpt: Path, batch: int, workers: int, threads: int,
                        draft: bool = True, fold: bool = True, channels_last: bool = True, prefetch: int = 2) -> dict:
    """img/s of imgscore's scoring path in process (ShardDataset → DataLoader → forward_probs),
    everything score_shard does except writing Parquet; model load and warm-up not timed."""
    import dataclasses

    from imgscore.config.schema import ModelConfig, PreprocessConfig
    from imgscore.images.dataset import ShardDataset, collate_samples
    from imgscore.images.preprocess import DecodeOptions
    from imgscore.images.scan import scan_images
    from imgscore.inference.model import load_model
    from imgscore.inference.score import forward_probs

    torch.set_num_threads(threads)
    lm = load_model(ModelConfig(arch=arch, checkpoint=ckpt), PreprocessConfig(), torch.device("cpu"), channels_last=channels_last)
    if fold:
        lm = lm.folded()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode():
        forward_probs(lm, torch.zeros(2, 3, 224, 224).contiguous(memory_format=memory_format), "fp32")
    index = scan_images(root, "auto", True)
    spec = dataclasses.replace(lm.preprocess, jpeg_draft=draft)
    t0 = time.perf_counter()
    dsf = ShardDataset(str(root), index.entries, spec, DecodeOptions(max_pixels=10**9))
    kw = {"prefetch_factor": prefetch, "multiprocessing_context": "fork"} if workers else {}
    loader = DataLoader(dsf, batch_size=batch, num_workers=workers, collate_fn=collate_samples, **kw)
    n = 0
    with torch.inference_mode():
        for b in loader:
            forward_probs(lm, b.tensor.contiguous(memory_format=memory_format), "fp32")
            n += len(b.positions)
    dt_ = time.perf_counter() - t0
    torch.set_num_threads(cores())
    return {"images": n, "seconds": round(dt_, 3), "img_per_s": round(n / dt_, 2), "workers": workers, "threads": threads,
            "draft": draft, "fold": fold, "channels_last": channels_last, "prefetch": prefetch, "batch": batch}


def forward_variants(arch: str, ckpt: Path, x: torch.Tensor, batches: int, compile_: bool) -> dict:
    """Forward-only img/s for each model-side option, same inputs, interleaved rounds (best of 2)."""
    torch.set_num_threads(cores())
    base = plain_module(arch, ckpt)
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    folded_cl = fold_conv_bn(copy.deepcopy(base)).to(memory_format=torch.channels_last)
    xc, xl = x.contiguous(), x.contiguous(memory_format=torch.channels_last)
    out: dict = {}
    variants = {
        "contiguous": (lambda: base(xc), torch.inference_mode),
        "channels_last": (lambda: cl(xl), torch.inference_mode),
        "channels_last+folded": (lambda: folded_cl(xl), torch.inference_mode),
        "contiguous+folded": (lambda: fold_conv_bn(base)(xc), None),  # replaced below
        "channels_last+folded, no_grad": (lambda: folded_cl(xl), torch.no_grad),
        "channels_last+folded, bf16 autocast": (lambda: _bf16(folded_cl, xl), torch.inference_mode),
    }
    folded_c = fold_conv_bn(copy.deepcopy(base))
    variants["contiguous+folded"] = (lambda: folded_c(xc), torch.inference_mode)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            ts = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(copy.deepcopy(base).to(memory_format=torch.channels_last))))
            ts(xl)
            ts(xl)
        out["torchscript_frozen_build_s"] = round(time.perf_counter() - t0, 2)
        variants["torchscript frozen + optimize_for_inference"] = (lambda: ts(xl), torch.inference_mode)
    except Exception as exc:  # recorded, not fatal: it is an experiment
        out["torchscript_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if compile_:
        try:
            t0 = time.perf_counter()
            comp = torch.compile(folded_cl)
            with torch.inference_mode():
                comp(xl)
            out["torch_compile_first_call_s"] = round(time.perf_counter() - t0, 1)
            variants["torch.compile (inductor)"] = (lambda: comp(xl), torch.inference_mode)
        except Exception as exc:
            out["torch_compile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    ref = None
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(2):
        for k, (fn, ctx) in variants.items():
            with ctx():
                fn()  # warm-up for this round
                t0 = time.perf_counter()
                for _ in range(batches):
                    y = fn()
                times[k].append(time.perf_counter() - t0)
            y = torch.softmax(y.float(), 1)
            if ref is None:
                ref = y
            out.setdefault("max_prob_diff", {})[k] = round(float((y - ref).abs().max()), 6)
            out.setdefault("top1_agree", {})[k] = round(float((y.argmax(1) == ref.argmax(1)).float().mean()), 4)
    out["img_per_s"] = {k: round(batches * len(x) / min(v), 2) for k, v in times.items()}
    return out


def _bf16(m, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return m(x)


def batch_sizes(arch: str, ckpt: Path, x: torch.Tensor, sizes: tuple[int, ...]) -> dict:
    torch.set_num_threads(cores())
    m = fast_module(arch, ckpt)
    out = {}
    with torch.inference_mode():
        for b in sizes:
            xb = x[:b].contiguous(memory_format=torch.channels_last) if b <= len(x) else x.repeat(b // len(x) + 1, 1, 1, 1)[:b].contiguous(memory_format=torch.channels_last)
            m(xb)
            n = max(1, 64 // b)
            t0 = time.perf_counter()
            for _ in range(n):
                m(xb)
            out[b] = round(n * b / (time.perf_counter() - t0), 2)
    return out


def run_ablations(sizes: dict, compile_: bool, keys=("compute", "decode"), parts=("forward", "batch", "pipeline"), save=None) -> dict:
    res: dict = {}
    for key in keys:
        w = sizes[key]
        folder = DATA / f"{w.name}-{w.size[0]}x{w.size[1]}"
        rels = make_images(folder, w.n_large, w.size, seed=1 if w.name == "compute" else 2)
        ckpt = make_checkpoint(w.arch, [folder / "all" / r for r in _spread(rels, 16)], DATA / "ckpt" / f"{w.arch}-{w.name}-v{GENERATOR_VERSION}.pt")
        tfm = reference_transform()
        x = torch.stack([tfm(Image.open(folder / "all" / r).convert("RGB")) for r in _spread(rels, sizes["batch"])])
        res[key] = {}
        if "forward" in parts:
            print(f"[ablations/{key}] forward variants …", flush=True)
            res[key]["forward"] = forward_variants(w.arch, ckpt, x, 1 if key == "compute" else 3, compile_ and key == "decode")
            res[key]["forward"]["load"] = loadavg()
            save and save(res)
        if "batch" in parts:
            print(f"[ablations/{key}] batch sizes …", flush=True)
            res[key]["batch_img_per_s"] = batch_sizes(w.arch, ckpt, x, (1, 8, 16, 32, 64) if sizes["batch"] >= 32 else (1, 4, 8))
            res[key]["batch_load"] = loadavg()
            save and save(res)
        if "pipeline" not in parts:
            continue
        root = subset(folder, rels, w.n_tuned)
        print(f"[ablations/{key}] workers × threads, prefetch, draft …", flush=True)
        runs = []
        for nw, th in ((0, cores()), (1, cores()), (2, cores()), (2, 1), (1, 1), (3, cores())):
            runs.append(pipeline_throughput(root, w.arch, ckpt, sizes["batch"], nw, th))
            print(f"    workers {nw} threads {th}: {runs[-1]['img_per_s']} img/s", flush=True)
        runs.append(pipeline_throughput(root, w.arch, ckpt, sizes["batch"], 2, cores(), prefetch=4))
        runs.append(pipeline_throughput(root, w.arch, ckpt, sizes["batch"], 2, cores(), draft=False))
        runs.append(pipeline_throughput(root, w.arch, ckpt, sizes["batch"], 2, cores(), fold=False))
        runs.append(pipeline_throughput(root, w.arch, ckpt, sizes["batch"], 2, cores(), fold=False, channels_last=False))
        res[key]["pipeline"] = runs
        res[key]["pipeline_load"] = loadavg()
        save and save(res)
    return res


# DataLoader workers × torch threads of the pipeline (nightly.yaml: 2 workers; torch threads:
# all usable cores) — the tuned loop uses the same split so (c) and (d) differ only by imgscore.
PIPELINE_SPLIT = (2, cores())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=sorted(SIZES), default="full")
    ap.add_argument("--only", choices=["compute", "decode", "memory", "small", "dask"], action="append")
    ap.add_argument("--ablations", action="store_true", help="measure each speed option (benchmarks/NOTES.md) instead")
    ap.add_argument("--repeats", type=int, help="imgscore runs per size (default: the size's own)")
    ap.add_argument("--part", choices=["forward", "batch", "pipeline"], action="append", help="with --ablations: only these parts")
    ap.add_argument("--prepare", action="store_true", help="only make the images and checkpoints")
    ap.add_argument("--compile", action="store_true", help="with --ablations: also torch.compile (minutes of compiling)")
    args = ap.parse_args(argv)
    sizes = dict(SIZES[args.sizes])
    if args.repeats:
        sizes["repeats"] = args.repeats
    if args.prepare:  # make the images and checkpoints only (cached for the timed run)
        for key in ("compute", "decode"):
            w = sizes[key]
            folder = DATA / f"{w.name}-{w.size[0]}x{w.size[1]}"
            rels = make_images(folder, w.n_large, w.size, seed=1 if w.name == "compute" else 2)
            make_checkpoint(w.arch, [folder / "all" / r for r in _spread(rels, 16)], DATA / "ckpt" / f"{w.arch}-{w.name}-v{GENERATOR_VERSION}.pt")
        ms = sizes["memory"]
        folder = DATA / f"memory-{ms.size[0]}x{ms.size[1]}"
        rels = make_images(folder, ms.n_many, ms.size, seed=3)
        make_checkpoint(ms.arch, [folder / "all" / r for r in _spread(rels, 16)], DATA / "ckpt" / f"{ms.arch}-memory-v{GENERATOR_VERSION}.pt")
        trained_checkpoint()
        return 0
    if args.ablations:
        t0 = time.perf_counter()
        out = (RESULTS if args.sizes == "full" else DATA) / f"ablations{'' if args.sizes == 'full' else '-' + args.sizes}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        head = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cores": cores(), "load_before": loadavg()}
        old = json.loads(out.read_text()) if out.exists() else {}

        def save(res):  # merged into what earlier (partial) runs measured, part by part
            merged = {**old, **head}
            for k, v in res.items():
                merged[k] = {**merged.get(k, {}), **v}
            out.write_text(json.dumps(merged, indent=2) + "\n")
            return merged

        r = save(run_ablations(sizes, args.compile, args.only or ("compute", "decode"), args.part or ("forward", "batch", "pipeline"), save))
        r["load_after"] = loadavg()
        r["total_s"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(r, indent=2) + "\n")
        print(json.dumps(r, indent=1))
        return 0
    only = set(args.only or ["compute", "decode", "memory", "small", "dask"])
    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r: dict = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "sizes": args.sizes,
        "cores": cores(),
        "cpu": cpu_model(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": Image.__version__,
        "python": platform.python_version(),
        "load_before": loadavg(),
        "pipeline_split": {"dataloader_workers": PIPELINE_SPLIT[0], "torch_threads": PIPELINE_SPLIT[1]},
        "cpu_flags": cpu_flags(),
        "bf16_native": has_bf16(),
    }
    from imgscore.inference.backends import runtime_versions

    r["runtimes"] = runtime_versions()
    print(f"imgscore bench ({args.sizes}): {r['cores']} cores, load {r['load_before']}", flush=True)
    # warm-up: the Prefect database in PREFECT_HOME, the page cache for Python's imports
    warm = DATA / "warm"
    (warm / "x").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        if not (warm / "x" / f"{i}.jpg").exists():
            noise = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(noise).save(warm / "x" / f"{i}.jpg")
    wck = make_checkpoint("mobilenet_v3_large", sorted((warm / "x").glob("*.jpg")), DATA / "ckpt" / "warm.pt")
    imgscore_run(warm, "mobilenet_v3_large", wck, DATA / "out" / "warm")
    r["imports"] = import_cost()
    if "compute" in only:
        r["compute"] = run_workload(sizes["compute"], sizes, args.sizes)
    if "decode" in only:
        r["decode"] = run_workload(sizes["decode"], sizes, args.sizes)
    if "memory" in only:
        r["memory"] = {"spec": asdict(sizes["memory"]), **run_memory(sizes["memory"], sizes)}
    if "small" in only:
        r["small"] = run_small(sizes["small"], sizes["repeats"])
    if "dask" in only:
        r["dask_cold_start"] = run_dask_cold_start(sizes["small"])
    r["load_after"] = loadavg()
    r["total_s"] = round(time.perf_counter() - t0, 1)
    r = strip(r)
    out_dir = RESULTS if args.sizes == "full" and not args.only else DATA
    stem = "latest" if out_dir == RESULTS else f"results-{args.sizes}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if {"compute", "decode", "memory", "small", "dask"} <= only:
        r["targets"] = targets(r)
        (out_dir / f"{stem}.md").write_text(render(r))
        print(render(r))
    (out_dir / f"{stem}.json").write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {out_dir / stem}.json in {r['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
