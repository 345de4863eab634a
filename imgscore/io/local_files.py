"""Files under a local root, the POSIX way: what :mod:`imgscore.io.storage` does when a root is a folder.

- A file is replaced whole or not at all: its bytes go to a new ``.NAME.PID.tmp`` beside it
  (:func:`temp_path`), fsynced, then renamed over it; readers (which skip ``.`` names) never see
  half a file, and a killed writer leaves only the temp name (:func:`remove_temp_files`).
- A temp file is always created new (:func:`open_new`: ``O_CREAT | O_EXCL | O_NOFOLLOW`` after
  unlinking whatever has its name), so a symlink planted at its name is removed, never written
  through (docs/security.md).
- An exclusive create (:func:`create_exclusive`) writes a temp file and hard-links it to the
  name: ``link`` fails when the name exists, and the file appears whole.
- Small records (a lock file) are read without following a symlink at their name (:func:`read_small`).

Everything here takes a local path (``str`` or ``os.PathLike``); nothing imports imgscore.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

StrPath = str | os.PathLike[str]


def temp_path(path: StrPath) -> Path:
    """``.NAME.PID.tmp`` beside ``path``: where this process writes it before renaming it."""
    p = Path(path)
    return p.parent / f".{p.name}.{os.getpid()}.tmp"


def open_new(path: StrPath, mode: int = 0o666) -> int:
    """Open ``path`` for writing as a new regular file and return its descriptor.

    A leftover at that name (a killed writer's temp file, or a symlink planted there) is
    unlinked first — the link, never its target — and the file is created with ``O_CREAT |
    O_EXCL | O_NOFOLLOW``, so nothing that appears at the name in between is followed. ``mode``
    is filtered by the umask, as ``open()`` does.

    Raises:
        FileExistsError: something was created at the name between the unlink and the open.
    """
    text = os.fspath(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(text)
    return os.open(text, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)


def read_small(path: StrPath, limit: int = 1 << 20) -> bytes:
    """The first ``limit`` bytes of the regular file at ``path``, opened without following a
    symlink at its name (a small record such as a lock file).

    Raises:
        OSError: missing (FileNotFoundError), a symlink (ELOOP) or not a regular file.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{os.fspath(path)} is not a regular file")
        return f.read(limit)


def write_whole(path: StrPath, data: bytes) -> None:
    """Replace the file at ``path`` with ``data``: a new temp file beside it (:func:`open_new`),
    fsynced and renamed over it; the parent folders are created. On an error the temp file is
    removed and the error raised (``OSError``: disk full, quota, read-only)."""
    p = Path(path)
    tmp = temp_path(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(open_new(tmp), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_exclusive(path: StrPath, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if nothing is there yet; True when this call created
    it. The bytes go to a temp file (fsynced) that is hard-linked to the name (``link`` fails when
    the name exists), so the file appears whole and of two racing writers exactly one wins."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, p)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def append_in_place(path: StrPath, data: bytes) -> None:
    """Append ``data`` to the existing regular file at ``path`` (never through a symlink at its
    name: ``O_NOFOLLOW``) and fsync it. A few bytes appended often fit in the file's last block
    where a new file would need one more (a full disk).

    Raises:
        OSError: the file is missing, a symlink, or the write fails.
    """
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def delete_unless(path: StrPath, keep: Callable[[bytes], bool]) -> None:
    """Delete the file at ``path`` unless what it holds when it is taken away passes ``keep``.

    The file is renamed to a private name first, so ``keep`` judges the very file that was
    removed (not one a racing writer put there after it was read); when ``keep`` says so, it is
    linked back — unless a new file took the name meanwhile. Nothing at ``path``: nothing to do."""
    p = Path(path)
    victim = p.with_name(f"{p.name}.stale.{os.getpid()}")
    try:
        os.replace(p, victim)
    except FileNotFoundError:
        return
    try:
        data = read_small(victim)
    except OSError:
        data = b""
    if keep(data):
        with contextlib.suppress(FileExistsError):
            os.link(victim, p)
    victim.unlink(missing_ok=True)


def remove_temp_files(folder: StrPath, pattern: str = ".*.tmp") -> int:
    """Delete names matching ``pattern`` under ``folder`` (killed writers' temp files); return how
    many. A symlink matching it is removed itself (its target is untouched); symlinked folders
    are not descended into, and ``folder`` itself is skipped when it is a symlink."""
    top = Path(folder)
    if top.is_symlink() or not top.is_dir():
        return 0
    n = 0
    for p in top.rglob(pattern):  # Python's rglob does not follow symlinked folders
        try:
            if p.is_symlink() or p.is_file():
                p.unlink()
                n += 1
        except OSError:
            pass
    return n
