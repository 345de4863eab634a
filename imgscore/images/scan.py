"""Scan ``input.root`` into a sorted, deterministic image index.

ImageFolder layout (class subfolders) gives the same class-to-index mapping as
``torchvision.datasets.ImageFolder`` on the same tree and the same order for the files both list,
except that hidden folders (``.ipynb_checkpoints``) and junk (``.DS_Store``, AppleDouble
``._x.jpg``) are never classes or images. Flat layout recurses and leaves labels null.

Every regular file under the root ends in exactly one place: the index (an image to score), or
``skipped`` with a reason; only hidden names and ``__MACOSX`` are left out on purpose. Which
files are images comes from Pillow's own registry (:func:`pillow_extensions`), not a hand list,
so a JPEG named ``.jfif`` or a JPEG 2000 ``.jp2`` is scored whenever this Pillow can decode it.

Planning streams the scan (:func:`open_scan`, :meth:`Scan.batches`): record batches of the
index schema go to the index writer folder by folder, so memory does not grow with the number
of images. On network file systems (NFS, SMB, …) class folders are scanned by several threads
(``input.scan_threads``); the order, and so every shard, stays the same. Which files count as
images, and which are listed as skipped, is decided in :func:`skip_reason` / :func:`_classify`
alone.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import os
import queue
import stat
import threading
from collections.abc import Container, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageFile, features

from imgscore.errors import ConfigError, InputError
from imgscore.images.formats import DEFAULT_FORMATS, NEVER, refused_message
from imgscore.io import storage
from imgscore.io.containment import within

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
        return f"Pillow only identifies {fmt} files; decoding them needs a handler registered with {cls.__module__}.register_handler"
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

INDEX_SCHEMA = pa.schema(
    [
        pa.field("image_path", pa.string(), nullable=False),  # display path, valid UTF-8
        pa.field("fs_path", pa.binary(), nullable=False),  # os.fsencode(relative path): opens the file
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("size", pa.int64()),  # bytes
        pa.field("mtime_ns", pa.int64()),
        pa.field("scan_error", pa.string()),  # set when the entry could not be stat'ed
        # object stores: the store's identity of the bytes (ETag, ETag@VersionId, GCS generation); null for files
        pa.field("version", pa.string()),
        pa.field("models", pa.list_(pa.string())),  # names of the models still to score it (run.skip_scored, several models); null: every model
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
    """One image found by the scan. ``rel`` is the OS path relative to the root (for an object
    store, the key relative to the root URL); ``mtime_ns`` the file's mtime or the object's
    last-modified time; ``version`` the object's ETag/generation (None for files)."""

    rel: str
    label: int | None
    label_name: str | None
    size: int | None
    mtime_ns: int | None
    scan_error: str | None = None
    version: str | None = None
    models: tuple[str, ...] | None = None  # the models still to score it (run.skip_scored); None: every model of the run

    def wants(self, model_name: str) -> bool:
        """Whether the model named ``model_name`` scores this image in this run."""
        return self.models is None or model_name in self.models

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
        return pa.Table.from_batches([entries_batch(self.entries)], schema=INDEX_SCHEMA)


def entries_batch(entries: list[ImageEntry]) -> pa.RecordBatch:
    """``entries`` as one record batch of :data:`INDEX_SCHEMA` (column by column)."""
    posix = os.sep == "/"
    return pa.RecordBatch.from_arrays(
        [
            pa.array([e.rel if posix and e.rel.isascii() else e.image_path for e in entries], pa.string()),
            pa.array([os.fsencode(e.rel) for e in entries], pa.binary()),
            pa.array([e.label for e in entries], pa.int32()),
            pa.array([e.label_name for e in entries], pa.string()),
            pa.array([e.size for e in entries], pa.int64()),
            pa.array([e.mtime_ns for e in entries], pa.int64()),
            pa.array([e.scan_error for e in entries], pa.string()),
            pa.array([e.version for e in entries], pa.string()),
            pa.array([list(e.models) if e.models is not None else None for e in entries], pa.list_(pa.string())),
        ],
        schema=INDEX_SCHEMA,
    )


