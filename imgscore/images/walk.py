"""The walk of a local folder: which folders are entered, in which order, and each file stat'ed.

The order is torchvision's: in each folder its files sorted by name, then its subfolders sorted
by name. Symlinked folders that point inside ``input.root`` are not followed (their images are
scanned at their own path), cycles are cut, unreadable folders are listed in ``skipped``
(:func:`list_folder`). An object-store prefix is listed instead (:mod:`imgscore.images.scan_objects`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Container, Iterator

from imgscore.images.entries import ImageEntry, note_skipped
from imgscore.images.extensions import is_hidden, skip_reason
from imgscore.io.storage import within

# One folder as the walk sees it: its files, its subfolders as (path, real path), its own real path.
Listing = tuple[list[str], list[tuple[str, str]], str]


def list_folder(
    top: str,
    follow_symlinks: bool,
    skipped: list[dict[str, str]],
    root: str,
    chain: Container[str],
    real: str | None = None,
    root_real: str | None = None,
    exclude: str | None = None,
) -> Listing | None:
    """One folder of the walk: (its files, its subfolders as ``(path, real path)``, its own real
    path), both sorted by name; None when the folder is not entered (a cycle, or unreadable:
    listed in ``skipped``). ``chain``: the real paths of the folders above it in the walk;
    ``real``/``root_real``: the real paths of ``top`` and ``root`` when the caller knows them.
    ``exclude``: the real path of a folder never entered nor listed (``output.root`` inside
    ``input.root``: :func:`imgscore.images.scan.output_within_input`).

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
        note_skipped(skipped, os.path.relpath(top, root), "symlink cycle: folder is its own ancestor")
        return None
    root_real = root_real or os.path.realpath(root)
    try:
        with os.scandir(top) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        note_skipped(skipped, os.path.relpath(top, root), f"folder not readable: {exc.strerror}")
        return None
    files: list[str] = []
    dirs: list[tuple[str, str]] = []
    for e in items:
        if is_hidden(e.name):
            continue
        try:
            is_dir = e.is_dir(follow_symlinks=follow_symlinks)
        except OSError:
            is_dir = False
        if e.is_symlink() and not follow_symlinks:
            note_skipped(skipped, os.path.relpath(e.path, root), "symlink not followed (input.follow_symlinks=false)")
            continue
        if not is_dir:
            files.append(e.path)
            continue
        sub = _subfolder(e, real, root, root_real, exclude, skipped)
        if sub is not None:
            dirs.append(sub)
    return files, dirs, real


def _subfolder(
    e: os.DirEntry[str], real: str, root: str, root_real: str, exclude: str | None, skipped: list[dict[str, str]]
) -> tuple[str, str] | None:
    """The subfolder ``e`` of the folder whose real path is ``real``, as ``(path, real path)``
    when the walk enters it; None for ``exclude``, and for a symlink to a folder inside
    ``input.root`` (listed in ``skipped``). See :func:`list_folder`."""
    target = os.path.join(real, e.name) if not e.is_symlink() else os.path.realpath(e.path)
    if target == exclude:
        return None
    if not e.is_symlink():
        return e.path, target
    if within(target, root_real):
        note_skipped(
            skipped,
            os.path.relpath(e.path, root),
            "symlink to a folder inside input.root: its images are scanned at their own path",
        )
        return None
    return e.path, target


def walk_files(
    top: str,
    follow_symlinks: bool,
    skipped: list[dict[str, str]],
    root: str,
    chain: frozenset[str] = frozenset(),
    exclude: str | None = None,
) -> Iterator[str]:
    """Yield file paths under ``top`` in torchvision's order: this folder's files, then its
    subfolders, each sorted by name (:func:`list_folder` says which folders are entered).
    ``chain``: the real paths of the folders above ``top`` (a unit of a flat tree: the root's);
    ``exclude``: the real path of a folder left out (:func:`list_folder`).

    Depth-first with a stack of the folders still to enter, not recursion: a tree thousands of
    folders deep (still under PATH_MAX) is walked like a shallow one instead of overflowing
    Python's stack. Memory is one listing per level, and one set of the real paths above."""
    root_real = os.path.realpath(root)
    listed = list_folder(top, follow_symlinks, skipped, root, chain, root_real=root_real, exclude=exclude)
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
        listed = list_folder(
            d[0], follow_symlinks, skipped, root, above, real=d[1], root_real=root_real, exclude=exclude
        )
        if listed is None:
            continue
        files, dirs, real = listed
        yield from files
        above.add(real)
        pending.append((iter(dirs), real))


_FILE_KINDS = {
    stat.S_IFIFO: "named pipe",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def classify(
    path: str,
    root: str,
    label: int | None,
    label_name: str | None,
    skipped: list[dict[str, str]],
    formats: tuple[str, ...] | None = None,
) -> ImageEntry | None:
    """The index entry for ``path`` (:func:`stat_entry`), or None after recording in ``skipped`` why it
    is not an image to score (:func:`imgscore.images.extensions.skip_reason` with ``formats``)."""
    why = skip_reason(path, formats)
    if why is not None:
        note_skipped(skipped, os.path.relpath(path, root), why)
        return None
    return stat_entry(path, root, label, label_name)


def stat_entry(path: str, root: str, label: int | None, label_name: str | None) -> ImageEntry:
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
        return ImageEntry(
            rel, label, label_name, None, None, scan_error=f"not a regular file ({kind}); only regular files are read"
        )
    return ImageEntry(rel, label, label_name, st.st_size, st.st_mtime_ns)


def find_classes(root: str | os.PathLike[str]) -> list[str]:
    """Class names of an ImageFolder tree: its non-hidden subfolders, sorted (torchvision's rule
    minus hidden folders, which torchvision would wrongly turn into classes)."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if not is_hidden(e.name) and e.is_dir())


# Mount types whose every stat is a network round trip: the scan uses threads there (scan_threads).
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "fuse.glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "fuse.sshfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.rclone",
        "fuse.juicefs",
        "davfs",
        "fuse.davfs2",
    }
)


def filesystem_type(path: str | os.PathLike[str]) -> str | None:
    """The mount type (``ext4``, ``nfs4``, ``cifs``, …) of the local file system holding
    ``path``, or None when it cannot be told (psutil lists no mount for it)."""
    import psutil

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
