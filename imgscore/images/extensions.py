"""Which files are images: Pillow's own registry of extensions, checked against this installation.

Every file a scan finds is an image to score or is listed in ``skipped`` with the reason
(:func:`skip_reason`); only hidden names (:func:`is_hidden`) appear nowhere. The extensions come
from ``PIL.Image.registered_extensions()``, not a hand list, so a JPEG named ``.jfif`` or a JPEG
2000 ``.jp2`` is scored whenever this Pillow can decode it; ``input.formats`` narrows them.
"""

from __future__ import annotations

import inspect
import os

from PIL import Image, ImageFile, features

from imgscore.images.formats import DEFAULT_FORMATS, NEVER, refused_message
from imgscore.io.storage import AnyPath

NOT_AN_IMAGE = "not an image format this Pillow reads"

# Formats whose Pillow plugin needs a library that a build may lack: (kind, name) for PIL.features.
_NEEDS_FEATURE = {
    "JPEG": ("codec", "jpg", "libjpeg"),
    "MPO": ("codec", "jpg", "libjpeg"),
    "JPEG2000": ("codec", "jpg_2000", "OpenJPEG"),
    "PNG": ("codec", "zlib", "zlib"),
    "APNG": ("codec", "zlib", "zlib"),
    "WEBP": ("module", "webp", "libwebp"),
    "AVIF": ("module", "avif", "libavif"),
}
# Formats Pillow registers an extension for but opens through another plugin.
_OPENED_AS = {"MPO": "JPEG"}  # MPO files are opened by the JPEG plugin (jpeg_factory)
# Plugins that identify a file but never produce its pixels (load() fails on every file).
_IDENTIFY_ONLY = {"MPEG": "Pillow reads only the MPEG video header, not its frames"}


def _stub_has_handler(cls) -> bool:
    """Whether a ``PIL.ImageFile.StubImageFile`` subclass can load pixels: only after a handler
    was registered (``PIL.BufrStubImagePlugin.register_handler`` and the like). Reads the class
    attribute ``_handler`` that ``StubImageFile.load`` itself checks (Pillow 10-13; pinned by
    ``tests/test_scan.py::test_pillow_stub_handler_contract``)."""
    return getattr(cls, "_handler", None) is not None


def _why_not_decodable(fmt: str) -> str | None:
    """Why Pillow here cannot decode files of format ``fmt`` (a registry name), or None when it can."""
    opener = Image.OPEN.get(_OPENED_AS.get(fmt, fmt))
    if opener is None:
        return f"Pillow writes {fmt} files but cannot read them"
    if fmt in _IDENTIFY_ONLY:
        return _IDENTIFY_ONLY[fmt]
    cls = opener[0]
    if inspect.isclass(cls) and issubclass(cls, ImageFile.StubImageFile) and not _stub_has_handler(cls):
        return (
            f"Pillow only identifies {fmt} files; decoding them needs a handler registered with "
            f"{cls.__module__}.register_handler"
        )
    need = _NEEDS_FEATURE.get(fmt)
    if need is not None:
        kind, name, lib = need
        ok = features.check_codec(name) if kind == "codec" else features.check_module(name)
        if not ok:
            return f"{fmt} needs {lib}, which this Pillow build lacks"
    if fmt in NEVER:
        return refused_message(fmt, ())
    return None


def pillow_extensions() -> tuple[dict[str, str], dict[str, str]]:
    """What Pillow's registry says about file extensions, checked against this installation.

    Reads ``PIL.Image.registered_extensions()`` after ``Image.init()`` (which imports every plugin
    that can be imported), then drops the formats this build cannot decode: write-only formats
    (PDF, PALM), stub plugins without a handler (BUFR, GRIB, HDF5, WMF off Windows), codecs the
    build lacks (JPEG 2000 without OpenJPEG, WebP, AVIF), EPS (never: it runs Ghostscript), MPEG (header only).
    Which of the decodable ones a run decodes is ``input.formats`` (:func:`skip_reason`).

    Returns:
        (decodable, not_decodable): lower-case extensions with the dot → Pillow format name, and
        → the reason the format cannot be decoded here.
    """
    Image.init()
    decodable: dict[str, str] = {}
    not_decodable: dict[str, str] = {}
    for ext, fmt in Image.registered_extensions().items():
        why = _why_not_decodable(fmt)
        if why is None:
            decodable[ext.lower()] = fmt
        else:
            not_decodable[ext.lower()] = why
    return decodable, not_decodable


