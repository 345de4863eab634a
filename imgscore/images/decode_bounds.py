"""Bounds on what one image's decode may cost, whatever its bytes: a time budget enforced on the
decoder's reads (:class:`Deadline`), TIFF tiles no bigger than their image
(:func:`check_decoder_buffers`), and PNG metadata up to ``input.max_metadata_bytes``
(:func:`png_metadata_limits`, :func:`metadata_error`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import IO

from PIL import Image, PngImagePlugin

from imgscore.images.preprocess import DecodeError, DecodeOptions


class Deadline:
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
    (:func:`check_decoder_buffers`) instead, and decoders that decompress a whole file in one
    call without such bounds (FITS GZIP) are off the default ``input.formats``. The conversion
    after the load (EXIF orientation, colour management, wide modes to RGB: Pillow and numpy
    calls that read nothing) is checked between its steps: a budget spent there ends the image
    as a ``timeout`` row too, though the step that overran is not interrupted.
    ``fileno`` is deliberately absent, so libtiff reads through here too rather than the descriptor.
    """

    def __init__(self, f: IO[bytes], budget_s: float) -> None:
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


def check_decoder_buffers(img: Image.Image, opts: DecodeOptions) -> None:
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
            f"and a tile may hold at most max(image pixels, {MIN_TILE_PIXELS}) = {max(pixels, MIN_TILE_PIXELS)} "
            "pixels, "
            f"image and tile together at most input.max_pixels={opts.max_pixels} (possible decompression bomb; "
            "re-save the file with ordinary tiles, e.g. tiffcp -t -w 256 -l 256 IN OUT)",
        )


@contextlib.contextmanager
def png_metadata_limits(max_bytes: int) -> Iterator[None]:
    """Raise Pillow's PNG text/ICC limits to ``max_bytes`` (never lower them) for one decode.

    ``PngImagePlugin.MAX_TEXT_CHUNK``/``MAX_TEXT_MEMORY`` are module globals: call this only while
    holding the decode lock (``imgscore.images.decode.warnings_lock``), which every decode in this
    process takes, so no other decode sees another value; the previous values are restored on the
    way out, error or not.
    """
    old = (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY)
    PngImagePlugin.MAX_TEXT_CHUNK = max(old[0], max_bytes)
    PngImagePlugin.MAX_TEXT_MEMORY = max(old[1], max_bytes)
    try:
        yield
    finally:
        PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = old


def metadata_error(exc: ValueError, opts: DecodeOptions) -> DecodeError | None:
    """The ``metadata_too_large`` error for Pillow's PNG text/ICC limit messages, else None."""
    text = str(exc)
    if "MAX_TEXT_CHUNK" not in text and "MAX_TEXT_MEMORY" not in text:
        return None
    return DecodeError(
        "metadata_too_large",
        f"PNG text or ICC metadata larger than input.max_metadata_bytes={opts.max_metadata_bytes} ({text}); "
        "the pixels may be fine: raise input.max_metadata_bytes, or strip the metadata (exiftool -all= FILE)",
    )
