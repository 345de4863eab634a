"""Scan ``input.root`` into a sorted, deterministic image index.

ImageFolder layout (class subfolders) gives the same class-to-index mapping and the same
image order as ``torchvision.datasets.ImageFolder`` on the same tree, except that hidden
folders (``.ipynb_checkpoints``) and junk (``.DS_Store``, AppleDouble ``._x.jpg``) are never
classes or images. Flat layout recurses and leaves labels null.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from PIL import features

from imgscore.tasks.errors import InputError

# torchvision.datasets.folder.IMG_EXTENSIONS plus GIF (first frame) and AVIF where Pillow decodes it.
SCORABLE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
    | ({".avif"} if features.check("avif") else set())
)
# Image formats we recognise but Pillow cannot decode here: listed as skipped, never dropped silently.
UNSUPPORTED_EXTENSIONS: dict[str, str] = {
    ".heic": "HEIC/HEIF needs the pillow-heif plugin, which is not installed",
    ".heif": "HEIC/HEIF needs the pillow-heif plugin, which is not installed",
    ".jxl": "JPEG XL is not decodable by this Pillow build",
    ".svg": "vector image; rasterize it first",
    ".cr2": "camera RAW; convert to JPEG/PNG/TIFF first",
    ".nef": "camera RAW; convert to JPEG/PNG/TIFF first",
    ".arw": "camera RAW; convert to JPEG/PNG/TIFF first",
    ".dng": "camera RAW; convert to JPEG/PNG/TIFF first",
    ".raf": "camera RAW; convert to JPEG/PNG/TIFF first",
    ".orf": "camera RAW; convert to JPEG/PNG/TIFF first",
}
if ".avif" not in SCORABLE_EXTENSIONS:
    UNSUPPORTED_EXTENSIONS[".avif"] = "AVIF is not decodable by this Pillow build"

JUNK_DIRS = frozenset({"__MACOSX"})

INDEX_SCHEMA = pa.schema(
    [
        pa.field("image_path", pa.string(), nullable=False),  # display path, valid UTF-8
        pa.field("fs_path", pa.binary(), nullable=False),  # os.fsencode(relative path): opens the file
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("size", pa.int64()),  # bytes
        pa.field("mtime_ns", pa.int64()),
        pa.field("scan_error", pa.string()),  # set when the entry could not be stat'ed
    ]
)


def display_path(rel: str) -> str:
    """Relative path → valid UTF-8 with ``/`` separators.

    Bytes that are not UTF-8 (Latin-1 names from old shares) become ``\\xNN`` escapes, so the
    string still identifies the file: ``b"caf\\xe9.jpg"`` → ``"caf\\\\xe9.jpg"``.
    """
    raw = os.fsencode(rel)
    if os.sep != "/":
        raw = raw.replace(os.sep.encode(), b"/")
    return raw.decode("utf-8", errors="backslashreplace")


@dataclass(frozen=True)
class ImageEntry:
    """One image file found by the scan. ``rel`` is the OS path relative to the root."""

    rel: str
    label: int | None
    label_name: str | None
    size: int | None
    mtime_ns: int | None
    scan_error: str | None = None

    @property
    def image_path(self) -> str:
        return display_path(self.rel)


@dataclass
class ImageIndex:
    """Result of :func:`scan_images`: sorted entries, classes and skipped files."""

    root: Path
    layout: str  # "imagefolder" or "flat"
    classes: list[str]
    entries: list[ImageEntry]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"image_path", "reason"}

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def to_table(self) -> pa.Table:
        """The index as a pyarrow Table with :data:`INDEX_SCHEMA` (what shards read back)."""
        return pa.Table.from_pylist(
            [
                {
                    "image_path": e.image_path,
                    "fs_path": os.fsencode(e.rel),
                    "label": e.label,
                    "label_name": e.label_name,
                    "size": e.size,
                    "mtime_ns": e.mtime_ns,
                    "scan_error": e.scan_error,
                }
                for e in self.entries
            ],
            schema=INDEX_SCHEMA,
        )


def entries_from_table(table: pa.Table) -> list[ImageEntry]:
    """Inverse of :meth:`ImageIndex.to_table` for a slice of the index."""
    cols = table.to_pydict()
    return [
        ImageEntry(
            rel=os.fsdecode(cols["fs_path"][i]),
            label=cols["label"][i],
            label_name=cols["label_name"][i],
            size=cols["size"][i],
            mtime_ns=cols["mtime_ns"][i],
            scan_error=cols["scan_error"][i],
        )
        for i in range(table.num_rows)
    ]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in JUNK_DIRS


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _walk_files(top: str, follow_symlinks: bool, skipped: list[dict[str, str]], root: str, chain: frozenset[str] = frozenset()):
    """Yield file paths under ``top`` in torchvision's order: this folder's files, then its
    subfolders, each sorted by name.

    Symlinked folders that point inside ``input.root`` are not followed (their images are scanned
    at their own path, under their own class — following them would score them twice, under
    another class's label); symlinks to folders outside it are followed. A folder that is its own
    ancestor (a cycle) is not entered again. Both are listed in ``skipped`` with the reason.
    """
    real = os.path.realpath(top)
    if real in chain:
        skipped.append({"image_path": display_path(os.path.relpath(top, root)), "reason": "symlink cycle: folder is its own ancestor"})
        return
    chain = chain | {real}
    root_real = os.path.realpath(root)
    try:
        with os.scandir(top) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        skipped.append({"image_path": display_path(os.path.relpath(top, root)), "reason": f"folder not readable: {exc.strerror}"})
        return
    files, dirs = [], []
    for e in items:
        if _is_hidden(e.name):
            continue
        try:
            is_dir = e.is_dir(follow_symlinks=follow_symlinks)
        except OSError:
            is_dir = False
        if e.is_symlink() and not follow_symlinks:
            continue
        if not is_dir:
            files.append(e.path)
        elif e.is_symlink() and _inside(os.path.realpath(e.path), root_real):
            skipped.append(
                {
                    "image_path": display_path(os.path.relpath(e.path, root)),
                    "reason": "symlink to a folder inside input.root: its images are scanned at their own path",
                }
            )
        else:
            dirs.append(e.path)
    yield from files
    for d in dirs:
        yield from _walk_files(d, follow_symlinks, skipped, root, chain)


def _classify(path: str, root: str, skipped: list[dict[str, str]]) -> bool:
    """True when ``path`` should be scored; records recognised-but-unsupported formats."""
    ext = os.path.splitext(path)[1].lower()
    if ext in SCORABLE_EXTENSIONS:
        return True
    if ext in UNSUPPORTED_EXTENSIONS:
        skipped.append({"image_path": display_path(os.path.relpath(path, root)), "reason": UNSUPPORTED_EXTENSIONS[ext]})
    return False


def _entry(path: str, root: str, label: int | None, label_name: str | None) -> ImageEntry:
    rel = os.path.relpath(path, root)
    try:
        st = os.stat(path)  # follows symlinks: a broken one fails here
        return ImageEntry(rel, label, label_name, st.st_size, st.st_mtime_ns)
    except OSError as exc:
        reason = "broken symlink" if os.path.islink(path) else "cannot stat file"
        return ImageEntry(rel, label, label_name, None, None, scan_error=f"{reason}: {exc.strerror}")


def find_classes(root: str | Path) -> list[str]:
    """Class names of an ImageFolder tree: its non-hidden subfolders, sorted (torchvision's rule
    minus hidden folders, which torchvision would wrongly turn into classes)."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if not _is_hidden(e.name) and e.is_dir())


def scan_images(root: str | Path, layout: str = "auto", follow_symlinks: bool = True) -> ImageIndex:
    """List every image under ``root`` in a deterministic order.

    Args:
        root: the folder to score.
        layout: ``imagefolder`` (class subfolders → ``label``/``label_name``), ``flat``
            (recursive, labels None) or ``auto`` (imagefolder when there are class subfolders
            and no images directly in ``root``).
        follow_symlinks: follow symlinked files and folders; cycles are cut.

    Returns:
        An :class:`ImageIndex`. Class names and ``image_path`` are valid UTF-8 (undecodable bytes
        of old Latin-1 names become ``\\xNN``). Empty class folders stay classes (with zero images); files with
        unsupported image formats are listed in ``skipped`` with a reason; hidden files and
        folders, AppleDouble files and non-image files appear nowhere.

    Raises:
        InputError: root missing or not a folder, or no image files under it.
    """
    root_p = Path(root)
    if not root_p.exists():
        raise InputError(f"input.root {str(root_p)!r} does not exist; set input.root to a folder of images (--set input.root=/path)")
    if not root_p.is_dir():
        raise InputError(f"input.root {str(root_p)!r} is not a folder; point input.root at the folder that holds the images")
    root_s = str(root_p)
    skipped: list[dict[str, str]] = []
    classes = find_classes(root_s)
    with os.scandir(root_s) as it:
        top_images = [e.path for e in it if not _is_hidden(e.name) and not e.is_dir() and os.path.splitext(e.name)[1].lower() in SCORABLE_EXTENSIONS]
    if layout == "auto":
        layout = "imagefolder" if classes and not top_images else "flat"

    entries: list[ImageEntry] = []
    if layout == "imagefolder":
        for idx, cls in enumerate(classes):
            cls_dir = os.path.join(root_s, cls)
            name = display_path(cls)  # a Latin-1 folder name is a class too, named in valid UTF-8
            for path in _walk_files(cls_dir, follow_symlinks, skipped, root_s):
                if _classify(path, root_s, skipped):
                    entries.append(_entry(path, root_s, idx, name))
        with os.scandir(root_s) as it:  # files directly in root have no class: say so
            for e in sorted(it, key=lambda e: e.name):
                if not _is_hidden(e.name) and not e.is_dir() and os.path.splitext(e.name)[1].lower() in SCORABLE_EXTENSIONS:
                    skipped.append({"image_path": display_path(e.name), "reason": "image outside any class folder (layout=imagefolder)"})
    else:
        classes = []
        for path in _walk_files(root_s, follow_symlinks, skipped, root_s):
            if _classify(path, root_s, skipped):
                entries.append(_entry(path, root_s, None, None))

    if not entries:
        raise InputError(
            f"input.root {root_s!r} holds no image files ({', '.join(sorted(SCORABLE_EXTENSIONS))}); "
            "check the path, or that the images are not in hidden folders"
        )
    return ImageIndex(root=root_p, layout=layout, classes=[display_path(c) for c in classes], entries=entries, skipped=skipped)


def has_images(root: str | Path, follow_symlinks: bool = True) -> bool:
    """True as soon as one scorable file is found under ``root`` (a cheap check before a run
    starts; the full scan happens in the flow)."""
    for path in _walk_files(str(root), follow_symlinks, [], str(root)):
        if os.path.splitext(path)[1].lower() in SCORABLE_EXTENSIONS:
            return True
    return False


def sha256_of_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks (no caching)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
