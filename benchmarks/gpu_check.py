"""GPU check: CPU/GPU agreement on one checkpoint, and throughput at two batch sizes.

One script to run on a machine with CUDA (it exits 2 without it). It uses the project's own
loading, dataset and forward code (``imgscore.inference.model.load_model``, ``imgscore.images.dataset.ShardDataset``,
``imgscore.inference.backends.eager.forward_probs``), so what it measures is what ``score_shard`` does:

1. agreement: the same images through the same checkpoint on CPU (fp32) and GPU (fp32, bf16,
   fp16): top-1 agreement and the largest top-1 probability difference;
2. throughput at two batch sizes (default 64 and 256): the model alone on pre-decoded tensors
   (pinned, non-blocking copy, channels_last), and end to end (decode in DataLoader workers →
   pinned batch → device → forward), images/s.

Images: ``--images DIR`` (any folder imgscore can scan), else ``--n-images`` variants of the
photos shipped with scikit-image written to a temporary folder. Model: ``--checkpoint FILE`` or
``--weights NAME`` with ``--arch``, else a seeded random-weight ``--arch`` saved to a temporary
state_dict. Speed does not depend on the weights; agreement does (a random model's small logits
hide precision differences), so give the production checkpoint for the agreement figures.

    python -m benchmarks.gpu_check                      # resnet50, 512 images, batches 64/256
    python -m benchmarks.gpu_check --arch resnet18 --batch-sizes 32 128 --workers 8
    python -m benchmarks.gpu_check --device cpu --n-images 16 --cpu-images 8 --batch-sizes 4 8 --workers 0  # smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common.models import seeded_checkpoint
from imgscore.config.scoring import ModelConfig, PreprocessConfig
from imgscore.images.dataset import ShardDataset, collate_samples
from imgscore.images.preprocess import DecodeOptions
from imgscore.images.scan import scan_images
from imgscore.inference.backends.eager import forward_probs
from imgscore.inference.model import load_model


def make_images(folder: Path, n: int) -> Path:
    """``n`` JPEGs (about 500x400 px, real photo content) in a flat folder; returns it."""
    import skimage.data as data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel", "cat")
    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        f = 0.6 + 0.4 * ((i * 37) % 10) / 10
        box = (int((w - w * f) * ((i * 13) % 7) / 7), int((h - h * f) * ((i * 5) % 3) / 3))
        crop = img.crop((*box, box[0] + int(w * f), box[1] + int(h * f))).resize((500, 400))
        crop.save(folder / f"img_{i:05d}.jpg", quality=90)
    return folder


def loader(root: Path, lm, batch_size: int, workers: int) -> DataLoader:
    index = scan_images(root)
    dataset = ShardDataset(str(root), index.entries, lm.preprocess, DecodeOptions(10**9))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_samples,
        pin_memory=lm.device.type == "cuda",
        multiprocessing_context="fork" if workers else None,
        persistent_workers=False,
    )


def probs_for(root: Path, lm, precision: str, batch_size: int = 64, workers: int = 4) -> torch.Tensor:
    """Probabilities float32 [N, C] for every image under ``root``, in scan order."""
    out = []
    with torch.inference_mode():
        for batch in loader(root, lm, batch_size, workers):
            x = batch.tensor.to(lm.device, non_blocking=True, memory_format=torch.channels_last)
            out.append(forward_probs(lm, x, precision))
    return torch.cat(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(lm, x_cpu: torch.Tensor, batch_size: int, precision: str, seconds: float = 5.0) -> float:
    """Images/s of copy + forward on pre-decoded pinned tensors (the GPU's ceiling)."""
    x_cpu = x_cpu[:batch_size]
    if lm.device.type == "cuda":
        x_cpu = x_cpu.pin_memory()
    with torch.inference_mode():
        for _ in range(3):  # warm-up: cuDNN autotune, allocator
            forward_probs(lm, x_cpu.to(lm.device, non_blocking=True, memory_format=torch.channels_last), precision)
        sync(lm.device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            forward_probs(lm, x_cpu.to(lm.device, non_blocking=True, memory_format=torch.channels_last), precision)
            n += len(x_cpu)
        sync(lm.device)
    return n / (time.perf_counter() - t0)


def end_to_end(root: Path, lm, batch_size: int, workers: int, precision: str) -> float:
    """Images/s of decode (DataLoader workers) + pinned copy + forward over the whole folder."""
    t0 = time.perf_counter()
    n = len(probs_for(root, lm, precision, batch_size, workers))
    return n / (time.perf_counter() - t0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--weights", help="torchvision weights name from the local hub cache, e.g. IMAGENET1K_V2")
    p.add_argument("--num-classes", type=int, default=1000, help="head size of the random model (no --checkpoint)")
    p.add_argument("--images", type=Path)
    p.add_argument("--n-images", type=int, default=512)
    p.add_argument("--batch-sizes", type=int, nargs=2, default=[64, 256])
    p.add_argument("--workers", type=int, default=8, help="DataLoader decode processes for the end-to-end figures")
    p.add_argument("--cpu-images", type=int, default=128, help="images scored on the CPU for agreement (CPU is slow)")
    p.add_argument("--device", default="cuda:0", help="the accelerator; 'cpu' only smoke-tests this script")
    return p.parse_args(argv)


def agreement(root: Path, tmp: Path, cpu, gpu, cpu_images: int) -> None:
    """Print each GPU precision's top-1 agreement and probability differences against CPU fp32 on
    the first ``cpu_images`` images of ``root`` (the CPU pass is the slow part)."""
    dev = gpu.device
    sub = tmp / "agree"
    sub.mkdir(exist_ok=True)
    for e in scan_images(root).entries[:cpu_images]:
        (sub / e.image_path.replace("/", "__")).symlink_to(Path(root) / e.rel)
    t0 = time.perf_counter()
    ref = probs_for(sub, cpu, "fp32", batch_size=32)
    cpu_s = time.perf_counter() - t0
    print(
        f"\nagreement with CPU fp32 on {len(ref)} images (CPU pass {cpu_s:.1f} s; mean top-1 probability "
        f"{ref.max(1).values.mean().item():.3f}: near 1/classes means a random model, whose small logits "
        "hide precision differences — pass --checkpoint or --weights for a real one):"
    )
    print(f"{'gpu precision':<14}{'top-1 agree':>12}{'max |Δp(top-1)|':>18}{'max |Δp| any class':>20}")
    for precision in ("fp32", "bf16", "fp16"):
        no_bf16 = precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported()
        if no_bf16 or (precision == "fp16" and dev.type != "cuda"):
            continue
        got = probs_for(sub, gpu, precision)
        top_ref = ref.argmax(1)
        agree = (got.argmax(1) == top_ref).float().mean().item()
        d_top = (got.gather(1, top_ref[:, None]) - ref.gather(1, top_ref[:, None])).abs().max().item()
        print(f"{precision:<14}{agree:>12.4f}{d_top:>18.2e}{(got - ref).abs().max().item():>20.2e}")


def throughput(root: Path, cpu, gpu, batch_sizes: list[int], workers: int) -> None:
    """Print images/s at each batch size: GPU model-only and end to end (fp32, bf16), CPU model-only."""
    first = next(iter(loader(root, gpu, max(batch_sizes), 0))).tensor
    while len(first) < max(batch_sizes):
        first = torch.cat([first, first])
    print(f"\nthroughput, images/s (end to end: {workers} DataLoader workers decoding JPEGs):")
    print(f"{'batch':>6}{'precision':>10}{'gpu model-only':>16}{'gpu end-to-end':>16}{'cpu model-only':>16}")
    for bs in batch_sizes:
        cpu_rate = model_only(cpu, first, min(bs, 32), "fp32", seconds=3.0)
        for precision in ("fp32", "bf16"):
            g = model_only(gpu, first, bs, precision)
            e2e = end_to_end(root, gpu, bs, workers, precision)
            print(
                f"{bs:>6}{precision:>10}{g:>16.0f}{e2e:>16.0f}"
                f"{(cpu_rate if precision == 'fp32' else float('nan')):>16.0f}"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; run it on a GPU machine (--device cpu smoke-tests the script)",
            file=sys.stderr,
        )
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="imgscore_gpu_check_"))
    root = args.images or make_images(tmp / "images", args.n_images)
    ckpt = args.checkpoint
    if ckpt is None and args.weights is None:
        ckpt = seeded_checkpoint(args.arch, tmp / f"{args.arch}_random.pt", num_classes=args.num_classes)
    mcfg, pcfg = ModelConfig(arch=args.arch, checkpoint=ckpt, weights=args.weights), PreprocessConfig()
    gpu = load_model(mcfg, pcfg, dev, channels_last=True)
    cpu = load_model(mcfg, pcfg, torch.device("cpu"), channels_last=True)
    n_img = len(scan_images(root).entries)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU smoke test"
    print(
        f"{name} · torch {torch.__version__} · {args.arch} ({gpu.num_classes} classes) · "
        f"{n_img} images · cpu threads {torch.get_num_threads()}"
    )
    agreement(root, tmp, cpu, gpu, args.cpu_images)
    throughput(root, cpu, gpu, args.batch_sizes, args.workers)
    peak = f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB; " if dev.type == "cuda" else ""
    print(f"\n{peak}images and checkpoint in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
