"""One filesystem layer for ``input.root`` and ``output.root``: local paths and object-store URLs.

A *root* is a plain path (``/data/images``, ``outputs``), a ``file://`` URL (the same as the
path), or an object-store URL: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``az://container/prefix`` (also ``abfs://`` and ``abfss://``). Every read, write, listing and
delete that imgscore does under a root goes through this layer — the paths and whole-file I/O
here, streamed and append-only writes, small records and clean-up in :mod:`imgscore.io.file_ops`
— so callers never branch on the kind of root. Where the two kinds differ, the function says
what it does on each.

Local roots keep their POSIX behaviour (:mod:`imgscore.io.local_files`): files are written under a
``.``-prefixed temp name, fsynced and renamed (readers never see half a file); an exclusive
create is a temp file hard-linked to its name. Object stores (:mod:`imgscore.io.object_store`
opens them, with the ``storage.*`` settings) have no rename, and need none: one PUT is atomic
(the object appears whole or not at all), so each write is one PUT of the finished bytes, and an
exclusive create is a PUT with ``If-None-Match: *`` (:func:`create_new`). Listings and batched
GETs of objects are :mod:`imgscore.io.objects`.

One path type, :class:`upath.UPath` (universal-pathlib), for everything under an output root:
:func:`path` and every function that names a file of a run (part files, commit records, the
manifest, the lock, report.html) return one. Why: with one object for local and remote places, a
failure path (removing a stale part file, naming a known-bad list in the report) cannot work on
disk and crash on a bucket, as it would if a local path were a ``Path`` and a URL a ``str``. A
local root gives a ``PosixUPath``, a real ``pathlib.Path`` subclass, so local code keeps its
semantics; a remote one rides on the same fsspec filesystem the store was opened with (the same
storage options, the same instance: :func:`path`), where a wrapper of fsspec objects of our own
would be one more thing to write and keep. Code that needs a local file as such (a walk with
``os.scandir``, a mount lookup) asks :func:`local_path`, which is None under a URL. Prefect
parameters and records keep plain strings (``str(path)``).

Functions take :data:`AnyPath` — a config string, a ``pathlib.Path`` or a ``UPath`` — and
convert it once.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import re
import shutil
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeAlias

from upath import UPath

from imgscore.io import local_files
from imgscore.io.object_store import (
    SCHEMES,
    filesystem,
    is_precondition_failed,
    options_for,
    scheme_of,
)

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# What a function that takes a root or a path under one accepts: a string from the config (a
# local path or a URL), or a path (``pathlib.Path``, or the ``UPath`` that :func:`path` returns).
AnyPath: TypeAlias = str | os.PathLike[str] | UPath

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
# A relative path that is absolute or has a `..` component (paths use `/`; index paths are POSIX bytes).
CLIMBS_OUT = r"^/|(^|/)\.\.(/|$)"


# ------------------------------------------------------------------------------------ roots


def _text(p: AnyPath) -> str:
    """A path or URL as a string: a remote ``UPath``'s URL (``os.fspath`` refuses one), a local
    path's text."""
    return str(p) if isinstance(p, UPath) else os.fspath(p)


def is_remote(root: AnyPath | None) -> bool:
    """True when ``root`` is an object-store URL (not a local path or ``file://`` URL)."""
    return root is not None and scheme_of(root) is not None


def normalize_root(value: AnyPath) -> str:
    """A root as imgscore records it: an object-store URL with a lower-case scheme and no
    trailing ``/`` (``S3://b/p/`` → ``s3://b/p``); a ``file://`` URL as its local path; a local
    path unchanged.

    Raises:
        ValueError: an unknown scheme (``http://``, ``hdfs://``), or a URL without a bucket.
    """
    text = _text(value)
    m = _URL.match(text)
    if m is None:
        return text
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        return rest if rest.startswith("/") else "/" + rest
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in ("s3", "gs", "az", "abfs"))
        raise ValueError(f"{text!r}: unknown storage scheme {scheme}://; use a local path, file://, or one of {known}")
    rest = rest.strip("/")
    if not rest:
        raise ValueError(f"{text!r} names no bucket; write {scheme}://BUCKET/PREFIX")
    return f"{scheme}://{rest}"


