"""Decode one image file fully and turn it into the model's input tensor.

Decoding policy (documented in docs/images.md):
- only the formats of ``input.formats`` are opened (:func:`imgscore.images.formats.open_image`);
  a file whose bytes are another format is a ``format_not_allowed`` error, and no plugin outside
  the list ever sees it (Pillow's EPS plugin would run Ghostscript on it);
- one image's decode may take ``input.decode_timeout_s`` seconds (:class:`_Deadline`), and a
  TIFF's tiles may not be bigger than its image (:func:`_check_decoder_buffers`);
- the whole file is decoded inside the caller's per-image guard (Pillow opens lazily, so a
  truncated JPEG only fails on ``load()``); Pillow's global flags are never changed;
- images that declare more than ``max_pixels`` pixels are refused from the header, before any
  pixel buffer is allocated;
- the EXIF orientation tag is applied (``exif_orientation``);
- animated GIFs and multi-page TIFFs: the first frame is scored;
- every mode reaches the model as RGB: transparency (RGBA, LA, PA, palette with a transparent
  index) is composited onto ``background`` (white by default), CMYK is converted by Pillow;
- float and 16/32-bit integer images (modes ``F``, ``I``, ``I;16*``) are scaled to 8 bits from a
  value range (:func:`value_range`: ``preprocess.value_range``, else one taken from the data type
  and the finite min/max, so 12-bit, float and signed data keep their contrast); NaN or ±Inf
  pixels make the image a ``non_finite`` error unless ``preprocess.non_finite: fill``;
- embedded ICC profiles are ignored, as torchvision's loader does (the models were trained that
  way), unless ``preprocess.color_manage: true`` converts the pixels to sRGB with ImageCms;
- PNG text and ICC chunks up to ``input.max_metadata_bytes`` are read: Pillow's limits
  (``PngImagePlugin.MAX_TEXT_CHUNK``/``MAX_TEXT_MEMORY``, module globals) are raised for the
  duration of one decode only, while this process's decode lock is held, and restored after;
- strips with an aspect ratio above ``max_aspect_ratio`` are center-cropped on their long side
  before resizing; the final center crop only ever keeps the middle, so predictions do not change
  but an 8000×8 image cannot become a 256000×256 tensor.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from imgscore.images.formats import DEFAULT_FORMATS, FormatNotAllowed, open_image

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


def warnings_lock() -> threading.Lock:
    """This process's lock around ``warnings.catch_warnings`` (see above); other modules that
    silence a warning for one call take it too, so no decode loses or leaks its warnings."""
    return _WARNINGS_LOCK


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
    value_range: tuple[float, float] | None = None  # None: from the data (value_range())
    non_finite: str = "error"  # "error" or "fill"
    color_manage: bool = False

    def to_dict(self) -> dict:
        """JSON-ready settings. The decode settings added later (``value_range``, ``non_finite``,
        ``color_manage``) appear only when they differ from their defaults, so the model key of
        runs made before they existed (``run.skip_scored``) stays the same."""
        out = {
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


# Pillow's own PNG text limits (1 MiB per compressed chunk, 64 MiB in all), read once.
PILLOW_PNG_TEXT_LIMITS = (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY)
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
    def from_input(cls, input_cfg) -> DecodeOptions:
        """The options of an ``InputConfig`` (``input.*``)."""
        return cls(input_cfg.max_pixels, input_cfg.exif_orientation, input_cfg.max_metadata_bytes,
                   tuple(input_cfg.formats), input_cfg.decode_timeout_s)


@dataclass
class DecodedImage:
    """An RGB image ready for :func:`build_transform` and the file it came from: ``file_size``
    (bytes) and ``file_mtime_ns`` are ``fstat`` of the very file object that was decoded, so a
    file replaced after the scan is described by what was actually read (bytes read from an
    object store: their length, and None — the scan's last-modified and ETag describe them)."""

    image: Image.Image
    file_size: int
    file_mtime_ns: int | None


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


def _sniff(path: str, f) -> str:
    """A specific reason for a file Pillow cannot identify (``f``: the open file, any position)."""
    try:
        f.seek(0)
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


_BIT_DEPTHS = (8, 10, 12, 14, 16, 20, 24, 32)


def value_range(values: np.ndarray, is_float: bool, configured: tuple[float, float] | None = None) -> tuple[float, float]:
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
        raise DecodeError("non_finite", f"every pixel is NaN or infinite ({arr.size} pixels, mode {img.mode}); nothing to score")
    if n_bad and spec.non_finite != "fill":
        raise DecodeError(
            "non_finite",
            f"{n_bad} of {arr.size} pixels are NaN or infinite (mode {img.mode}; no-data values?); "
            "set preprocess.non_finite=fill to score them as the low end of the range (NaN, -Inf) or the high end (+Inf)",
        )
    lo, hi = value_range(arr[finite] if n_bad else arr, img.mode == "F", spec.value_range)
    if n_bad:
        arr = np.where(np.isposinf(arr), hi, np.where(finite, arr, lo))
    arr8 = np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, mode="L").convert("RGB")


