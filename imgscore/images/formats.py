"""Which image formats are decoded: the ``input.formats`` allow-list and its checks.

``Image.open`` without ``formats=`` tries every Pillow plugin whatever the file is called, so a
file named ``holiday.jpg`` holding PostScript reaches the EPS plugin, which runs Ghostscript on
it. Every open of a file under ``input.root`` therefore passes :func:`open_formats` (through
:func:`open_image`, which ``imgscore.images.decode`` calls). Names are Pillow's format names
(``Image.ID``), upper case.

Default (:data:`DEFAULT_FORMATS`): the formats photos arrive in — JPEG, PNG, WEBP, TIFF, BMP,
GIF, MPO (multi-picture JPEG from phones and stereo cameras), AVIF (Pillow 11.3+ wheels) and HEIF
(the ``pillow-heif`` plugin); a listed format whose plugin is not installed decodes nothing and
its files are skipped by extension with the reason. Out by default: Pillow's rarer decoders
(FITS, McIdas, Spider, TGA, DCX, JPEG 2000, …), where Pillow's 2026 advisories found
decompression bombs, bomb-check bypasses and out-of-bounds reads; they can be added by name.
:data:`NEVER` cannot be added: PostScript/EPS, whose decoding runs an external program, and IPTC,
whose decoder hands the image data embedded in the file to ``Image.open`` with every plugin
(PostScript included).
"""

from __future__ import annotations

import difflib
import os
from typing import Protocol, TypeAlias

from PIL import Image, UnidentifiedImageError

DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "MPO", "AVIF", "HEIF")

# Formats whose decoding runs another program on the file's bytes: refused by the config check.
NEVER: dict[str, str] = {
    "EPS": "Pillow's EPS plugin runs Ghostscript (gs) on the file, and Ghostscript's -dSAFER has had "
    "code-execution escapes; rasterize PostScript/EPS files to PNG yourself, in a sandbox, if you need them scored",
    # IptcImagePlugin has no magic-byte test (so it is tried on every file), and its load() opens the
    # embedded data with Image.open and no formats= list: PostScript inside reaches Ghostscript.
    "IPTC": "Pillow's IPTC plugin opens the image data embedded in the file with every Pillow plugin, EPS included, "
    "so Ghostscript could run on it; convert IPTC/NAA files to TIFF or PNG first",
}
_NEVER_ALIASES = {"PS": "EPS", "POSTSCRIPT": "EPS", "EPSF": "EPS"}

# Formats that plugins outside Pillow provide; valid names even where the plugin is not installed.
PLUGIN_FORMATS = {"AVIF": "Pillow 11.3+ wheels (libavif)", "HEIF": "the pillow-heif plugin"}
# Formats Pillow opens through another format's plugin: MPO files come from the JPEG plugin.
_OPENED_AS = {"MPO": "JPEG"}


def known_formats() -> list[str]:
    """Every name ``input.formats`` accepts: Pillow's readable formats here (``Image.ID`` after
    ``Image.init()``), MPO, and :data:`PLUGIN_FORMATS`, in Pillow's order; :data:`NEVER` left out."""
    Image.init()
    names = [*Image.ID, *_OPENED_AS, *PLUGIN_FORMATS]
    return [n for n in dict.fromkeys(names) if n not in NEVER]


