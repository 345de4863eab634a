"""Decode one image file fully and turn it into the model's input tensor.

Decoding policy (documented in the README):
- the whole file is decoded inside the caller's per-image guard (Pillow opens lazily, so a
  truncated JPEG only fails on ``load()``); Pillow's global flags are never changed;
- images that declare more than ``max_pixels`` pixels are refused from the header, before any
  pixel buffer is allocated;
- the EXIF orientation tag is applied (``exif_orientation``);
- animated GIFs and multi-page TIFFs: the first frame is scored;
- every mode reaches the model as RGB: transparency (RGBA, LA, PA, palette with a transparent
  index) is composited onto ``background`` (white by default), CMYK is converted by Pillow,
  16-bit grayscale (``I;16``) is scaled from [0, 65535] to [0, 255] keeping its gradient;
- strips with an aspect ratio above ``max_aspect_ratio`` are center-cropped on their long side
  before resizing; the final center crop only ever keeps the middle, so predictions do not change
  but an 8000×8 image cannot become a 256000×256 tensor.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

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


# warnings.catch_warnings swaps process-wide state (filters, showwarning) and is not thread-safe:
# two shards decoding in threads of one process (thread runner with n_workers > 1 and
# inference.num_workers=0) would restore each other's state and leak or lose warnings. Decodes that
# record warnings therefore take turns within a process; DataLoader worker processes each have
# their own lock (re-made after fork, in case a thread held it at that moment).
_WARNINGS_LOCK = threading.Lock()


def _new_lock_after_fork() -> None:
    global _WARNINGS_LOCK
    _WARNINGS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


class DecodeError(Exception):
    """An image file that cannot be turned into pixels. ``kind`` is a short stable reason."""

    def __init__(self, kind: str, message: str):
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

    def to_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "background": list(self.background),
            "jpeg_draft": self.jpeg_draft,
            "max_aspect_ratio": self.max_aspect_ratio,
        }


@dataclass(frozen=True)
class DecodeOptions:
    """Per-run decode settings from ``input.*``."""

    max_pixels: int
    exif_orientation: bool = True


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


_MAGIC = [
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8", "JPEG"),
    (b"GIF8", "GIF"),
    (b"RIFF", "WEBP/RIFF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
]


def _sniff(path: str) -> str:
    """A specific reason for a file Pillow cannot identify."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        return f"cannot read file: {exc.strerror}"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        if brand.startswith(("heic", "heix", "hevc", "mif1", "msf1", "heim", "heis")):
            return f"HEIC/HEIF image (brand {brand!r}) with a {os.path.splitext(path)[1]!r} name; no HEIC decoder is installed"
        return f"ISO media file (brand {brand!r}) with an image extension, not a decodable image"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return f"{fmt} header but Pillow cannot parse it (corrupt file)"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text file with an image extension, not an image"
    return "not a recognised image format"


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if mode == "L" and "transparency" in img.info:
        has_alpha = True
    if has_alpha:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(path: str, spec: PreprocessSpec, opts: DecodeOptions, warned: list[str] | None = None) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image ready for :func:`build_transform`.

    Args:
        path: file to read (OS path; non-UTF-8 names are fine).
        spec: target sizes (for JPEG draft decoding and the aspect-ratio bound) and background.
        opts: pixel limit and EXIF policy.
        warned: if given, Pillow warnings raised while decoding are appended (as text) instead
            of being printed; the caller counts them.

    Returns:
        An RGB image, first frame for animations, EXIF orientation applied.

    Raises:
        DecodeError: with ``kind`` one of ``empty``, ``unidentified``, ``too_large``,
            ``truncated``, ``corrupt``, ``unreadable``.
    """
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise DecodeError("unreadable", f"cannot read file: {exc.strerror}") from None
    if size == 0:
        raise DecodeError("empty", "zero-byte file")
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise DecodeError(
                "too_large",
                f"decompression bomb refused by Pillow itself: {exc} Pillow refuses images above twice "
                "PIL.Image.MAX_IMAGE_PIXELS whatever input.max_pixels says; such a file cannot be scored here",
            ) from None
        except UnidentifiedImageError:
            raise DecodeError("unidentified", _sniff(path)) from None
        except OSError as exc:
            raise DecodeError("unreadable", f"cannot open: {exc}") from None
        try:
            w, h = img.size
            if w * h > opts.max_pixels:
                raise DecodeError(
                    "too_large",
                    f"{w}x{h} = {w * h} pixels exceeds input.max_pixels={opts.max_pixels} "
                    "(possible decompression bomb; raise input.max_pixels if the image is genuine)",
                )
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # policy: first frame of animations and multi-page files
            if spec.jpeg_draft and img.format == "JPEG" and min(w, h) >= 4 * spec.resize:
                # libjpeg DCT-domain downscale by 1/2, 1/4 or 1/8, keeping both sides >= twice the
                # resize target, so the antialiased resize always does the last halving. Drafting
                # straight to the target flipped 3 of 432 top-1s against a full decode; this
                # flips fewer, for about 1 ms more per 12 MP photo (benchmarks/NOTES.md, fidelity).
                img.draft(img.mode, (2 * spec.resize, 2 * spec.resize))
            img.load()
        except DecodeError:
            img.close()
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            img.close()
            text = str(exc)
            kind = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
            raise DecodeError(kind, f"{type(exc).__name__}: {text}") from None
        src = img
        if opts.exif_orientation:
            try:
                img = ImageOps.exif_transpose(img)
            except Exception as exc:  # corrupt EXIF: keep the pixels as stored, say so
                if warned is not None:
                    warned.append(f"EXIF orientation not applied: {type(exc).__name__}")
        rgb = _to_rgb(img, spec.background)
        # Multi-frame files (GIF, TIFF) keep their file open until closed: copy, then close.
        if rgb is src and getattr(src, "n_frames", 1) > 1:
            rgb = src.copy()
        if rgb is not src:
            src.close()
    if warned is not None:
        warned.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    w, h = rgb.size
    long_side, short_side = max(w, h), min(w, h)
    if short_side > 0 and long_side / short_side > spec.max_aspect_ratio:
        keep = max(1, int(short_side * spec.max_aspect_ratio))
        if w > h:
            left = (w - keep) // 2
            rgb = rgb.crop((left, 0, left + keep, h))
        else:
            top = (h - keep) // 2
            rgb = rgb.crop((0, top, w, top + keep))
    return rgb
