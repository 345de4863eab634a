"""File operations that run state needs beyond whole-file reads and writes, local and remote alike.

:mod:`imgscore.io.storage` reads and writes whole files; this module adds what the lock, the
ledger, the index and the part-file writers need: small records read without following links
(:func:`read_small`), files streamed into and put in place whole (:class:`AtomicWrite`), files
appended record by record (:class:`AppendLog`, :func:`append`), a stale file removed only while it
is still the one judged (:func:`delete_unless`), and the clean-up of killed writers' temp files
(:func:`remove_temp_files`). Each says what it does under a local root (POSIX:
:mod:`imgscore.io.local_files`) and under an object store, so callers never branch on the kind of root.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from upath import UPath

from imgscore.io import local_files
from imgscore.io.object_store import filesystem
from imgscore.io.storage import AnyPath, delete, join, local_path, path, read_bytes, write_bytes

if TYPE_CHECKING:
    from types import TracebackType


def read_small(url: AnyPath, limit: int = 1 << 20) -> bytes:
    """A small record (a lock file): locally the first ``limit`` bytes of a regular file, opened
    without following a symlink at its name (:func:`imgscore.io.local_files.read_small`); an
    object whole (a store has no links).

    Raises:
        OSError: missing (FileNotFoundError); locally also a symlink or not a regular file.
    """
    if (local := local_path(url)) is not None:
        return local_files.read_small(local, limit)
    return read_bytes(url)


def read_head(url: AnyPath, limit: int) -> bytes:
    """The first ``limit`` bytes of a file (all of it when it is shorter): a local read, or one
    ranged GET of an object.

    Raises:
        FileNotFoundError: nothing at ``url``. OSError: the read failed.
    """
    if (local := local_path(url)) is not None:
        with open(local, "rb") as f:
            return f.read(limit)
    fs, key = filesystem(url)
    return bytes(fs.cat_file(key, start=0, end=limit))


def read_chunks(url: AnyPath, size: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of a file in reads of ``size`` bytes (no caching); an object in one GET.

    Raises:
        FileNotFoundError: nothing at ``url``. OSError: the read failed.
    """
    if (local := local_path(url)) is None:
        yield read_bytes(url)
        return
    with open(local, "rb") as f:
        yield from iter(lambda: f.read(size), b"")


def append(url: AnyPath, data: bytes) -> bool:
    """Append ``data`` to the existing file at ``url`` in place (never through a symlink at its
    name) and fsync it; True when appended. False under an object-store root, which cannot append
    to an object (the caller writes an object of its own instead).

    Raises:
        OSError: a local file that is missing, a symlink, or cannot be written.
    """
    if (local := local_path(url)) is None:
        return False
    local_files.append_in_place(local, data)
    return True


def delete_unless(url: AnyPath, keep: Callable[[bytes], bool]) -> None:
    """Delete the file at ``url`` unless what it holds when it is taken away passes ``keep`` (a
    stale lock that another process re-took meanwhile stays). Locally the file is renamed away
    first, so ``keep`` judges the very bytes removed, and it is linked back when ``keep`` says so
    (:func:`imgscore.io.local_files.delete_unless`). An object store has no rename: the object is
    deleted and ``keep`` is not asked."""
    if (local := local_path(url)) is not None:
        local_files.delete_unless(local, keep)
        return
    delete(url)


def remove_empty_folder(url: AnyPath) -> None:
    """Remove a local folder when it is empty (anything else, or an error, leaves it); nothing
    for object stores (a prefix without objects does not exist)."""
    if (local := local_path(url)) is not None:
        with contextlib.suppress(OSError):
            local.rmdir()


def remove_temp_files(folder: AnyPath, pattern: str = ".*.tmp") -> int:
    """Delete leftover temp names (killed writers') under a local ``folder``; return how many.
    Symlinks are removed, not followed (:func:`imgscore.io.local_files.remove_temp_files`).
    An object store has none: its writes are single PUTs (0, nothing listed)."""
    if (local := local_path(folder)) is None:
        return 0
    return local_files.remove_temp_files(local, pattern)


