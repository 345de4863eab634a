"""Thumbnails of the report's least confident images, read back from the run's input root as
small JPEG ``data:`` URIs for report.html. Images are opened as scoring opens them
(:func:`imgscore.images.formats.open_image`, only the run's recorded ``input.formats``)."""

from __future__ import annotations

import base64
import io
import os
import warnings
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgscore.images.formats import DEFAULT_FORMATS, open_image, recorded_formats
from imgscore.io import objects, storage
from imgscore.io.containment import UnsafePathError, check_relative, check_relative_column
from imgscore.io.storage import AnyPath
from imgscore.report.model import Report
from imgscore.runstate.commits import run_dir_of

THUMB_PX = 112
LEFT_THE_ROOT = "not read: the path leaves the input root"


class Thumbnail(NamedTuple):
    """An image's thumbnail as a ``data:image/jpeg`` URI, or None and the reason shown instead."""

    uri: str | None
    reason: str | None


def thumbnail_data_uri(
    path: str | os.PathLike | bytes | io.BytesIO,
    size: int = THUMB_PX,
    formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
) -> Thumbnail:
    """A JPEG at most ``size`` pixels on its longer side, of an image file, as a ``data:`` URI.

    ``path``: a path (``bytes`` for names that are not UTF-8) or the image's bytes in a ``BytesIO``;
    only the run's ``formats`` (``input.formats``) are opened, as scoring opens them. EXIF
    orientation is applied and transparency composited on white, like scoring does. Never raises
    for a bad or missing file: the reason is returned for the page to show.
    """
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(path, formats) as opened:
                opened.draft("RGB", (size * 2, size * 2))
                im = ImageOps.exif_transpose(opened)
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, rgba)
                im = im.convert("RGB")
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=82)
    except FileNotFoundError:
        return Thumbnail(None, "file not found")
    except Exception as exc:  # shown on the page instead of the image; the report still renders
        return Thumbnail(None, f"{type(exc).__name__}: {str(exc)[:120]}")
    return Thumbnail("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None)


def _fs_paths(out_root: AnyPath, run_id: str, wanted: set[str]) -> dict[str, bytes]:
    """image_path → fs_path (bytes, opens names that are not UTF-8) from the run's index.parquet
    (a folder of part files; a single file for runs planned before that).

    Raises:
        UnsafePathError: an fs_path leaves the input root.
    """
    index = storage.path(run_dir_of(out_root, run_id), "index.parquet")
    if not wanted or not storage.exists(index):
        return {}
    fs, where = storage.arrow_filesystem(index)
    t = pq.read_table(where, columns=["image_path", "fs_path"], filesystem=fs)
    t = t.filter(pc.is_in(t["image_path"], value_set=pa.array(sorted(wanted), pa.string())))
    check_relative_column(t["fs_path"], f"{index} fs_path")  # thumbnails are read under the input root only
    return dict(zip(t["image_path"].to_pylist(), t["fs_path"].to_pylist(), strict=True))


def _below(rel: str) -> bool:
    try:
        check_relative(rel, "image_path")
        return True
    except UnsafePathError:
        return False


def _from_read(data: bytes | BaseException, formats: tuple[str, ...]) -> Thumbnail:
    if isinstance(data, bytes):
        return thumbnail_data_uri(io.BytesIO(data), formats=formats)
    if isinstance(data, FileNotFoundError):
        return Thumbnail(None, "file not found")
    return Thumbnail(None, objects.describe_error(data)[:120])


def thumbnails(report: Report, out_root: AnyPath) -> dict[str, Thumbnail]:
    """Thumbnails of the report's lowest-confidence images, by image_path, read from the run's
    input root (object stores: one batch of GETs, retries and timeouts as scoring has them).

    Only paths below the input root are opened: an ``image_path`` (from the predictions, which
    are data) that is absolute or climbs out with ``..`` gets a reason instead of a thumbnail.

    Raises:
        UnsafePathError: the run's index names a file outside the input root.
    """
    root = report.input.root
    items = report.lowest_confidence
    if root is None or not items:
        return {}
    formats = recorded_formats(report.input.formats)  # read back from output.root: not trusted
    indexed = _fs_paths(out_root, report.run_id, {r.image_path for r in items})
    out: dict[str, Thumbnail] = {}
    wanted: list[tuple[str, str]] = []  # (image_path, its file relative to the input root)
    for r in items:
        rel = indexed.get(r.image_path)  # checked by _fs_paths
        if rel is None and not _below(r.image_path):
            out[r.image_path] = Thumbnail(None, LEFT_THE_ROOT)
        else:
            wanted.append((r.image_path, os.fsdecode(rel) if rel is not None else r.image_path))
    read = objects.read_files([storage.join(root, rel) for _, rel in wanted])
    for (image_path, _), data in zip(wanted, read, strict=True):
        out[image_path] = _from_read(data, formats)
    return out
