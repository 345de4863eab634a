"""Decode one image file fully and turn it into the model's input tensor.

Decoding policy (documented in docs/images.md):
- only the formats of ``input.formats`` are opened (:func:`imgscore.images.formats.open_image`);
  a file whose bytes are another format is a ``format_not_allowed`` error, and no plugin outside
  the list ever sees it (Pillow's EPS plugin would run Ghostscript on it);
- one image's decode may take ``input.decode_timeout_s`` seconds
  (:class:`~imgscore.images.decode_bounds.Deadline`), and a TIFF's tiles may not be bigger than
  its image (:func:`~imgscore.images.decode_bounds.check_decoder_buffers`);
- the whole file is decoded inside the caller's per-image guard (Pillow opens lazily, so a
  truncated JPEG only fails on ``load()``); Pillow's global flags are never changed;
- images that declare more than ``max_pixels`` pixels are refused from the header, before any
  pixel buffer is allocated;
- the EXIF orientation tag is applied (``exif_orientation``);
- animated GIFs and multi-page TIFFs: the first frame is scored;
- every mode reaches the model as RGB: transparency (RGBA, LA, PA, palette with a transparent
  index) is composited onto ``background`` (white by default), CMYK is converted by Pillow;
- float and 16/32-bit integer images (modes ``F``, ``I``, ``I;16*``) are scaled to 8 bits from a
  value range (:func:`imgscore.images.rgb.value_range`: ``preprocess.value_range``, else one taken from the data type
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

The transform that follows is :mod:`imgscore.images.preprocess`; the conversion to RGB is
:mod:`imgscore.images.rgb`; the bounds on one decode's time and memory are
:mod:`imgscore.images.decode_bounds`.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

from imgscore.images.decode_bounds import (
    Deadline,
    check_decoder_buffers,
    metadata_error,
    png_metadata_limits,
)
from imgscore.images.formats import BinaryFile, FormatNotAllowed, open_image
from imgscore.images.preprocess import DecodeError, DecodeOptions, PreprocessSpec
from imgscore.images.rgb import to_rgb, to_srgb

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


@dataclass
class DecodedImage:
    """An RGB image ready for :func:`build_transform` and the file it came from: ``file_size``
    (bytes) and ``file_mtime_ns`` are ``fstat`` of the very file object that was decoded, so a
    file replaced after the scan is described by what was actually read (bytes read from an
    object store: their length, and None — the scan's last-modified and ETag describe them)."""

    image: Image.Image
    file_size: int
    file_mtime_ns: int | None


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


def decode_bytes(
    data: bytes, name: str, spec: PreprocessSpec, opts: DecodeOptions, warned: list[str] | None = None
) -> DecodedImage:
    """Decode an image already read into memory (an object GET), exactly as :func:`decode_file`
    decodes a file; ``name`` (the key) is only used in messages.

    Raises:
        DecodeError: as :func:`decode_file`.
    """
    if not data:
        raise DecodeError("empty", "zero-byte object")
    return DecodedImage(_decode_open_file(io.BytesIO(data), name, spec, opts, warned), len(data), None)


_MAGIC = [
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8", "JPEG"),
    (b"GIF8", "GIF"),
    (b"RIFF", "WEBP/RIFF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
]


def _sniff(path: str, f: BinaryFile) -> str:
    """A specific reason for a file Pillow cannot identify (``f``: the open file, any position)."""
    try:
        f.seek(0)
        head = f.read(64)
    except OSError as exc:
        return f"cannot read file: {exc.strerror}"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        if brand.startswith(("heic", "heix", "hevc", "mif1", "msf1", "heim", "heis")):
            ext = os.path.splitext(path)[1]
            return f"HEIC/HEIF image (brand {brand!r}) with a {ext!r} name; no HEIC decoder is installed"
        return f"ISO media file (brand {brand!r}) with an image extension, not a decodable image"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return f"{fmt} header but Pillow cannot parse it (corrupt file)"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text file with an image extension, not an image"
    return "not a recognised image format"


def _open_checked(f: Deadline, path: str, opts: DecodeOptions) -> Image.Image:
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
        raise (metadata_error(exc, opts) or DecodeError("corrupt", f"ValueError: {exc}")) from None
    except OSError as exc:
        if exc.errno is not None:  # the operating system's answer (permission, gone, I/O error)
            raise DecodeError("unreadable", f"cannot open: {exc}") from None
        # Pillow's own OSError while parsing headers ("Truncated File Read"): the bytes are bad
        kind = "truncated" if "runcated" in str(exc) else "corrupt"
        raise DecodeError(kind, f"cannot open: {exc}") from None
    except (
        SyntaxError,
        EOFError,
        IndexError,
        KeyError,
        TypeError,
        RuntimeError,
        struct.error,
        ZeroDivisionError,
        MemoryError,
    ) as exc:
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
        check_decoder_buffers(img, opts)
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
        raise (metadata_error(exc, opts) or DecodeError("corrupt", f"ValueError: {exc}")) from None
    except (OSError, SyntaxError, EOFError) as exc:
        img.close()
        text = str(exc)
        kind = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
        raise DecodeError(kind, f"{type(exc).__name__}: {text}") from None
    except (IndexError, KeyError, TypeError, RuntimeError, struct.error, ZeroDivisionError, MemoryError) as exc:
        img.close()
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None


def _decode_open_file(
    f: IO[bytes], path: str, spec: PreprocessSpec, opts: DecodeOptions, warned: list[str] | None
) -> Image.Image:
    """The first frame of the open image file ``f`` as RGB, oriented, within the aspect-ratio
    bound: :func:`decode_file`'s work on bytes (``path``: for messages only)."""
    deadline = Deadline(f, opts.decode_timeout_s)
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught, png_metadata_limits(opts.max_metadata_bytes):
        warnings.simplefilter("always")
        img = _open_checked(deadline, path, opts)
        _load_checked(img, spec, opts)
        try:
            deadline.check("reading pixels")
        except DecodeError:
            img.close()
            raise
        rgb = _as_rgb(img, deadline, spec, opts, warned)
    if warned is not None:
        warned.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    return _bound_aspect(rgb, spec)


def _as_rgb(
    src: Image.Image, deadline: Deadline, spec: PreprocessSpec, opts: DecodeOptions, warned: list[str] | None
) -> Image.Image:
    """The loaded image ``src`` oriented (EXIF), colour-managed when asked, and as RGB; ``src`` is
    closed unless it is what is returned (a copy is returned for a multi-frame file).

    Raises:
        DecodeError: ``timeout`` (the budget spent on this work; ``src`` closed), ``non_finite``.
    """
    img = src
    if opts.exif_orientation:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as exc:  # corrupt EXIF: keep the pixels as stored, say so
            if warned is not None:
                warned.append(f"EXIF orientation not applied: {type(exc).__name__}")
    if spec.color_manage:
        img = to_srgb(img, warned)
    try:
        deadline.check("orienting and colour-managing")
        rgb = to_rgb(img, spec)
        deadline.check("converting to RGB")  # a wide float or 16-bit image: numpy work the reads do not see
    except DecodeError:
        src.close()
        raise
    # Multi-frame files (GIF, TIFF) keep reading from the file until closed: copy, then close.
    if rgb is src and getattr(src, "is_animated", False):
        rgb = src.copy()
    if rgb is not src:
        src.close()
    return rgb


def _bound_aspect(rgb: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """``rgb`` center-cropped on its long side to at most ``spec.max_aspect_ratio`` times its
    short side (the final center crop keeps only the middle anyway)."""
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