def probe_write(root: AnyPath, name: str) -> None:
    """Write one empty file under ``root`` and delete it again: whether this machine can write
    there. Locally the folder is created first and the probe is ``NAME.tmp`` (a killed probe's
    leftover is then a temp file, which clean-up removes); on an object store one PUT and one
    DELETE of ``NAME``.

    Raises:
        OSError: the write or the delete failed (permissions, read-only, the store's answer).
        ValueError: a ``${VAR}`` storage option whose variable is unset.
    """
    local = local_path(root)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        probe = local / f"{name}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
        return
    url = join(root, name)
    write_bytes(url, b"")
    delete(url)


class AtomicWrite:
    """A file that appears whole or not at all, for writers that stream into it (pyarrow's
    ``ParquetWriter``, which writes a file in many calls).

    Write into :attr:`file`, then :meth:`commit`, or :meth:`abort` to drop it. Local: :attr:`file`
    is a new temp file beside ``dest`` (``.NAME.PID.tmp``, created new: a symlink planted at its
    name is not written through), renamed over ``dest`` on commit (fsynced first when ``fsync``);
    the parent folders are created. Object store: the bytes are kept in memory and PUT once on
    commit. As a context manager it gives :attr:`file`, commits when the block ends and aborts
    when it raises.

    Raises:
        OSError: creating the temp file, or the commit (rename, PUT); the temp file is removed.
    """

    def __init__(self, dest: AnyPath, fsync: bool = False):
        self.path = path(dest)
        self._local = local_path(self.path)
        self._fsync = fsync
        self._tmp: Path | None = None
        self._buffer: io.BytesIO | None = None
        self.file: IO[bytes]
        if self._local is None:
            self._buffer = io.BytesIO()
            self.file = self._buffer
            return
        self._local.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = local_files.temp_path(self._local)
        self.file = os.fdopen(local_files.open_new(self._tmp), "wb")

    def commit(self) -> UPath:
        """Put the file in place (rename, or one PUT) and return its path."""
        try:
            if self._buffer is not None:
                write_bytes(self.path, self._buffer.getvalue())
                self._buffer = None
            elif self._tmp is not None and self._local is not None:
                if self._fsync:
                    self.file.flush()
                    os.fsync(self.file.fileno())
                self.file.close()
                os.replace(self._tmp, self._local)
                self._tmp = None
        except OSError:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop what was written: the temp file is removed (nothing was PUT). Never raises for the
        file's own error (closing it flushes a buffer the full disk refused again)."""
        with contextlib.suppress(OSError):
            self.file.close()
        self._buffer = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> IO[bytes]:
        return self.file

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class AppendLog:
    """A file written by appending records (a ledger segment), readable by lines while it grows.

    Local: created new on the first :meth:`append` (a symlink planted at its name is removed, never
    appended through) and appended unbuffered, so a killed process loses nothing it appended.
    Object store (no appends): the records are kept in memory and written as one object by
    :meth:`close`; a process killed before loses them.
    """

    def __init__(self, dest: AnyPath):
        self.path = path(dest)
        self._local = local_path(self.path)
        self._file: IO[bytes] | None = None
        self._pending: list[bytes] = []

    def append(self, data: bytes) -> None:
        """Add ``data`` at the end. Raises OSError (locally: the file cannot be created or written)."""
        if self._local is None:
            self._pending.append(data)
            return
        if self._file is None:
            self._local.parent.mkdir(parents=True, exist_ok=True)
            self._file = os.fdopen(local_files.open_new(self._local), "wb", buffering=0)
        self._file.write(data)

    def close(self) -> bool:
        """Finish the file; True when anything was written to it (it is complete now).

        Raises:
            OSError: the object could not be written (after the store's retries).
        """
        if self._file is not None:
            self._file.close()
            self._file = None
            return True
        if self._pending:
            write_bytes(self.path, b"".join(self._pending))
            self._pending = []
            return True
        return False


def sha256_of_file(path: AnyPath) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks (no caching); an object-store
    URL is read whole (one GET)."""
    h = hashlib.sha256()
    for chunk in read_chunks(path, 1 << 20):
        h.update(chunk)
    return h.hexdigest()
