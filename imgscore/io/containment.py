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

Writes and clean-up keep to the same rule in the storage layer: a temp file is created new
(``O_EXCL | O_NOFOLLOW``: a symlink planted at its name is removed, never written through,
:func:`imgscore.io.local_files.open_new`), and clean-up deletes temp *names* (a symlink, not its
target) without descending through a symlink (:func:`imgscore.io.file_ops.remove_temp_files`).

A refusal is :class:`UnsafePathError` (exit 2), one line naming the entry, what it resolves to
and what to do. The checks are made where the path is used, so a layout change (a new part-file
folder) passes through them by using the same path builders (``part_dir``, ``run_dir_of``).
They stop edited run state; they do not stop a process that swaps folders for symlinks while a
run is writing — that is what the output root's permissions are for (docs/security.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, TypeGuard

from upath import UPath

from imgscore.errors import UsageError
from imgscore.io import storage
from imgscore.io.storage import AnyPath

if TYPE_CHECKING:
    import pyarrow as pa

RUN_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_BAD_NAME_CHARS = frozenset("/\\\0")
_ESCAPES = storage.CLIMBS_OUT  # absolute, or a `..` component
_FIX = "the run state was edited or a link was planted under output.root; restore it, or start a new run"


class UnsafePathError(UsageError):
    """A path from run state would leave ``output.root`` (or its input root): refused, exit 2."""


def is_plain_name(value: object) -> TypeGuard[str]:
    """Whether ``value`` can be one folder name: a non-empty string without ``/``, ``\\``, NUL or
    control characters, and not ``.`` or ``..``."""
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and not any(c in _BAD_NAME_CHARS or ord(c) < 32 for c in value)
    )


def safe_name(value: object, what: str) -> str:
    """``value`` when it can be one folder name (:func:`is_plain_name`).

    Raises:
        UnsafePathError: otherwise (the message names ``what``).
    """
    if not is_plain_name(value):
        raise UnsafePathError(
            f"{what} {value!r} is not a plain folder name (no '/', '\\', '..' or control characters); {_FIX}"
        )
    return value


def check_run_date(value: object, what: str) -> str:
    """``value`` when it is a ``YYYY-MM-DD`` date (the ``run_date=`` partition).

    Raises:
        UnsafePathError: otherwise.
    """
    if not isinstance(value, str) or not RUN_DATE.fullmatch(value):
        raise UnsafePathError(f"{what} {value!r} is not a YYYY-MM-DD date; {_FIX}")
    return value


def inside(root: AnyPath, path: AnyPath, what: str) -> UPath:
    """``path`` (as :func:`imgscore.io.storage.path` gives it) when, with every symlink
    resolved (``os.path.realpath``), it is ``root`` itself or below it. ``root`` and ``path`` are
    config strings or paths; ``path`` is a path as given (e.g. ``root / "runs" / run_id``); it
    need not exist. ``root`` may itself be a symlink. For an object-store root (no links there)
    the check is lexical: ``path`` is the root URL or below it, with no ``..`` component.

    Raises:
        UnsafePathError: it resolves outside ``root`` (the message names ``what`` and the target).
    """
    why = storage.outside(root, path)
    if why is not None:
        raise UnsafePathError(f"{what} {str(path)!r} {why}; {_FIX}")
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
    root = storage.normpath(out_root)
    depth = len(PurePosixPath(root).parts)  # expected paths are built under out_root: their tails are what follows it
    tails = {key: PurePosixPath(key).parts[depth:] for key in (storage.normpath(p) for p in expected)}
    for i, entry in enumerate(files):
        if storage.normpath(out_root, str(entry)) in tails:
            continue
        parts = PurePosixPath(str(entry)).parts
        # written under another spelling of the root: an output.root that moved, or a relative one
        # (the writer records root/part, so `outputs/predictions/…` for the demo's `outputs`)
        moved = ".." not in parts and any(parts[-len(t) :] == t for t in tails.values())
        if not moved:
            raise UnsafePathError(f"{what}[{i}] {entry!r} is not one of this shard's part files under {root!r}; {_FIX}")