def join(root: AnyPath, *parts: str) -> str:
    """``root`` joined with relative ``parts``: ``/``-separated for URLs, ``os.path.join`` for
    local paths. ``parts`` may themselves hold ``/``."""
    base = _text(root)
    if not is_remote(base):
        return os.path.join(base, *parts)
    out = base.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def path(root: AnyPath, *parts: str) -> UPath:
    """``root`` joined with relative ``parts`` (which may hold ``/``), as the one path type.

    A local root gives a ``PosixUPath`` (a ``pathlib.Path``: every local operation keeps its
    POSIX meaning); a ``file://`` URL gives the same as its path. An object-store URL gives the
    store's ``UPath`` (``S3Path``, ``GCSPath``, ``AzurePath``) opened with the settings in force
    (:func:`imgscore.io.object_store.configure`): its ``.fs`` is the instance
    :func:`imgscore.io.object_store.filesystem` returns, so a ``Path`` method called on it
    (``unlink``, ``exists``, ``read_bytes``, ``/``) talks to the same endpoint, with the same
    retries and timeouts, as the rest of this layer. ``str()`` of a remote path is its URL (the
    one form recorded or shown); it holds no credentials, but its ``storage_options`` may
    (expanded ``${VAR}`` references): never pass a remote ``UPath`` as a Prefect parameter or
    pickle it into a record — pass ``str(path)``.

    Raises:
        ValueError: an unknown URL scheme (:func:`normalize_root`), or a ``${VAR}`` option whose
            variable is unset.
        ModuleNotFoundError: the store's package is not installed (message: the pip line).
    """
    text = _text(root)
    if not is_remote(text):
        return UPath(normalize_root(text), *parts)
    url = join(normalize_root(text), *parts)
    filesystem(url)  # opened (or reopened after the environment changed) first: the UPath's .fs is that instance
    return UPath(url, **options_for(url))


def local_path(p: AnyPath) -> Path | None:
    """``p`` as a local ``pathlib.Path`` (a ``file://`` URL as its path), or None for an
    object-store URL: for the code that needs a file as such (a walk with ``os.scandir``, a mount
    lookup, the migration of a local layout) and has another way, or nothing to do, on a store."""
    text = _text(p)
    return None if is_remote(text) else Path(normalize_root(text))


def same_root(a: AnyPath, b: AnyPath) -> bool:
    """Whether two roots are the same place: the same URL (normalized), or the same folder once
    symlinks are resolved."""
    return resolve(a) == resolve(b)


def resolve(p: AnyPath) -> str:
    """The place ``p`` names, as one string: a local path absolute with every symlink resolved
    (``os.path.realpath``; it need not exist), an object-store URL normalized (a store has no links)."""
    text = _text(p)
    return normalize_root(text) if is_remote(text) else os.path.realpath(text)


def absolute(root: AnyPath) -> str:
    """A root as a run records and shows it: a local path made absolute (``os.path.abspath``:
    normalized, symlinks kept as written), an object-store URL normalized."""
    text = _text(root)
    return normalize_root(text) if is_remote(text) else os.path.abspath(text)


def within(real: str, root_real: str) -> bool:
    """Whether the resolved path ``real`` is the resolved folder ``root_real`` or below it
    (both as :func:`resolve` gives them)."""
    sep = "/" if is_remote(root_real) else os.sep
    return real == root_real or real.startswith(root_real.rstrip(sep) + sep)


