"""What an image becomes before the model: the eval transform (:class:`PreprocessSpec`,
:func:`build_transform`), the per-run decode settings (:class:`DecodeOptions`), and the error a
file that cannot become pixels raises (:class:`DecodeError`). Decoding itself, and its policy,
is :mod:`imgscore.images.decode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from imgscore.config.scoring import InputConfig
from imgscore.images.formats import DEFAULT_FORMATS

# torchvision's classification reference recipe (references/classification/presets.py,
# ClassificationPresetEval): resize 256, center crop 224, ImageNet mean/std, bilinear.
DEFAULT_RESIZE = 256
DEFAULT_CROP = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


class DecodeError(Exception):
    """An image file that cannot be turned into pixels. ``kind`` is a short stable reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PreprocessSpec:
    """The resolved eval transform. Frozen and picklable: it travels to DataLoader workers.

    ``resize``/``crop`` are pixels; ``mean``/``std`` apply to RGB values scaled to [0, 1].
    """

    resize: int = DEFAULT_RESIZE
    crop: int = DEFAULT_CROP
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    background: tuple[int, int, int] = (255, 255, 255)
    jpeg_draft: bool = True
    max_aspect_ratio: float = 4.0
    value_range: tuple[float, float] | None = None  # None: from the data (value_range())
    non_finite: str = "error"  # "error" or "fill"
    color_manage: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings. The decode settings added later (``value_range``, ``non_finite``,
        ``color_manage``) appear only when they differ from their defaults, so the model key of
        runs made before they existed (``run.skip_scored``) stays the same."""
        out: dict[str, Any] = {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "background": list(self.background),
            "jpeg_draft": self.jpeg_draft,
            "max_aspect_ratio": self.max_aspect_ratio,
        }
        if self.value_range is not None:
            out["value_range"] = list(self.value_range)
        if self.non_finite != "error":
            out["non_finite"] = self.non_finite
        if self.color_manage:
            out["color_manage"] = True
        return out


DEFAULT_MAX_METADATA_BYTES = 64 * 1024 * 1024


DEFAULT_DECODE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DecodeOptions:
    """Per-run decode settings from ``input.*``. Frozen and picklable: they travel to Dask workers
    and DataLoader worker processes with the dataset.

    ``max_metadata_bytes``: largest PNG text or ICC chunk (decompressed) and total PNG text read
    per image, bytes; never below Pillow's own limits. ``formats``: the Pillow format names
    decoded (``input.formats``, checked by :func:`imgscore.images.formats.check_formats`).
    ``decode_timeout_s``: seconds one image's decode may take (``input.decode_timeout_s``).
    """

    max_pixels: int
    exif_orientation: bool = True
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES
    formats: tuple[str, ...] = DEFAULT_FORMATS
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S

    @classmethod
    def from_input(cls, input_cfg: InputConfig) -> DecodeOptions:
        """The options of an ``InputConfig`` (``input.*``)."""
        return cls(
            input_cfg.max_pixels,
            input_cfg.exif_orientation,
            input_cfg.max_metadata_bytes,
            tuple(input_cfg.formats),
            input_cfg.decode_timeout_s,
        )


def build_transform(spec: PreprocessSpec) -> T.Compose:
    """PIL RGB image → float32 tensor [3, crop, crop], normalized with ``spec.mean``/``spec.std``.

    Resize uses antialiasing, as torchvision's weights' ``transforms()`` do.
    """
    return T.Compose(
        [
            T.Resize(spec.resize, interpolation=_INTERP[spec.interpolation], antialias=True),
            T.CenterCrop(spec.crop),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(spec.mean), std=list(spec.std)),
        ]
    )