def check_formats(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``names`` upper-cased, duplicates dropped, in the given order.

    Raises:
        ValueError: a name in :data:`NEVER` (with the reason it can never be decoded), an unknown
            name (with the closest known one and the list of valid names), or an empty list.
    """
    out: list[str] = []
    for raw in names:
        name = str(raw).strip().upper()
        never = _NEVER_ALIASES.get(name, name)
        if never in NEVER:
            raise ValueError(
                f"input.formats names {raw!r}, which is never decoded here: {NEVER[never]}; remove it from "
                "input.formats"
            )
        valid = known_formats()
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(
                f"input.formats names {raw!r}, which is not an image format Pillow reads here; {hint}valid names: "
                f"{', '.join(sorted(valid))}"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(
            f"input.formats is empty, so no image could be decoded; list formats such as {', '.join(DEFAULT_FORMATS)}"
        )
    return tuple(out)


def open_formats(allowed: tuple[str, ...] | list[str]) -> list[str]:
    """The ``formats=`` argument of ``Image.open`` for the allow-list ``allowed``: the registered
    plugins it names, in Pillow's own order (which decides between plugins that accept the same
    bytes), JPEG standing in for MPO. A format that only rides on another's plugin (MPO on JPEG)
    must still be checked against ``allowed`` after the open (``Image.format``)."""
    Image.init()
    wanted = {_OPENED_AS.get(f, f) for f in allowed}
    return [f for f in Image.ID if f in wanted and f not in NEVER]


def detect_format(prefix: bytes, allowed: tuple[str, ...] | list[str]) -> str | None:
    """The format of a file Pillow could not open with ``allowed``, from its first bytes.

    Only the plugins' ``_accept`` functions are called (pure byte tests on ``prefix``, the first
    16 bytes as ``Image.open`` reads them): no plugin opens the file, so nothing is run. Returns
    None when an allowed format accepts the bytes (a corrupt file of that format) or none does;
    plugins without an accept test (IM, TGA, Spider, …) are never named.
    """
    Image.init()
    opened = set(open_formats(allowed))
    found = None
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if accept is None:
            continue
        try:
            hit = accept(prefix)
        except Exception:  # an accept test that cannot read a short prefix: not this format
            continue
        if hit and not isinstance(hit, str):
            if fmt in opened:
                return None
            found = found or fmt
    return found


def recorded_formats(names: object) -> tuple[str, ...]:
    """The formats to open a finished run's images with (report thumbnails), from the
    ``input.formats`` its manifest recorded. The manifest lies under ``output.root``, which others
    may write: only names that are also in :data:`DEFAULT_FORMATS` are kept (never one of
    :data:`NEVER`, never a rarer decoder a planted manifest could switch on); the defaults when
    nothing is left or ``names`` is not a list."""
    if not isinstance(names, list | tuple):
        return DEFAULT_FORMATS
    kept = tuple(dict.fromkeys(str(n).strip().upper() for n in names if str(n).strip().upper() in DEFAULT_FORMATS))
    return kept or DEFAULT_FORMATS


def refused_message(fmt: str, allowed: tuple[str, ...] | list[str]) -> str:
    """Why a file of format ``fmt`` is not decoded, and the fix (for errors rows and ``skipped``)."""
    if fmt in NEVER:
        return f"{'EPS (PostScript)' if fmt == 'EPS' else fmt} file, never decoded: {NEVER[fmt]}"
    return (
        f"{fmt} file, and {fmt} is not in input.formats ({', '.join(allowed)}); add {fmt} to input.formats to decode "
        "such files"
    )


class FormatNotAllowed(UnidentifiedImageError):
    """A file whose bytes are a format outside the allow-list (``fmt``, as :func:`detect_format`
    or the opening plugin named it). An ``UnidentifiedImageError`` (so an ``OSError``) too, for
    callers that treat any file they cannot open alike."""

    def __init__(self, fmt: str, allowed: tuple[str, ...] | list[str]) -> None:
        super().__init__(refused_message(fmt, allowed))
        self.fmt = fmt


class BinaryFile(Protocol):
    """A readable, seekable binary file: what Pillow reads an image from (an open file, or a
    wrapper of one such as the decode's time budget)."""

    def read(self, n: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


# What an image is opened from: a binary file, or a path (bytes for names that are not UTF-8).
ImageSource: TypeAlias = BinaryFile | str | bytes | os.PathLike[str] | os.PathLike[bytes]


def open_image(fp: ImageSource, allowed: tuple[str, ...] | list[str]) -> Image.Image:
    """``Image.open(fp, formats=...)`` with only the plugins of ``allowed`` (``input.formats``):
    the one way a file under ``input.root`` is opened (decode, report thumbnails, samples).

    Args:
        fp: a binary file object (any position) or a path.
        allowed: Pillow format names, as :func:`check_formats` returns them.

    Returns:
        The lazily opened image (pixels not read yet); ``format`` is one of ``allowed``.

    Raises:
        FormatNotAllowed: the bytes are a format outside ``allowed`` (named from their magic bytes;
            no plugin outside ``allowed`` ever opens them).
        UnidentifiedImageError: no plugin recognises the bytes; and whatever else ``Image.open``
            raises (``OSError``, ``ValueError``, ``Image.DecompressionBombError``).
    """
    try:
        # Pillow annotates fp as IO[bytes]; it reads any object with read/seek/tell (BinaryFile)
        img = Image.open(fp, formats=open_formats(allowed))  # type: ignore[arg-type]
    except FormatNotAllowed:
        raise
    except UnidentifiedImageError:
        fmt = _detect_file(fp, allowed)
        if fmt is None:
            raise
        raise FormatNotAllowed(fmt, allowed) from None
    if img.format not in allowed:  # MPO comes from the JPEG plugin; plain JPEG when only MPO is allowed
        fmt = img.format or "unknown"
        img.close()
        raise FormatNotAllowed(fmt, allowed)
    return img


def _detect_file(fp: ImageSource, allowed: tuple[str, ...] | list[str]) -> str | None:
    """:func:`detect_format` of the first 16 bytes of ``fp`` (a file object or a path)."""
    try:
        if not isinstance(fp, str | bytes | os.PathLike):
            fp.seek(0)
            return detect_format(fp.read(16), allowed)
        with open(fp, "rb") as f:
            return detect_format(f.read(16), allowed)
    except OSError:
        return None
