"""The embedded default: real handwritten digits, a real torchvision model trained here.

``build_digits_folder`` writes the 1,797 digit scans that ship inside scikit-learn (UCI
optical recognition of handwritten digits, 8×8, 16 grey levels) as upscaled PNGs in ImageFolder
layout, split into ``train/`` and a stratified held-out ``heldout/`` (25 %).
``train_demo_model`` trains torchvision's ``resnet18`` (10 classes) on ``train/`` on the CPU
with the same decode and eval transform the scorer uses, and saves it the way a training script
does: a checkpoint dict with ``model``, ``optimizer``, ``epoch``, an argparse ``args`` namespace,
a numpy ``best_acc1`` and the ``classes``. Both are cached under ``outputs/demo/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgscore.images.decode import decode_image
from imgscore.images.preprocess import DecodeOptions, PreprocessSpec, build_transform

CLASSES = [str(d) for d in range(10)]
IMAGE_SIZE = 64  # pixels; the 8×8 scans are upscaled with bicubic interpolation
# Eval transform of the demo model (also written to configs/demo.yaml): no resize change, no crop loss.
DEMO_SPEC = PreprocessSpec(resize=IMAGE_SIZE, crop=IMAGE_SIZE)


def build_digits_folder(root: Path, test_fraction: float = 0.25, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/train/<digit>/*.png`` and ``root/heldout/<digit>/*.png`` once; return both folders.

    Raises:
        ImportError: scikit-learn is missing (install the ``dev`` extra: ``pip install -e .[dev]``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    train, held = root / "train", root / "heldout"
    if (root / ".complete").exists():
        return train, held
    tmp = root.parent / f".{root.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=digits.target)
    for split, ids in (("train", tr), ("heldout", te)):
        for i in sorted(ids):
            d = tmp / split / CLASSES[digits.target[i]]
            d.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
            img.save(d / f"digit_{i:04d}.png")
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    (root / ".complete").write_text(json.dumps({"train": len(tr), "heldout": len(te), "seed": seed}))
    return train, held


def _load_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``folder/<digit>/*.png`` through the demo's eval transform: images float32
    [N, 3, 64, 64] and labels int64 [N]."""
    tf = build_transform(DEMO_SPEC)
    opts = DecodeOptions(max_pixels=10**8)
    xs, ys = [], []
    for label, cls in enumerate(CLASSES):
        for p in sorted((folder / cls).glob("*.png")):
            xs.append(tf(decode_image(str(p), DEMO_SPEC, opts)))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def _warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up over ``warmup_steps``, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor


def train_demo_model(
    train_dir: Path, checkpoint: Path, epochs: int = 5, seed: int = 0, log: Callable[[str], object] = print
) -> Path:
    """Train resnet18 on ``train_dir`` (CPU; under a minute: benchmarks/NOTES.md) and save a checkpoint dict.

    Recipe, chosen to converge the same way whatever the CPU's float rounding: AdamW (lr 1e-3,
    weight decay 0.05), batch 64, one epoch of linear warm-up then cosine decay to zero, gradient
    norm clipped at 2, random ±4 px shifts as augmentation, ``torch.manual_seed(seed)`` and
    ``torch.use_deterministic_algorithms`` while training. SGD with a one-cycle schedule peaking at
    lr 0.05 (the recipe before) diverged for an epoch on one machine (loss 0.57 → 1.49) and not on
    another; this one lowered the mean loss every epoch in each of 5 runs (seeds 0, 3, 4, 5; 1 and
    2 torch threads, which changes the float summation order as another CPU would) and reached
    held-out accuracy 0.987–0.996 (benchmarks/NOTES.md, "Demo training").
    Returns ``checkpoint``; reuses it if it exists. ``log``: one line per epoch.
    """
    import torchvision

    checkpoint = Path(checkpoint)
    if checkpoint.exists():
        return checkpoint
    torch.manual_seed(seed)
    x, y = _load_folder(Path(train_dir))
    model = torchvision.models.get_model("resnet18", num_classes=len(CLASSES))
    model = model.to(memory_format=torch.channels_last)
    args = argparse.Namespace(
        arch="resnet18",
        epochs=epochs,
        opt="adamw",
        lr=1e-3,
        batch_size=64,
        weight_decay=0.05,
        warmup_epochs=1,
        clip_grad_norm=2.0,
        seed=seed,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    accuracy = _train(model, opt, x, y, args, log)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.parent / f".{checkpoint.name}.{os.getpid()}.tmp"
    torch.save(
        {
            "epoch": epochs,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "args": args,
            "best_acc1": np.float64(accuracy),
            "classes": CLASSES,
        },
        tmp,
    )
    tmp.replace(checkpoint)
    return checkpoint


def _train(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    log: Callable[[str], object],
) -> float:
    """``args.epochs`` epochs of the recipe (:func:`train_demo_model`) over ``x`` (float32
    [N, 3, H, W]) and ``y`` (int64 [N]) with deterministic algorithms; returns the last epoch's
    train accuracy."""
    per_epoch = (len(x) + args.batch_size - 1) // args.batch_size
    epochs = args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(args.warmup_epochs * per_epoch, epochs * per_epoch))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    correct = 0
    try:
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(x), generator=g)
            correct, loss_sum = 0, 0.0
            for i in range(0, len(x), args.batch_size):
                b = perm[i : i + args.batch_size]
                xb = x[b]
                dx, dy = torch.randint(-4, 5, (2,), generator=g).tolist()
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3)).contiguous(memory_format=torch.channels_last)
                out = model(xb)
                loss = torch.nn.functional.cross_entropy(out, y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
                opt.step()
                sched.step()
                correct += int((out.argmax(1) == y[b]).sum())
                loss_sum += loss.item() * len(b)
            log(
                f"  epoch {epoch + 1}/{epochs}: mean loss {loss_sum / len(x):.3f}, "
                f"train accuracy {correct / len(x):.3f} ({time.perf_counter() - t0:.0f} s elapsed)"
            )
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return correct / len(x)
