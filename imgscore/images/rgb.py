"""Every image reaches the model as 8-bit RGB (:func:`to_rgb`): transparency composited onto
``preprocess.background``, CMYK and palettes converted by Pillow, float and 16/32-bit images
scaled from a value range (:func:`value_range`), embedded ICC profiles applied only with
``preprocess.color_manage`` (:func:`to_srgb`)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from imgscore.images.preprocess import DecodeError, PreprocessSpec

if TYPE_CHECKING:  # imported when first used: Pillow builds without littlecms lack it
    from PIL import ImageCms

_BIT_DEPTHS = (8, 10, 12, 14, 16, 20, 24, 32)


def value_range(
    values: np.ndarray, is_float: bool, configured: tuple[float, float] | None = None
) -> tuple[float, float]:
    """The (low, high) input values that become 0 and 255, for a float or wide-integer image.

    ``configured`` (``preprocess.value_range``) wins when given. Otherwise, from the data type and
    the finite min/max of ``values`` (the finite pixels, any shape), the way scientific-imaging
    viewers pick a display range:

    - float data within [0, 1] → (0, 1), within [-1, 1] → (-1, 1) (skimage's float conventions);
    - non-negative whole numbers (any integer mode, or a float image holding whole numbers) →
      (0, 2**b - 1) for the smallest bit depth b in 8, 10, 12, 14, 16, 20, 24, 32 that holds the
      maximum: 8-bit data stays as it was, 12-bit data in a 16-bit file (0-4095) uses the whole
      0-255 scale instead of its bottom 6 %;
    - anything else (signed integers, floats beyond [-1, 1]) → its own (min, max).

    Raises:
        ValueError: ``values`` is empty (the caller reports an image without finite pixels).
    """
    if configured is not None:
        return float(configured[0]), float(configured[1])
    lo, hi = float(values.min()), float(values.max())
    if is_float and lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    if is_float and lo >= -1.0 and hi <= 1.0:
        return -1.0, 1.0
    whole = not is_float or bool(np.all(values == np.floor(values)))
    if lo >= 0.0 and whole:
        for b in _BIT_DEPTHS:
            if hi <= 2.0**b - 1:
                return 0.0, 2.0**b - 1
    if lo >= 0.0 and is_float:
        return 0.0, hi
    return lo, hi if hi > lo else lo + 1.0


def _wide_to_rgb(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """A single-channel float or wide-integer image (``F``, ``I``, ``I;16*``) → 8-bit RGB.

    Scaled linearly from :func:`value_range` to 0-255 and clipped. NaN/±Inf pixels raise
    ``DecodeError("non_finite")``, or with ``spec.non_finite == "fill"`` become the low end
    (NaN, -Inf) or the high end (+Inf) of the range, the range being taken from the finite ones.
    """
    # float32 throughout: 4 bytes a pixel (an 89 MP raster is 358 MB, not 716), exact for 16-bit
    # data, and for 32-bit data off by far less than one of the 256 output levels
    try:
        arr = np.asarray(img).astype(np.float32, copy=False)
    except (TypeError, ValueError):  # a mode numpy cannot view directly
        arr = np.asarray(img.convert("I")).astype(np.float32)
    finite = np.isfinite(arr)
    n_bad = int(arr.size - np.count_nonzero(finite))
    if n_bad == arr.size:
        raise DecodeError(
            "non_finite", f"every pixel is NaN or infinite ({arr.size} pixels, mode {img.mode}); nothing to score"
        )
    if n_bad and spec.non_finite != "fill":
        raise DecodeError(
            "non_finite",
            f"{n_bad} of {arr.size} pixels are NaN or infinite (mode {img.mode}; no-data values?); "
            "set preprocess.non_finite=fill to score them as the low end of the range (NaN, -Inf) or the high end "
            "(+Inf)",
        )
    lo, hi = value_range(arr[finite] if n_bad else arr, img.mode == "F", spec.value_range)
    if n_bad:
        arr = np.where(np.isposinf(arr), hi, np.where(finite, arr, lo))
    arr8 = np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, mode="L").convert("RGB")


def _is_wide(mode: str) -> bool:
    """A float or 16/32-bit integer mode (``F``, ``I``, ``I;16*``, ``I;32*``)."""
    return mode in ("F", "I") or mode.startswith(("I;16", "I;32"))


_SRGB: ImageCms.core.CmsProfile | None = None  # built on first use


def to_srgb(img: Image.Image, warned: list[str] | None) -> Image.Image:
    """``img`` converted from its embedded ICC profile to sRGB (``preprocess.color_manage``).

    Images without a profile, and modes ImageCms does not transform, are returned as they are; a
    profile that cannot be used leaves the pixels as stored and counts a warning.
    """
    global _SRGB
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return img
    from PIL import ImageCms

    try:
        if _SRGB is None:
            _SRGB = ImageCms.createProfile("sRGB")
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out = ImageCms.profileToProfile(img, src, _SRGB, outputMode="RGBA" if img.mode == "RGBA" else "RGB")
        return out if out is not None else img  # None only for a conversion in place, which this is not
    except Exception as exc:  # a broken or mismatched profile: pixels as stored, counted
        if warned is not None:
            warned.append(f"ICC profile not applied: {type(exc).__name__}")
        return img


def to_rgb(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """``img`` as RGB (the same image when it is RGB already): wide modes scaled
    (:func:`_wide_to_rgb`), transparency composited onto ``spec.background``, the rest converted.

    Raises:
        DecodeError: ``non_finite`` (see :func:`_wide_to_rgb`).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if _is_wide(mode):
        return _wide_to_rgb(img, spec)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if mode == "L" and "transparency" in img.info:
        has_alpha = True
    if has_alpha:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*spec.background, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")