_DECODABLE, _NOT_DECODABLE = pillow_extensions()
SCORABLE_EXTENSIONS: frozenset[str] = frozenset(_DECODABLE)
# Image formats that are not scored here, with the reason shown in ``skipped`` (Pillow's own ones,
# plus well-known formats Pillow has no plugin for unless one is installed).
UNSUPPORTED_EXTENSIONS: dict[str, str] = {
    **{
        ext: why
        for ext, why in {
            ".heic": "HEIC/HEIF needs the pillow-heif plugin, which is not installed",
            ".heif": "HEIC/HEIF needs the pillow-heif plugin, which is not installed",
            ".jxl": "JPEG XL needs a Pillow JPEG XL plugin, which is not installed",
            ".svg": "vector image; rasterize it first",
            ".cr2": "camera RAW; convert to JPEG/PNG/TIFF first",
            ".nef": "camera RAW; convert to JPEG/PNG/TIFF first",
            ".arw": "camera RAW; convert to JPEG/PNG/TIFF first",
            ".dng": "camera RAW; convert to JPEG/PNG/TIFF first",
            ".raf": "camera RAW; convert to JPEG/PNG/TIFF first",
            ".orf": "camera RAW; convert to JPEG/PNG/TIFF first",
        }.items()
        if ext not in SCORABLE_EXTENSIONS
    },
    **_NOT_DECODABLE,
}

JUNK_DIRS = frozenset({"__MACOSX"})


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is left out of every scan and listing: a ``.`` name
    (``.DS_Store``, AppleDouble ``._x.jpg``, ``.ipynb_checkpoints``) or ``__MACOSX``."""
    return name.startswith(".") or name in JUNK_DIRS


def skip_reason(name: str, formats: tuple[str, ...] | list[str] | None = None) -> str | None:
    """None when a file called ``name`` is an image to score: its extension (case-insensitive) is
    one this Pillow decodes, as a format of ``formats`` (``input.formats``; None: the default);
    otherwise the reason it is listed in ``skipped``. The bytes decide in the end: a ``.jpg`` that
    holds another format becomes an errors row (``DecodeError.format_not_allowed``)."""
    ext = os.path.splitext(name)[1].lower()
    if ext in SCORABLE_EXTENSIONS:
        allowed = DEFAULT_FORMATS if formats is None else tuple(formats)
        fmt = _DECODABLE[ext]
        return None if fmt in allowed else refused_message(fmt, allowed)
    return UNSUPPORTED_EXTENSIONS.get(ext, NOT_AN_IMAGE)


def no_images_message(root: AnyPath, formats: tuple[str, ...] | list[str] | None = None) -> str:
    """The refusal for a root without a single file to score (scan and CLI preflight say the same);
    ``formats``: ``input.formats`` (None: the default), whose extensions the message lists."""
    scorable = [e for e in sorted(SCORABLE_EXTENSIONS) if skip_reason("f" + e, formats) is None]
    common = [
        e for e in (".jpg", ".jpeg", ".jfif", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".jp2") if e in scorable
    ]
    narrowed = (
        ""
        if formats is None or set(formats) == set(DEFAULT_FORMATS)
        else f", or that input.formats ({', '.join(formats)}) lists their format"
    )
    shown = common or scorable[:10]  # formats without a common extension (FITS alone): its own
    more = f" and {len(scorable) - len(shown)} more extensions" if len(scorable) > len(shown) else ""
    return (
        f"input.root {str(root)!r} holds no image files that this Pillow reads ({', '.join(shown)}{more}); "
        f"check the path, or that the images are not in hidden folders{narrowed}"
    )
