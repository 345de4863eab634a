"""Checkpoints and modules the benchmarks score with.

Weights do not matter for speed, but agreement needs a model whose answer depends on the image:
:func:`make_checkpoint` calibrates a seeded random network on a few of the workload's photos (a
random network with fresh BatchNorm statistics predicts the same class for every image, which
would make any agreement figure vacuous), and :func:`trained_checkpoint` is the demo's resnet18,
trained on real digit scans, for agreement that means what it says.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from benchmarks.common.paths import DATA
from imgscore.inference.model import fold_conv_bn

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def reference_transform(resize: int = 256, crop: int = 224) -> T.Compose:
    """torchvision's eval recipe: resize the shorter side, center crop, float32 [3, crop, crop],
    ImageNet normalisation."""
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(MEAN, STD)])


def seeded_checkpoint(arch: str, path: Path, seed: int = 0, num_classes: int = 1000) -> Path:
    """``path``, holding the state_dict of torchvision's ``arch`` with seeded random weights (made once)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        torch.save(torchvision.models.get_model(arch, num_classes=num_classes).state_dict(), path)
    return path


def make_checkpoint(arch: str, calib: list[Path], path: Path) -> Path:
    """Seeded random ``arch`` with BatchNorm statistics and head calibrated on ``calib`` photos.

    BatchNorm running statistics are the exact mean/variance over the calibration batch (train
    mode, cumulative average); the head's bias is shifted so the mean logit over the batch is 0
    per class and the head is scaled so the logits' spread is about 4, so that predictions vary
    from image to image and softmax scores are not all 1/1000. Made once: an existing ``path`` is returned as is.
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
    """The unmodified torchvision module (state_dict, or a training dict with ``model``), in eval mode."""
    obj = torch.load(ckpt, map_location="cpu", weights_only=False)
    sd = obj["model"] if "model" in obj else obj
    head = [k for k, v in sd.items() if k.endswith("weight") and v.ndim == 2][-1]
    m = torchvision.models.get_model(arch, num_classes=sd[head].shape[0])
    m.load_state_dict(sd)
    return m.eval()


def fast_module(arch: str, ckpt: Path) -> nn.Module:
    """What imgscore runs: conv-BN folded, channels_last, eval."""
    return fold_conv_bn(plain_module(arch, ckpt)).to(memory_format=torch.channels_last)


def trained_checkpoint() -> Path:
    """The demo's resnet18, trained here on scikit-learn's digit scans (``imgscore.demo``), cached
    in benchmarks/data/ckpt."""
    from imgscore.demo import build_digits_folder, train_demo_model

    ckpt = DATA / "ckpt" / "digits_resnet18.pt"
    if not ckpt.exists():
        print("  training the demo's resnet18 on the digit scans (once) …", flush=True)
        train, _ = build_digits_folder(DATA / "digits")
        train_demo_model(train, ckpt, log=lambda *a: None)
    return ckpt
