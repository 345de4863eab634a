"""Paths that come from run state stay inside ``output.root`` (docs/security.md).

Everything under ``output.root`` may have been written by someone other than this tool: output
roots are shared (a team bucket, a file share), and whoever can write there can edit a manifest,
a ledger line or a commit record, or plant a symlink. This module is the one place that checks a
path derived from such data before imgscore reads, writes, renames or deletes it:

- :func:`safe_name`, :func:`check_run_date`: a run id or run date becomes one folder name
  (``runs/RUN``, ``run_date=…/RUN``), never ``..`` or a path with separators.
- :func:`inside`: a path, with every symlink resolved, is ``root`` or below it — a symlink
  planted inside ``OUT`` that points out of it is refused.
- :func:`check_relative`, :func:`check_relative_column`: a path recorded relative to a root
  (index files, image paths in the index) is relative and has no ``..`` component.
- :func:`check_recorded_files`: a shard's recorded ``files`` name that shard's own part files.
- :func:`create_new`: a temp file is created new (``O_EXCL | O_NOFOLLOW``): a symlink planted at
  its name is removed, never written through.
- :func:`remove_temp_files`: clean-up deletes temp *names* (a symlink, not its target) and never
  descends through a symlink.

A refusal is :class:`UnsafePathError` (exit 2), one line naming the entry, what it resolves to
and what to do. The checks are made where the path is used, so a layout change (a new part-file
folder) passes through them by using the same path builders (``part_dir``, ``run_dir_of``).
They stop edited run state; they do not stop a process that swaps folders for symlinks while a
run is writing — that is what the output root's permissions are for (docs/security.md).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from upath import UPath

from imgscore.errors import UsageError
from imgscore.io import storage
from imgscore.io.storage import AnyPath, is_remote

if TYPE_CHECKING:
    import pyarrow as pa

RUN_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_BAD_NAME_CHARS = frozenset("/\\\0")
_ESCAPES = r"^/|(^|/)\.\.(/|$)"  # absolute, or a `..` component (paths use `/`; index paths are POSIX bytes)
_FIX = "the run state was edited or a link was planted under output.root; restore it, or start a new run"


class UnsafePathError(UsageError):
    """A path from run state would leave ``output.root`` (or its input root): refused, exit 2."""


def is_plain_name(value: object) -> bool:
    """Whether ``value`` can be one folder name: a non-empty string without ``/``, ``\\``, NUL or
    control characters, and not ``.`` or ``..``."""
    return isinstance(value, str) and value not in ("", ".", "..") and not any(c in _BAD_NAME_CHARS or ord(c) < 32 for c in value)


def safe_name(value: object, what: str) -> str:
    """``value`` when it can be one folder name (:func:`is_plain_name`).

    Raises:
        UnsafePathError: otherwise (the message names ``what``).
    """
    if not is_plain_name(value):
        raise UnsafePathError(f"{what} {value!r} is not a plain folder name (no '/', '\\', '..' or control characters); {_FIX}")
    return value


def check_run_date(value: object, what: str) -> str:
    """``value`` when it is a ``YYYY-MM-DD`` date (the ``run_date=`` partition).

    Raises:
        UnsafePathError: otherwise.
    """
    if not isinstance(value, str) or not RUN_DATE.fullmatch(value):
        raise UnsafePathError(f"{what} {value!r} is not a YYYY-MM-DD date; {_FIX}")
    return value


def within(real: str, root_real: str) -> bool:
    """Whether the resolved path ``real`` is the resolved folder ``root_real`` or below it."""
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def inside(root: AnyPath, path: AnyPath, what: str) -> UPath:
    """``path`` (as :func:`imgscore.io.storage.path` gives it) when, with every symlink
    resolved (``os.path.realpath``), it is ``root`` itself or below it. ``root`` and ``path`` are
    config strings or paths; ``path`` is a path as given (e.g. ``root / "runs" / run_id``); it
    need not exist. ``root`` may itself be a symlink. For an object-store root (no links there)
    the check is lexical: ``path`` is the root URL or below it, with no ``..`` component.

    Raises:
        UnsafePathError: it resolves outside ``root`` (the message names ``what`` and the target).
    """
    if is_remote(root) or is_remote(path):
        base, text = str(root).rstrip("/"), str(path)
        if not (text == base or (text.startswith(base + "/") and not re.search(_ESCAPES, text[len(base) + 1:]))):
            raise UnsafePathError(f"{what} {text!r} is not under {base!r}; {_FIX}")
        return storage.path(text)
    real = os.path.realpath(path)
    if not within(real, os.path.realpath(root)):
        raise UnsafePathError(f"{what} {str(path)!r} resolves to {real!r}, outside {str(root)!r}; {_FIX}")
    return storage.path(path)


def check_relative(rel: str, what: str) -> str:
    """``rel`` when it is a relative path without ``..`` components (checked lexically: the file
    need not exist).

    Raises:
        UnsafePathError: an absolute path or a ``..`` component.
    """
    if re.search(_ESCAPES, rel.replace("\\", "/")):
        raise UnsafePathError(f"{what} {rel!r} is absolute or climbs out with '..'; {_FIX}")
    return rel


def check_relative_column(paths: pa.Array | pa.ChunkedArray, what: str) -> None:
    """Every value of a string or binary column (an index's ``fs_path``) is a relative path
    without ``..`` components; one vectorised regex, no per-row Python.

    Raises:
        UnsafePathError: naming the first bad value and its row.
    """
    import pyarrow.compute as pc

    bad = pc.match_substring_regex(paths, _ESCAPES)
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        value = paths[i].as_py()
        shown = os.fsdecode(value) if isinstance(value, bytes) else value
        raise UnsafePathError(f"{what} row {i}: {shown!r} is absolute or climbs out with '..'; {_FIX}")


def check_recorded_files(files: Iterable[str], expected: Iterable[UPath], out_root: AnyPath, what: str) -> None:
    """Each recorded ``files`` entry names one of the shard's own part files (``expected``, as
    derived under ``out_root``): that path itself (or relative to ``out_root``), or — written
    under another spelling of the root: one that moved, or a relative one as the writer recorded
    it — a path without ``..`` whose tail is the same ``TABLE/run_date=…/RUN/part-….parquet``.
    imgscore never opens a recorded entry; it uses the derived path. An entry that is neither is
    an edit.

    Raises:
        UnsafePathError: naming the entry (``what[i]``) and its value.
    """
    if is_remote(out_root):
        base = str(out_root).rstrip("/")
        tails = {str(p): tuple(str(p)[len(base) + 1:].split("/")) for p in expected}
        for i, entry in enumerate(files):
            parts = tuple(str(entry).split("/"))
            if str(entry) in tails or (".." not in parts and any(parts[-len(t):] == t for t in tails.values())):
                continue
            raise UnsafePathError(f"{what}[{i}] {entry!r} is not one of this shard's part files under {base!r}; {_FIX}")
        return
    root = Path(out_root)
    tails = {}
    for p in expected:
        tails[os.path.normpath(p)] = Path(p).relative_to(root).parts
    for i, entry in enumerate(files):
        if os.path.normpath(root / entry) in tails:
            continue
        parts = Path(entry).parts
        # written under another spelling of the root: an output.root that moved, or a relative one
        # (the writer records root/part, so `outputs/predictions/…` for the demo's `outputs`)
        moved = ".." not in parts and any(parts[-len(t):] == t for t in tails.values())
        if not moved:
            raise UnsafePathError(f"{what}[{i}] {entry!r} is not one of this shard's part files under {str(root)!r}; {_FIX}")


def create_new(path: str | os.PathLike, mode: int = 0o666) -> int:
    """Open ``path`` for writing as a new regular file and return its descriptor.

    A leftover at that name (a killed writer's temp file, or a symlink planted there) is
    unlinked first — the link, never its target — and the file is created with ``O_CREAT |
    O_EXCL | O_NOFOLLOW``, so nothing that appears at the name in between is followed. ``mode``
    is filtered by the umask, as ``open()`` does.

    Raises:
        FileExistsError: something was created at the name between the unlink and the open.
    """
    path = os.fspath(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)


def read_small(path: str | os.PathLike, limit: int = 1 << 20) -> bytes:
    """The first ``limit`` bytes of the regular file at ``path``, opened without following a
    symlink at its name (a small record such as a lock file).

    Raises:
        OSError: missing (FileNotFoundError), a symlink (ELOOP) or not a regular file.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read(limit)


def remove_temp_files(folder: str | os.PathLike, pattern: str = ".*.tmp") -> int:
    """Delete names matching ``pattern`` under ``folder`` (killed writers' temp files); return how
    many. A symlink matching it is removed itself (its target is untouched); symlinked folders
    are not descended into, and ``folder`` itself is skipped when it is a symlink."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return 0
    n = 0
    for p in folder.rglob(pattern):  # Python's rglob does not follow symlinked folders
        try:
            if p.is_symlink() or p.is_file():
                p.unlink()
                n += 1
        except OSError:
            pass
    return n