def entries_from_table(table: pa.Table) -> list[ImageEntry]:
    """Inverse of :meth:`ImageIndex.to_table` for a slice of the index (an index written before
    the ``version`` column reads with versions None)."""
    cols = table.to_pydict()
    versions = cols.get("version") or [None] * table.num_rows
    models = cols.get("models") or [None] * table.num_rows  # index files written before several models lack it
    return [
        ImageEntry(
            rel=os.fsdecode(cols["fs_path"][i]),
            label=cols["label"][i],
            label_name=cols["label_name"][i],
            size=cols["size"][i],
            mtime_ns=cols["mtime_ns"][i],
            scan_error=cols["scan_error"][i],
            version=versions[i],
            models=tuple(models[i]) if models[i] is not None else None,
        )
        for i in range(table.num_rows)
    ]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in JUNK_DIRS


def _list_folder(top: str, follow_symlinks: bool, skipped: list[dict[str, str]], root: str, chain: Container[str],
                 real: str | None = None, root_real: str | None = None, exclude: str | None = None):
    """One folder of the walk: (its files, its subfolders as ``(path, real path)``, its own real
    path), both sorted by name; None when the folder is not entered (a cycle, or unreadable:
    listed in ``skipped``). ``chain``: the real paths of the folders above it in the walk;
    ``real``/``root_real``: the real paths of ``top`` and ``root`` when the caller knows them.
    ``exclude``: the real path of a folder never entered nor listed (``output.root`` inside
    ``input.root``: :func:`output_within_input`).

    Symlinked folders that point inside ``input.root`` are not followed (their images are scanned
    at their own path, under their own class — following them would score them twice, under
    another class's label); symlinks to folders outside it are followed. A folder that is its own
    ancestor (a cycle) is not entered again. Both are listed in ``skipped`` with the reason.

    A subfolder that is no symlink has its parent's real path plus its name as its own: the
    real path is resolved (one ``lstat`` per level, each walking the whole path) only for
    symlinks and the walk's top, so a tree 1,000 folders deep is not 1,000² path resolutions.
    """
    real = real or os.path.realpath(top)
    if real in chain:
        skipped.append({"image_path": display_path(os.path.relpath(top, root)), "reason": "symlink cycle: folder is its own ancestor"})
        return None
    root_real = root_real or os.path.realpath(root)
    try:
        with os.scandir(top) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        skipped.append({"image_path": display_path(os.path.relpath(top, root)), "reason": f"folder not readable: {exc.strerror}"})
        return None
    files, dirs = [], []
    for e in items:
        if _is_hidden(e.name):
            continue
        try:
            is_dir = e.is_dir(follow_symlinks=follow_symlinks)
        except OSError:
            is_dir = False
        if e.is_symlink() and not follow_symlinks:
            skipped.append({"image_path": display_path(os.path.relpath(e.path, root)), "reason": "symlink not followed (input.follow_symlinks=false)"})
            continue
        if not is_dir:
            files.append(e.path)
            continue
        target = os.path.join(real, e.name) if not e.is_symlink() else os.path.realpath(e.path)
        if target == exclude:
            continue
        if not e.is_symlink():
            dirs.append((e.path, target))
        elif within(target, root_real):
            skipped.append(
                {
                    "image_path": display_path(os.path.relpath(e.path, root)),
                    "reason": "symlink to a folder inside input.root: its images are scanned at their own path",
                }
            )
        else:
            dirs.append((e.path, target))
    return files, dirs, real


def _walk_files(top: str, follow_symlinks: bool, skipped: list[dict[str, str]], root: str, chain: frozenset[str] = frozenset(),
                exclude: str | None = None):
    """Yield file paths under ``top`` in torchvision's order: this folder's files, then its
    subfolders, each sorted by name (:func:`_list_folder` says which folders are entered).
    ``chain``: the real paths of the folders above ``top`` (a unit of a flat tree: the root's);
    ``exclude``: the real path of a folder left out (:func:`_list_folder`).

    Depth-first with a stack of the folders still to enter, not recursion: a tree thousands of
    folders deep (still under PATH_MAX) is walked like a shallow one instead of overflowing
    Python's stack. Memory is one listing per level, and one set of the real paths above."""
    root_real = os.path.realpath(root)
    listed = _list_folder(top, follow_symlinks, skipped, root, chain, root_real=root_real, exclude=exclude)
    if listed is None:
        return
    files, dirs, real = listed
    yield from files
    above = set(chain) | {real}  # the real paths of the folders on the stack: a cycle's way back
    pending: list[tuple[Iterator[tuple[str, str]], str]] = [(iter(dirs), real)]
    while pending:
        subfolders, owner = pending[-1]
        d = next(subfolders, None)
        if d is None:
            pending.pop()
            above.discard(owner)
            continue
        listed = _list_folder(d[0], follow_symlinks, skipped, root, above, real=d[1], root_real=root_real, exclude=exclude)
        if listed is None:
            continue
        files, dirs, real = listed
        yield from files
        above.add(real)
        pending.append((iter(dirs), real))