def _is_wide(mode: str) -> bool:
    return mode in ("F", "I") or mode.startswith(("I;16", "I;32"))


_SRGB = None


def _to_srgb(img: Image.Image, warned: list[str] | None) -> Image.Image:
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
        return ImageCms.profileToProfile(img, src, _SRGB, outputMode="RGBA" if img.mode == "RGBA" else "RGB")
    except Exception as exc:  # a broken or mismatched profile: pixels as stored, counted
        if warned is not None:
            warned.append(f"ICC profile not applied: {type(exc).__name__}")
        return img


def _to_rgb(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
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


@contextlib.contextmanager
def _png_metadata_limits(max_bytes: int):
    """Raise Pillow's PNG text/ICC limits to ``max_bytes`` (never lower them) for one decode.

    ``PngImagePlugin.MAX_TEXT_CHUNK``/``MAX_TEXT_MEMORY`` are module globals: call this only while
    holding ``_WARNINGS_LOCK``, which every decode in this process takes, so no other decode sees
    another value; the previous values are restored on the way out, error or not.
    """
    old = (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY)
    PngImagePlugin.MAX_TEXT_CHUNK = max(old[0], max_bytes)
    PngImagePlugin.MAX_TEXT_MEMORY = max(old[1], max_bytes)
    try:
        yield
    finally:
        PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = old


def _metadata_error(exc: ValueError, opts: DecodeOptions) -> DecodeError | None:
    """The ``metadata_too_large`` error for Pillow's PNG text/ICC limit messages, else None."""
    text = str(exc)
    if "MAX_TEXT_CHUNK" not in text and "MAX_TEXT_MEMORY" not in text:
        return None
    return DecodeError(
        "metadata_too_large",
        f"PNG text or ICC metadata larger than input.max_metadata_bytes={opts.max_metadata_bytes} ({text}); "
        "the pixels may be fine: raise input.max_metadata_bytes, or strip the metadata (exiftool -all= FILE)",
    )


def decode_image(path: str, spec: PreprocessSpec, opts: DecodeOptions, warned: list[str] | None = None) -> Image.Image:
    """:func:`decode_file`'s image alone (callers that do not record the file's size and mtime)."""
    return decode_file(path, spec, opts, warned).image


def decode_file(path: str, spec: PreprocessSpec, opts: DecodeOptions, warned: list[str] | None = None) -> DecodedImage:
    """Decode ``path`` fully into an RGB PIL image ready for :func:`build_transform`.

    Args:
        path: file to read (OS path; non-UTF-8 names are fine).
        spec: target sizes (for JPEG draft decoding and the aspect-ratio bound), background,
            value range, non-finite and colour-management policies.
        opts: pixel limit, EXIF policy, PNG metadata limit.
        warned: if given, Pillow warnings raised while decoding are appended (as text) instead
            of being printed; the caller counts them.

    Returns:
        A :class:`DecodedImage`: the RGB image (first frame for animations, EXIF orientation
        applied) and the size (bytes) and mtime (ns) of the file object it was read from.

    Raises:
        DecodeError: with ``kind`` one of ``empty``, ``unidentified``, ``format_not_allowed``
            (the bytes are a format outside ``opts.formats``, named in the message),
            ``too_large`` (declared pixels, or TIFF tiles bigger than the image), ``truncated``,
            ``corrupt``, ``unreadable``, ``non_finite``, ``metadata_too_large``, ``timeout``
            (over ``opts.decode_timeout_s``).
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DecodeError("unreadable", f"cannot read file: {exc.strerror}") from None
    with f:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            raise DecodeError("empty", "zero-byte file")
        rgb = _decode_open_file(f, path, spec, opts, warned)
    return DecodedImage(rgb, st.st_size, st.st_mtime_ns)


def decode_bytes(data: bytes, name: str, spec: PreprocessSpec, opts: DecodeOptions, warned: list[str] | None = None) -> DecodedImage:
    """Decode an image already read into memory (an object GET), exactly as :func:`decode_file`
    decodes a file; ``name`` (the key) is only used in messages.

    Raises:
        DecodeError: as :func:`decode_file`.
    """
    if not data:
        raise DecodeError("empty", "zero-byte object")
    return DecodedImage(_decode_open_file(io.BytesIO(data), name, spec, opts, warned), len(data), None)


class _Deadline:
    """A read-only view of an image file whose reads fail once ``budget_s`` seconds have passed
    since it was made: the per-image decode time budget (``input.decode_timeout_s``).

    Why reads: the budget must hold in every decode mode — DataLoader worker processes, and
    inline (``inference.num_workers: 0``) in whatever thread a shard runs. ``SIGALRM`` works only
    in the main thread; a thread with a deadline cannot be stopped and would keep the decode lock
    and the memory; a process per image costs more than most decodes. Pillow's decoders pull the
    file through ``read()`` chunk by chunk (``ImageFile.load``: 64 KiB at a time), so checking the
    clock there stops a slow decode within one chunk's work, in any thread, with nothing left
    running. Not covered: a decoder that does all its work in one C call after reading the file
    (WebP, AVIF, libtiff); their work is bounded by ``input.max_pixels`` and the tile check
    (:func:`_check_decoder_buffers`) instead, and decoders that decompress a whole file in one
    call without such bounds (FITS GZIP) are off the default ``input.formats``. The conversion
    after the load (EXIF orientation, colour management, wide modes to RGB: Pillow and numpy
    calls that read nothing) is checked between its steps: a budget spent there ends the image
    as a ``timeout`` row too, though the step that overran is not interrupted.
    ``fileno`` is deliberately absent, so libtiff reads through here too rather than the descriptor.
    """

    def __init__(self, f, budget_s: float):
        self._f = f
        self.budget_s = budget_s
        self._start = time.monotonic()

    def check(self, doing: str) -> None:
        """Raise ``DecodeError("timeout")`` when the budget is spent (``doing``: for the message)."""
        spent = time.monotonic() - self._start
        if spent > self.budget_s:
            raise DecodeError(
                "timeout",
                f"decoding stopped after {spent:.1f} s while {doing}: over input.decode_timeout_s={self.budget_s:g} s "
                "(a slow or hostile file); raise input.decode_timeout_s if such images are genuine",
            )

    def read(self, n: int = -1) -> bytes:
        self.check("reading pixels")
        return self._f.read(n)

    def readline(self, n: int = -1) -> bytes:
        self.check("reading pixels")
        return self._f.readline(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:  # Image.close() closes the file it read, as it did the bare file
        self._f.close()


# A TIFF tile may hold up to the whole image, or this many pixels (a 2048x2048 tile; 16 MiB at 4
# bytes a pixel) for images smaller than one ordinary tile.
MIN_TILE_PIXELS = 1 << 22


def _check_decoder_buffers(img: Image.Image, opts: DecodeOptions) -> None:
    """Refuse a TIFF whose tiles are bigger than its image: libtiff allocates a whole tile
    (TileWidth x TileLength from the tags) per read, whatever the declared size, so a 16x16
    image with one 16384x16384 tile made memory peak near 2 GB. Strips need no check: libtiff
    clamps RowsPerStrip to the image height. Frames allocate nothing: only the first frame is
    read, and nothing walks the others (``is_animated`` looks one frame ahead, ``n_frames`` is
    never asked), so a file declaring a million frames costs what its first one costs.

    Raises:
        DecodeError: ``too_large``, naming the tile, the image and the limit.
    """
    if img.format != "TIFF":
        return
    tags = getattr(img, "tag_v2", {})
    try:
        tw, th = int(tags[322]), int(tags[323])  # TileWidth, TileLength
    except (KeyError, TypeError, ValueError):
        return
    w, h = img.size
    tile, pixels = tw * th, w * h
    if tile > max(pixels, MIN_TILE_PIXELS) or pixels + tile > opts.max_pixels:
        raise DecodeError(
            "too_large",
            f"TIFF tile {tw}x{th} = {tile} pixels for a {w}x{h} image: the decoder would allocate a whole tile, "
            f"and a tile may hold at most max(image pixels, {MIN_TILE_PIXELS}) = {max(pixels, MIN_TILE_PIXELS)} pixels, "
            f"image and tile together at most input.max_pixels={opts.max_pixels} (possible decompression bomb; "
            "re-save the file with ordinary tiles, e.g. tiffcp -t -w 256 -l 256 IN OUT)",
        )


def _open_checked(f: _Deadline, path: str, opts: DecodeOptions) -> Image.Image:
    """Open ``f`` with only ``opts.formats`` (:func:`imgscore.images.formats.open_image`) and map
    what opening raises to :class:`DecodeError`."""
    try:
        return open_image(f, opts.formats)
    except DecodeError:
        raise
    except FormatNotAllowed as exc:
        raise DecodeError("format_not_allowed", str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(
            "too_large",
            f"decompression bomb refused by Pillow itself: {exc} Pillow refuses images above twice "
            "PIL.Image.MAX_IMAGE_PIXELS whatever input.max_pixels says; such a file cannot be scored here",
        ) from None
    except UnidentifiedImageError:
        raise DecodeError("unidentified", _sniff(path, f)) from None
    except ValueError as exc:
        raise (_metadata_error(exc, opts) or DecodeError("corrupt", f"ValueError: {exc}")) from None
    except OSError as exc:
        if exc.errno is not None:  # the operating system's answer (permission, gone, I/O error)
            raise DecodeError("unreadable", f"cannot open: {exc}") from None
        # Pillow's own OSError while parsing headers ("Truncated File Read"): the bytes are bad
        kind = "truncated" if "runcated" in str(exc) else "corrupt"
        raise DecodeError(kind, f"cannot open: {exc}") from None
    except (SyntaxError, EOFError, IndexError, KeyError, TypeError, RuntimeError, struct.error, ZeroDivisionError, MemoryError) as exc:
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None


def _load_checked(img: Image.Image, spec: PreprocessSpec, opts: DecodeOptions) -> None:
    """Check the declared size and the decoder's buffers, then read the first frame's pixels.

    Raises:
        DecodeError: ``too_large``, ``truncated``, ``corrupt``, ``metadata_too_large``, ``timeout``
            (the image is closed first).
    """
    try:
        w, h = img.size
        if w * h > opts.max_pixels:
            raise DecodeError(
                "too_large",
                f"{w}x{h} = {w * h} pixels exceeds input.max_pixels={opts.max_pixels} "
                "(possible decompression bomb; raise input.max_pixels if the image is genuine)",
            )
        _check_decoder_buffers(img, opts)
        # policy: first frame of animations and multi-page files. is_animated looks one frame
        # ahead only; n_frames would walk every frame (or IFD) of the file first.
        if getattr(img, "is_animated", False) and img.tell() != 0:
            img.seek(0)
        if spec.jpeg_draft and img.format == "JPEG" and min(w, h) >= 4 * spec.resize:
            # libjpeg DCT-domain downscale by 1/2, 1/4 or 1/8, keeping both sides >= twice the
            # resize target, so the antialiased resize always does the last halving: drafting
            # straight to the target flipped top-1s against a full decode, this does not, for
            # some decode time (benchmarks/NOTES.md, "Decode").
            img.draft(img.mode, (2 * spec.resize, 2 * spec.resize))
        img.load()
    except DecodeError:
        img.close()
        raise
    except ValueError as exc:
        img.close()
        raise (_metadata_error(exc, opts) or DecodeError("corrupt", f"ValueError: {exc}")) from None
    except (OSError, SyntaxError, EOFError) as exc:
        img.close()
        text = str(exc)
        kind = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
        raise DecodeError(kind, f"{type(exc).__name__}: {text}") from None
    except (IndexError, KeyError, TypeError, RuntimeError, struct.error, ZeroDivisionError, MemoryError) as exc:
        img.close()
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None


def _decode_open_file(f, path: str, spec: PreprocessSpec, opts: DecodeOptions, warned: list[str] | None) -> Image.Image:
    f = _Deadline(f, opts.decode_timeout_s)
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught, _png_metadata_limits(opts.max_metadata_bytes):
        warnings.simplefilter("always")
        img = _open_checked(f, path, opts)
        _load_checked(img, spec, opts)
        try:
            f.check("reading pixels")
        except DecodeError:
            img.close()
            raise
        src = img
        if opts.exif_orientation:
            try:
                img = ImageOps.exif_transpose(img)
            except Exception as exc:  # corrupt EXIF: keep the pixels as stored, say so
                if warned is not None:
                    warned.append(f"EXIF orientation not applied: {type(exc).__name__}")
        if spec.color_manage:
            img = _to_srgb(img, warned)
        try:
            f.check("orienting and colour-managing")
            rgb = _to_rgb(img, spec)
            f.check("converting to RGB")  # a wide float or 16-bit image: numpy work the reads do not see
        except DecodeError:
            src.close()
            raise
        # Multi-frame files (GIF, TIFF) keep reading from the file until closed: copy, then close.
        if rgb is src and getattr(src, "is_animated", False):
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