def relative_within(root: AnyPath, p: AnyPath) -> str | None:
    """Where ``p`` sits inside ``root``: its path relative to it (``/`` separators; ``""`` when
    the two are the same place), or None when it is outside. Compared as :func:`resolve` gives
    them (symlinks resolved locally); a local path and a URL never nest."""
    real, base = resolve(p), resolve(root)
    if not within(real, base):
        return None
    sep = "/" if is_remote(base) else os.sep
    return "" if real == base else real[len(base.rstrip(sep)) + 1 :].replace(os.sep, "/")


def outside(root: AnyPath, p: AnyPath) -> str | None:
    """None when ``p`` is ``root`` itself or below it; else how it leaves, one clause for a
    refusal message. A local path is compared with every symlink resolved (``root`` may itself be
    a link; a link planted below it that points out of it leaves it): ``resolves to '/x', outside
    'out'``. Under an object-store root (no links there) the check is lexical: ``p`` is the root
    URL or below it, with no ``..`` component: ``is not under 's3://b/out'``."""
    if is_remote(root) or is_remote(p):
        base, text = _text(root).rstrip("/"), _text(p)
        if text == base or (text.startswith(base + "/") and not re.search(CLIMBS_OUT, text[len(base) + 1 :])):
            return None
        return f"is not under {base!r}"
    real = os.path.realpath(_text(p))
    if within(real, os.path.realpath(_text(root))):
        return None
    return f"resolves to {real!r}, outside {_text(root)!r}"


def normpath(base: AnyPath, entry: str = "") -> str:
    """The place ``entry`` (a path as a record wrote it) names when read against ``base``, without
    touching the file system: under a local root, joined to ``base`` (an absolute entry stands
    alone) and ``os.path.normpath``'ed; under an object-store URL, a URL entry as it is and a
    relative one joined to ``base`` (keys are names: ``..`` is not folded). No ``entry``: ``base``
    itself, normalized so."""
    text = _text(base)
    if is_remote(text):
        return entry if is_remote(entry) else join(text, entry)
    return os.path.normpath(os.path.join(text, entry))


def name_of(url: AnyPath) -> str:
    """The last component of a path or URL."""
    return _text(url).rstrip("/").rsplit("/", 1)[-1] if is_remote(url) else os.path.basename(_text(url))


def parent_of(url: AnyPath) -> str:
    """The path or URL one level up."""
    text = _text(url)
    return text.rstrip("/").rsplit("/", 1)[0] if is_remote(text) else os.path.dirname(text)


def display(url: AnyPath) -> str:
    """How a root is shown and recorded (no credentials can be in it: they are never in URLs here)."""
    return _text(url)


# ------------------------------------------------------------------------ whole-file I/O


def exists(url: AnyPath) -> bool:
    """Whether a file or object (or, locally, a folder) exists at ``url``."""
    if (local := local_path(url)) is not None:
        return local.exists()
    fs, key = filesystem(url)
    return bool(fs.exists(key))


def is_file(url: AnyPath) -> bool:
    """Whether a file or object exists at ``url`` (a local folder is not a file)."""
    if (local := local_path(url)) is not None:
        return local.is_file()
    fs, key = filesystem(url)
    return bool(fs.isfile(key))


def read_bytes(url: AnyPath) -> bytes:
    """The whole file or object.

    Raises:
        FileNotFoundError: nothing at ``url``. OSError: the store failed after its retries.
    """
    if (local := local_path(url)) is not None:
        return local.read_bytes()
    fs, key = filesystem(url)
    return bytes(fs.cat_file(key))


def write_bytes(url: AnyPath, data: bytes) -> str:
    """Write ``data`` at ``url`` so that a reader sees the old content or the new, never part.

    Local: a new ``.NAME.PID.tmp`` file, fsynced, renamed (the parent folders are created; a
    failed write leaves no temp file). Object store: one PUT. Returns ``url`` as a string.

    Raises:
        OSError: the write failed (disk full, quota, a store that refused the PUT after its retries).
    """
    text = _text(url)
    if (local := local_path(text)) is not None:
        local_files.write_whole(local, data)
        return text
    fs, key = filesystem(text)
    fs.pipe_file(key, data)
    return text