_FILE_KINDS = {stat.S_IFIFO: "named pipe", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}


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


def _skip(skipped: list[dict[str, str]], rel: str, reason: str) -> None:
    skipped.append({"image_path": display_path(rel), "reason": reason})


def _classify(path: str, root: str, label: int | None, label_name: str | None, skipped: list[dict[str, str]],
              formats: tuple[str, ...] | None = None) -> ImageEntry | None:
    """The index entry for ``path`` (:func:`_entry`), or None after recording in ``skipped`` why it
    is not an image to score (:func:`skip_reason` with ``formats``)."""
    why = skip_reason(path, formats)
    if why is not None:
        _skip(skipped, os.path.relpath(path, root), why)
        return None
    return _entry(path, root, label, label_name)


def _entry(path: str, root: str, label: int | None, label_name: str | None) -> ImageEntry:
    """Stat an image file into an index entry. One that cannot be stat'ed (a broken symlink) or is
    no regular file (a named pipe, which would block the shard that reads it) gets ``scan_error``
    set and becomes an errors row at stage ``scan``."""
    rel = os.path.relpath(path, root)
    try:
        st = os.stat(path)  # follows symlinks: a broken one fails here
    except OSError as exc:
        reason = "broken symlink" if os.path.islink(path) else "cannot stat file"
        return ImageEntry(rel, label, label_name, None, None, scan_error=f"{reason}: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "special file")
        return ImageEntry(rel, label, label_name, None, None, scan_error=f"not a regular file ({kind}); only regular files are read")
    return ImageEntry(rel, label, label_name, st.st_size, st.st_mtime_ns)


def no_images_message(root: str | Path, formats: tuple[str, ...] | list[str] | None = None) -> str:
    """The refusal for a root without a single file to score (scan and CLI preflight say the same);
    ``formats``: ``input.formats`` (None: the default), whose extensions the message lists."""
    scorable = [e for e in sorted(SCORABLE_EXTENSIONS) if skip_reason("f" + e, formats) is None]
    common = [e for e in (".jpg", ".jpeg", ".jfif", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".jp2") if e in scorable]
    narrowed = "" if formats is None or set(formats) == set(DEFAULT_FORMATS) else f", or that input.formats ({', '.join(formats)}) lists their format"
    shown = common or scorable[:10]  # formats without a common extension (FITS alone): its own
    more = f" and {len(scorable) - len(shown)} more extensions" if len(scorable) > len(shown) else ""
    return (
        f"input.root {str(root)!r} holds no image files that this Pillow reads ({', '.join(shown)}{more}); "
        f"check the path, or that the images are not in hidden folders{narrowed}"
    )


def find_classes(root: str | Path) -> list[str]:
    """Class names of an ImageFolder tree: its non-hidden subfolders, sorted (torchvision's rule
    minus hidden folders, which torchvision would wrongly turn into classes)."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if not _is_hidden(e.name) and e.is_dir())


# Mount types whose every stat is a network round trip: the scan uses threads there (scan_threads).
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "fuse.glusterfs", "lustre", "gpfs",
     "beegfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs", "davfs", "fuse.davfs2"}
)
NETWORK_SCAN_THREADS = 8
SCAN_BATCH_ROWS = 4096  # rows per RecordBatch the scan yields (its memory is a few of these)


def filesystem_type(path: str | Path) -> str | None:
    """The mount type (``ext4``, ``nfs4``, ``cifs``, …) of the file system holding ``path``, or
    None when it cannot be told (psutil lists no mount for it); an object-store URL's scheme
    (``s3``, ``gs``, ``az``)."""
    import psutil

    if storage.is_remote(path):
        return storage.scheme_of(path)

    real = os.path.realpath(path)
    best, fstype = "", None
    try:
        parts = psutil.disk_partitions(all=True)
    except (OSError, RuntimeError):
        return None
    for p in parts:
        mp = p.mountpoint
        if (real == mp or real.startswith(mp.rstrip(os.sep) + os.sep)) and len(mp) > len(best):
            best, fstype = mp, p.fstype
    return fstype


def scan_threads_for(root: str | Path, setting: int | str = "auto") -> int:
    """Threads :meth:`Scan.batches` uses: ``setting`` when it is a number, else (``auto``)
    :data:`NETWORK_SCAN_THREADS` on a network file system (:data:`NETWORK_FILESYSTEMS`) or an
    object store (prefixes listed at once), and 1 on local disks, where threads only contend for
    the GIL (docs/scaling.md, scan)."""
    if setting != "auto":
        return max(1, int(setting))
    if storage.is_remote(root):
        return NETWORK_SCAN_THREADS
    return NETWORK_SCAN_THREADS if filesystem_type(root) in NETWORK_FILESYSTEMS else 1


@dataclass
class _Unit:
    """A slice of the walk that one thread scans: a class folder, a top-level subfolder of a flat
    tree, or the files directly in the root (``files``). Units in order give the index order."""

    top: str | None
    label: int | None
    label_name: str | None
    files: list[str] | None = None
    chain: frozenset[str] = frozenset()


def batched(entries: Iterator[ImageEntry], skipped: list[dict[str, str]]) -> Iterator:
    """A unit's ``entries`` as record batches of at most :data:`SCAN_BATCH_ROWS` rows, then
    ``("skipped", skipped)`` — filled while ``entries`` was consumed."""
    chunk: list[ImageEntry] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) >= SCAN_BATCH_ROWS:
            yield entries_batch(chunk)
            chunk = []
    if chunk:
        yield entries_batch(chunk)
    yield ("skipped", skipped)


@dataclass
class Scan:
    """A scan of ``input.root`` that yields its image list in order, without holding it.

    :func:`open_scan` decides the layout and the classes; :meth:`batches` walks the tree and
    yields :data:`INDEX_SCHEMA` record batches. The order is fixed by the tree alone: classes (or
    the root's files, then its subfolders) sorted by name, and inside each, torchvision's order
    (a folder's files sorted by name, then its subfolders). Threads scan several units at once
    but their batches are yielded unit by unit in that order, so the index — and every shard cut
    from it — is the same with 1 thread or 16. ``skipped`` fills as the walk goes; ``images`` is
    the count yielded so far.
    """

    root: Path | str  # a folder, or an object-store URL (imgscore.images.scan_objects.ObjectScan)
    layout: str
    classes: list[str]  # display names (valid UTF-8)
    follow_symlinks: bool = True
    formats: tuple[str, ...] | None = None  # input.formats (None: the default): which extensions are images
    skipped: list[dict[str, str]] = field(default_factory=list)
    images: int = 0
    # output.root inside input.root: a local folder's real path, or (object store) its key prefix
    # relative to the root; never scanned (:func:`output_within_input`)
    exclude: str | None = None
    _units: list[_Unit] = field(default_factory=list, repr=False)
    _tail_skipped: list[dict[str, str]] = field(default_factory=list, repr=False)

    def _scan_unit(self, unit: _Unit):
        """Yield the unit's record batches, then ``("skipped", list)``."""
        root = str(self.root)
        skipped: list[dict[str, str]] = []
        walk = unit.files if unit.files is not None else _walk_files(unit.top, self.follow_symlinks, skipped, root, unit.chain, self.exclude)
        entries = (_classify(path, root, unit.label, unit.label_name, skipped, self.formats) for path in walk)
        yield from batched((e for e in entries if e is not None), skipped)

    def batches(self, threads: int = 1) -> Iterator[pa.RecordBatch]:
        """Yield the image list as record batches of at most :data:`SCAN_BATCH_ROWS` rows, in
        index order, scanning up to ``threads`` units at once.

        Memory: each unit in flight buffers at most 4 batches; a folder's names are held while
        it is listed (sorting needs them all)."""
        for item in ordered_map(self._scan_unit, self._units, threads):
            if isinstance(item, tuple):
                self.skipped.extend(item[1])
            else:
                self.images += item.num_rows
                yield item
        self.skipped.extend(self._tail_skipped)
        self._tail_skipped = []


def output_within_input(input_root: str | Path, output_root: str | Path) -> str | None:
    """Where ``output_root`` sits inside ``input_root``: its path relative to it (``/``
    separators; ``""`` when the two are the same place), or None when it is outside.

    Local roots are compared with symlinks resolved; object-store roots as normalized URLs
    (:func:`imgscore.io.storage.normalize_root`); a local root and a URL never nest.
    """
    if storage.is_remote(input_root) != storage.is_remote(output_root):
        return None
    if storage.is_remote(input_root):
        inner, outer = storage.normalize_root(output_root), storage.normalize_root(input_root)
        if inner == outer:
            return ""
        return inner[len(outer) + 1:] if inner.startswith(outer + "/") else None
    inner, outer = os.path.realpath(output_root), os.path.realpath(input_root)
    if not within(inner, outer):
        return None
    return "" if inner == outer else os.path.relpath(inner, outer).replace(os.sep, "/")


def check_roots_apart(input_root: str | Path, output_root: str | Path) -> str | None:
    """``output.root`` inside ``input.root``: its path relative to the input root (the scan leaves
    it out, :func:`open_scan`'s ``exclude``); None when it is outside.

    Raises:
        ConfigError: the two roots are the same place: the run's ``predictions/``, ``errors/`` and
            ``runs/`` would sit among the input's class folders.
    """
    rel = output_within_input(input_root, output_root)
    if rel == "":
        raise ConfigError(
            f"output.root {str(output_root)!r} is input.root: the run's predictions/, errors/ and runs/ folders would sit among "
            "the images and become classes; set output.root to a folder outside input.root (or a subfolder of it, which the scan leaves out)"
        )
    return rel


def open_scan(root: str | Path, layout: str = "auto", follow_symlinks: bool = True,
              formats: tuple[str, ...] | list[str] | None = None, exclude: str | Path | None = None) -> Scan:
    """Check ``root`` and decide the layout and classes; the walk happens in :meth:`Scan.batches`.

    Args:
        root: the folder to score.
        layout: ``imagefolder`` (class subfolders → ``label``/``label_name``), ``flat``
            (recursive, labels None) or ``auto`` (imagefolder when there are class subfolders
            and no images directly in ``root``).
        follow_symlinks: follow symlinked files and folders; cycles are cut.
        formats: ``input.formats`` (None: the default); files whose extension names another
            format are listed in ``skipped`` (:func:`skip_reason`).
        exclude: ``output.root``: when it is inside ``root`` (:func:`output_within_input`), that
            folder is not scanned — not a class, no images, nothing of it in ``skipped`` — so
            a run's own part files and manifests never enter the next night's scan.

    An object-store URL (``s3://``, ``gs://``, ``az://``) is listed instead of walked
    (:func:`imgscore.images.scan_objects.open_object_scan`; ``follow_symlinks`` does not apply).

    Raises:
        InputError: root missing or not a folder (an empty or unlistable prefix).
    """
    if storage.is_remote(root):
        from imgscore.images.scan_objects import open_object_scan

        rel = output_within_input(root, exclude) if exclude is not None else None
        return open_object_scan(str(root), layout, formats, exclude=rel or None)
    root_p = Path(root)
    if not root_p.exists():
        raise InputError(f"input.root {str(root_p)!r} does not exist; set input.root to a folder of images (--set input.root=/path)")
    if not root_p.is_dir():
        raise InputError(f"input.root {str(root_p)!r} is not a folder; point input.root at the folder that holds the images")
    root_s = str(root_p)
    formats = tuple(formats) if formats is not None else None
    left_out = os.path.realpath(exclude) if exclude is not None and output_within_input(root_s, exclude) else None
    classes = [c for c in find_classes(root_s) if left_out is None or os.path.realpath(os.path.join(root_s, c)) != left_out]
    with os.scandir(root_s) as it:
        top_files = sorted(e.name for e in it if not _is_hidden(e.name) and not e.is_dir())
    if layout == "auto":
        layout = "imagefolder" if classes and all(skip_reason(n, formats) is not None for n in top_files) else "flat"
    scan = Scan(root=root_p, layout=layout, classes=[], follow_symlinks=follow_symlinks, formats=formats, exclude=left_out)
    if layout == "imagefolder":
        scan.classes = [display_path(c) for c in classes]  # a Latin-1 folder name is a class too, named in valid UTF-8
        scan._units = [_Unit(os.path.join(root_s, c), i, scan.classes[i]) for i, c in enumerate(classes)]
        tail: list[dict[str, str]] = []
        for n in top_files:  # files directly in root have no class: say so
            _skip(tail, n, skip_reason(n, formats) or "image outside any class folder (layout=imagefolder)")
        scan._tail_skipped = tail
    else:
        listed = _list_folder(root_s, follow_symlinks, scan.skipped, root_s, frozenset(), exclude=left_out)
        if listed is not None:
            files, dirs, real = listed
            scan._units = [_Unit(None, None, None, files=files)] + [_Unit(d, None, None, chain=frozenset({real})) for d, _ in dirs]
    return scan


def first_entries(root: str | Path, n: int, layout: str = "auto", follow_symlinks: bool = True,
                  formats: tuple[str, ...] | list[str] | None = None) -> list[ImageEntry]:
    """The first ``n`` images of ``root`` in index order (what a run's first shard starts with),
    walking only as far as needed. Raises as :func:`open_scan`."""
    out: list[ImageEntry] = []
    for batch in open_scan(root, layout, follow_symlinks, formats).batches(1):
        out.extend(entries_from_table(pa.Table.from_batches([batch])))
        if len(out) >= n:
            break
    return out[:n]


def scan_images(root: str | Path, layout: str = "auto", follow_symlinks: bool = True, threads: int = 1,
                formats: tuple[str, ...] | list[str] | None = None) -> ImageIndex:
    """List every image under ``root`` in a deterministic order, in memory (:func:`open_scan`
    and :meth:`Scan.batches` stream the same list; planning a run uses those).

    Returns:
        An :class:`ImageIndex`. Class names and ``image_path`` are valid UTF-8 (undecodable bytes
        of old Latin-1 names become ``\\xNN``). Empty class folders stay classes (with zero images).
        Every other file is listed in ``skipped`` with a reason (:func:`skip_reason`: a format this
        Pillow cannot decode, or ``NOT_AN_IMAGE``; a special file; a symlink not followed; an
        image outside any class folder); only hidden files and folders (AppleDouble ``._x`` files
        included) and ``__MACOSX`` appear nowhere.

    Raises:
        InputError: root missing or not a folder, or no image files under it.
    """
    scan = open_scan(root, layout, follow_symlinks, formats)
    entries = [e for b in scan.batches(threads) for e in entries_from_table(pa.Table.from_batches([b]))]
    if not entries:
        raise InputError(no_images_message(scan.root, formats))
    return ImageIndex(root=scan.root, layout=scan.layout, classes=scan.classes, entries=entries, skipped=scan.skipped)


_DONE = object()


@dataclass
class _Failed:
    exc: BaseException


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def ordered_map(work, units: list, threads: int, depth: int = 4) -> Iterator:
    """``for u in units: yield from work(u)``, with up to ``threads`` units running at once on
    threads and their items yielded in unit order; each running unit buffers ``depth`` items.

    Units start in order on a FIFO pool, so the unit being yielded always has a thread (no
    deadlock); at most ``2 * threads`` units are started ahead. An exception in ``work`` is raised
    here when its unit's turn comes; leaving the loop early stops the threads.
    """
    if threads <= 1 or len(units) <= 1:
        for u in units:
            yield from work(u)
        return
    stop = threading.Event()

    def produce(u, q: queue.Queue) -> None:
        try:
            for item in work(u):
                if not _put(q, item, stop):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            _put(q, _Failed(exc), stop)
            return
        _put(q, _DONE, stop)

    pending: collections.deque[queue.Queue] = collections.deque()
    it = iter(units)
    with ThreadPoolExecutor(threads, thread_name_prefix="imgscore-scan") as pool:

        def start_next() -> None:
            u = next(it, _DONE)
            if u is not _DONE:
                q: queue.Queue = queue.Queue(depth)
                pool.submit(produce, u, q)
                pending.append(q)

        for _ in range(2 * threads):
            start_next()
        try:
            while pending:
                q = pending.popleft()
                while (item := q.get()) is not _DONE:
                    if isinstance(item, _Failed):
                        raise item.exc
                    yield item
                start_next()
        finally:
            stop.set()


def has_images(root: str | Path, follow_symlinks: bool = True, formats: tuple[str, ...] | list[str] | None = None) -> bool:
    """True as soon as one scorable file is found under ``root`` (a cheap check before a run
    starts; the full scan happens in the flow). An object-store root lists its prefixes in
    index order until one holds an image.

    Raises:
        InputError: an object-store root that is empty or cannot be listed.
    """
    if storage.is_remote(root):
        return bool(first_entries(root, 1, formats=formats))
    for path in _walk_files(str(root), follow_symlinks, [], str(root)):
        if skip_reason(path, formats) is None:
            return True
    return False


def sha256_of_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks (no caching); an object-store
    URL is read whole (one GET)."""
    if storage.is_remote(path):
        return hashlib.sha256(storage.read_bytes(path)).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
