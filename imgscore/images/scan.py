"""Scan ``input.root`` into a sorted, deterministic image index.

ImageFolder layout (class subfolders) gives the same class-to-index mapping as
``torchvision.datasets.ImageFolder`` on the same tree and the same order for the files both list,
except that hidden folders (``.ipynb_checkpoints``) and junk (``.DS_Store``, AppleDouble
``._x.jpg``) are never classes or images. Flat layout recurses and leaves labels null.

Every regular file under the root ends in exactly one place: the index (an image to score), or
``skipped`` with a reason; only hidden names and ``__MACOSX`` are left out on purpose. Which
files are images comes from Pillow's own registry (:mod:`imgscore.images.extensions`), not a
hand list, so a JPEG named ``.jfif`` or a JPEG 2000 ``.jp2`` is scored whenever this Pillow can
decode it.

Planning streams the scan (:func:`open_scan`, :meth:`~imgscore.images.scan_stream.Scan.batches`):
record batches of the index schema (:mod:`imgscore.images.entries`) go to the index writer folder
by folder, so memory does not grow with the number of images. A local folder is walked
(:mod:`imgscore.images.walk`); an object-store prefix is listed (:mod:`imgscore.images.scan_objects`).
On network file systems (NFS, SMB, …) and object stores, class folders are scanned by several
threads (``input.scan_threads``); the order, and so every shard, stays the same.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from imgscore.errors import ConfigError, InputError
from imgscore.images.entries import (
    ImageEntry,
    ImageIndex,
    display_path,
    entries_from_table,
    note_skipped,
)
from imgscore.images.extensions import is_hidden, no_images_message, skip_reason
from imgscore.images.scan_objects import object_entry, open_object_scan
from imgscore.images.scan_stream import Scan, ScanUnit
from imgscore.images.walk import (
    NETWORK_FILESYSTEMS,
    filesystem_type,
    find_classes,
    list_folder,
    stat_entry,
    walk_files,
)
from imgscore.io import storage
from imgscore.io.storage import AnyPath

NETWORK_SCAN_THREADS = 8
Formats = tuple[str, ...] | list[str] | None  # input.formats (None: the default)


def scan_threads_for(root: AnyPath, setting: int | str = "auto") -> int:
    """Threads :meth:`~imgscore.images.scan_stream.Scan.batches` uses: ``setting`` when it is a number, else (``auto``)
    :data:`NETWORK_SCAN_THREADS` on a network file system
    (:data:`imgscore.images.walk.NETWORK_FILESYSTEMS`) or an object store (prefixes listed at
    once), and 1 on local disks, where threads only contend for the GIL (docs/scaling.md, scan)."""
    if setting != "auto":
        return max(1, int(setting))
    local = storage.local_path(root)
    if local is None or filesystem_type(local) in NETWORK_FILESYSTEMS:
        return NETWORK_SCAN_THREADS
    return 1


def output_within_input(input_root: AnyPath, output_root: AnyPath) -> str | None:
    """Where ``output_root`` sits inside ``input_root``: its path relative to it (``/``
    separators; ``""`` when the two are the same place), or None when it is outside.

    Local roots are compared with symlinks resolved; object-store roots as normalized URLs
    (:func:`imgscore.io.storage.relative_within`); a local root and a URL never nest.
    """
    return storage.relative_within(input_root, output_root)


def check_roots_apart(input_root: AnyPath, output_root: AnyPath) -> str | None:
    """``output.root`` inside ``input.root``: its path relative to the input root (the scan leaves
    it out, :func:`open_scan`'s ``exclude``); None when it is outside.

    Raises:
        ConfigError: the two roots are the same place: the run's ``predictions/``, ``errors/`` and
            ``runs/`` would sit among the input's class folders.
    """
    rel = output_within_input(input_root, output_root)
    if rel == "":
        raise ConfigError(
            f"output.root {str(output_root)!r} is input.root: the run's predictions/, errors/ and runs/ folders would "
            "sit among the images and become classes; set output.root to a folder outside input.root (or a subfolder "
            "of it, which the scan leaves out)"
        )
    return rel


def check_folder(root: Path) -> None:
    """Refuse a local ``input.root`` that is missing or not a folder.

    Raises:
        InputError: naming the root and the fix.
    """
    if not root.exists():
        raise InputError(
            f"input.root {str(root)!r} does not exist; set input.root to a folder of images (--set input.root=/path)"
        )
    if not root.is_dir():
        raise InputError(
            f"input.root {str(root)!r} is not a folder; point input.root at the folder that holds the images"
        )


def open_scan(
    root: AnyPath,
    layout: str = "auto",
    follow_symlinks: bool = True,
    formats: Formats = None,
    exclude: AnyPath | None = None,
) -> Scan:
    """Check ``root`` and decide the layout and classes; the walk happens in
    :meth:`~imgscore.images.scan_stream.Scan.batches`.

    Args:
        root: the folder to score.
        layout: ``imagefolder`` (class subfolders → ``label``/``label_name``), ``flat``
            (recursive, labels None) or ``auto`` (imagefolder when there are class subfolders
            and no images directly in ``root``).
        follow_symlinks: follow symlinked files and folders; cycles are cut.
        formats: ``input.formats`` (None: the default); files whose extension names another
            format are listed in ``skipped`` (:func:`imgscore.images.extensions.skip_reason`).
        exclude: ``output.root``: when it is inside ``root`` (:func:`output_within_input`), that
            folder is not scanned — not a class, no images, nothing of it in ``skipped`` — so
            a run's own part files and manifests never enter the next night's scan.

    An object-store URL (``s3://``, ``gs://``, ``az://``) is listed instead of walked
    (:func:`imgscore.images.scan_objects.open_object_scan`; ``follow_symlinks`` does not apply).

    Raises:
        InputError: root missing or not a folder (an empty or unlistable prefix).
    """
    root_p = storage.local_path(root)
    if root_p is None:
        rel = output_within_input(root, exclude) if exclude is not None else None
        return open_object_scan(str(root), layout, formats, exclude=rel or None)
    check_folder(root_p)
    root_s = str(root_p)
    chosen = tuple(formats) if formats is not None else None
    left_out = storage.resolve(exclude) if exclude is not None and output_within_input(root_s, exclude) else None
    classes = [
        c for c in find_classes(root_s) if left_out is None or os.path.realpath(os.path.join(root_s, c)) != left_out
    ]
    with os.scandir(root_s) as it:
        top_files = sorted(e.name for e in it if not is_hidden(e.name) and not e.is_dir())
    if layout == "auto":
        layout = "imagefolder" if classes and all(skip_reason(n, chosen) is not None for n in top_files) else "flat"
    scan = Scan(
        root=root_p, layout=layout, classes=[], follow_symlinks=follow_symlinks, formats=chosen, exclude=left_out
    )
    if layout == "imagefolder":
        scan.classes = [display_path(c) for c in classes]  # a Latin-1 folder name is a class too, named in valid UTF-8
        scan.units = [ScanUnit(os.path.join(root_s, c), i, scan.classes[i]) for i, c in enumerate(classes)]
        for n in top_files:  # files directly in root have no class: say so
            why = skip_reason(n, chosen) or "image outside any class folder (layout=imagefolder)"
            note_skipped(scan.tail_skipped, n, why)
    else:
        listed = list_folder(root_s, follow_symlinks, scan.skipped, root_s, frozenset(), exclude=left_out)
        if listed is not None:
            files, dirs, real = listed
            scan.units = [ScanUnit(None, None, None, files=files)]
            scan.units += [ScanUnit(d, None, None, chain=frozenset({real})) for d, _ in dirs]
    return scan


def first_entries(
    root: AnyPath, n: int, layout: str = "auto", follow_symlinks: bool = True, formats: Formats = None
) -> list[ImageEntry]:
    """The first ``n`` images of ``root`` in index order (what a run's first shard starts with),
    walking only as far as needed. Raises as :func:`open_scan`."""
    out: list[ImageEntry] = []
    for batch in open_scan(root, layout, follow_symlinks, formats).batches(1):
        out.extend(entries_from_table(pa.Table.from_batches([batch])))
        if len(out) >= n:
            break
    return out[:n]


def scan_images(
    root: AnyPath, layout: str = "auto", follow_symlinks: bool = True, threads: int = 1, formats: Formats = None
) -> ImageIndex:
    """List every image under ``root`` in a deterministic order, in memory (:func:`open_scan`
    and :meth:`~imgscore.images.scan_stream.Scan.batches` stream the same list; planning a run uses those).

    Returns:
        An :class:`~imgscore.images.entries.ImageIndex`. Class names and ``image_path`` are valid
        UTF-8 (undecodable bytes of old Latin-1 names become ``\\xNN``). Empty class folders stay
        classes (with zero images). Every other file is listed in ``skipped`` with a reason
        (:func:`imgscore.images.extensions.skip_reason`: a format this Pillow cannot decode, or
        ``NOT_AN_IMAGE``; a special file; a symlink not followed; an image outside any class
        folder); only hidden files and folders (AppleDouble ``._x`` files included) and
        ``__MACOSX`` appear nowhere.

    Raises:
        InputError: root missing or not a folder, or no image files under it.
    """
    scan = open_scan(root, layout, follow_symlinks, formats)
    entries = [e for b in scan.batches(threads) for e in entries_from_table(pa.Table.from_batches([b]))]
    if not entries:
        raise InputError(no_images_message(scan.root, formats))
    return ImageIndex(root=scan.root, layout=scan.layout, classes=scan.classes, entries=entries, skipped=scan.skipped)


def has_images(root: AnyPath, follow_symlinks: bool = True, formats: Formats = None) -> bool:
    """True as soon as one scorable file is found under ``root`` (a cheap check before a run
    starts; the full scan happens in the flow). A local folder is walked until one turns up; an
    object-store root lists its prefixes in index order until one holds an image.

    Raises:
        InputError: a local root that is missing or not a folder; an object-store root that is
            empty or cannot be listed.
    """
    local = storage.local_path(root)
    if local is None:
        return bool(first_entries(root, 1, formats=formats))
    check_folder(local)
    for path in walk_files(str(local), follow_symlinks, [], str(local)):
        if skip_reason(path, formats) is None:
            return True
    return False


def stat_entries(
    root: AnyPath, rels: Sequence[str], labels: Sequence[int | None], label_names: Sequence[str | None]
) -> list[ImageEntry]:
    """Index entries for the files ``rels`` (relative to ``root``) as they are now, as the scan
    makes them: a file stat'ed (:func:`imgscore.images.walk.stat_entry`), an object HEADed
    (:func:`imgscore.images.scan_objects.object_entry`); one that is gone gets a ``scan_error``."""
    local = storage.local_path(root)
    if local is None:
        return [object_entry(str(root), rel, labels[i], label_names[i]) for i, rel in enumerate(rels)]
    base = str(local)
    return [stat_entry(os.path.join(base, rel), base, labels[i], label_names[i]) for i, rel in enumerate(rels)]