def create_new(url: AnyPath, data: bytes) -> bool:
    """Create ``url`` holding ``data`` only if nothing is there yet; True when this call created it.

    Two writers racing on one name: exactly one gets True. Local: the bytes go to a temp file
    (fsynced) that is hard-linked to the name (``link`` fails when the name exists) — the file
    appears whole. Object store: a PUT with ``If-None-Match: *`` (S3 since 2024, GCS and Azure
    natively, SeaweedFS, MinIO); the store answers 412 when the object exists.

    Raises:
        OSError: the store failed for another reason (after its retries).
    """
    if (local := local_path(url)) is not None:
        return local_files.create_exclusive(local, data)
    fs, key = filesystem(url)
    try:
        fs.pipe_file(key, data, mode="create")
    except OSError as exc:
        if is_precondition_failed(exc):
            return False
        raise
    return True


def delete(url: AnyPath) -> None:
    """Delete one file or object; nothing there is fine (S3 answers a DELETE of a missing key
    with success too)."""
    if (local := local_path(url)) is not None:
        local.unlink(missing_ok=True)
        return
    fs, key = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(key)


def delete_tree(url: AnyPath) -> None:
    """Delete everything under ``url`` (a local folder, or every object with the prefix)."""
    if (local := local_path(url)) is not None:
        shutil.rmtree(local, ignore_errors=True)
        return
    fs, key = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(key, recursive=True)


def make_dirs(url: AnyPath) -> None:
    """Create a local folder and its parents; nothing for object stores (prefixes need no creating)."""
    if (local := local_path(url)) is not None:
        local.mkdir(parents=True, exist_ok=True)


def list_names(url: AnyPath) -> list[str]:
    """Names directly under ``url`` (files and folders, or objects and common prefixes), sorted;
    ``[]`` when there is nothing (no folder, no object with the prefix)."""
    if (local := local_path(url)) is not None:
        try:
            return sorted(os.listdir(local))
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, key = filesystem(url)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(key, detail=False))
    except FileNotFoundError:
        return []


def glob(pattern: str) -> list[str]:
    """Paths or URLs matching ``pattern`` (``*`` within one component), sorted."""
    if not is_remote(pattern):
        return sorted(_glob.glob(pattern))
    scheme = scheme_of(pattern)
    fs, key = filesystem(pattern)
    return sorted(f"{scheme}://{p}" for p in fs.glob(key))


# ---------------------------------------------------------------------------------- Parquet


def open_input(url: AnyPath) -> IO[bytes]:
    """A seekable binary file for reading (Parquet footers, row groups): a local file, or an
    fsspec file that reads the object in ranged GETs. Use as a context manager."""
    if (local := local_path(url)) is not None:
        return open(local, "rb")
    fs, key = filesystem(url)
    f: IO[bytes] = fs.open(key, "rb")
    return f


def arrow_filesystem(url: AnyPath) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow FileSystem, path)`` for ``pyarrow.dataset`` and ``pyarrow.parquet`` over a root:
    the local file system, or the fsspec store wrapped (``pyarrow.fs.FSSpecHandler``)."""
    import pyarrow.fs as pafs

    text = _text(url)
    if not is_remote(text):
        return pafs.LocalFileSystem(), text
    fs, key = filesystem(text)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), key


def arrow_files(files: list[str]) -> tuple[pafs.FileSystem | None, list[str]]:
    """``(pyarrow FileSystem or None, paths)`` for ``pyarrow.dataset.dataset(paths, filesystem=…)``
    over files of one root: local paths as they are (filesystem None), object URLs without their
    scheme on the wrapped fsspec store."""
    if not files or not is_remote(files[0]):
        return None, [_text(f) for f in files]
    fs, _ = arrow_filesystem(files[0])
    return fs, [f.split("://", 1)[1] for f in files]
