"""One filesystem layer for ``input.root`` and ``output.root``: local paths and object-store URLs.

A *root* is a plain path (``/data/images``, ``outputs``), a ``file://`` URL (the same as the
path), or an object-store URL: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``az://container/prefix`` (also ``abfs://`` and ``abfss://``). Every read, write, listing and
delete that imgscore does under a root goes through the functions here; callers never branch on
the kind of root themselves.

Why fsspec (with s3fs, gcsfs, adlfs) and not ``pyarrow.fs`` or obstore: it is the layer the
analytics readers already use (pandas, polars, Dask and DuckDB take fsspec ``storage_options``),
so ``storage.options`` means the same thing to imgscore and to whoever reads its Parquet; its
S3 client is botocore, which reads the whole AWS credential chain (``AWS_ACCESS_KEY_ID`` …,
``AWS_PROFILE`` and ``~/.aws/config``, ``AWS_ENDPOINT_URL``, container and instance roles) and
retries throttling and 5xx answers with backoff (``retries: mode standard``); it creates objects
conditionally (``If-None-Match: *``, :func:`create_new`); and it keeps one client per process
after a fork (fsspec clears its instance cache in a child), which is what DataLoader worker
processes need. ``pyarrow.fs`` has no conditional put and no Azure/GCS URL parity with the
readers' options; obstore has conditional puts but no ``AWS_PROFILE`` without boto3 and would
be a second client beside the one the readers use. fsspec itself is already installed with
torch; s3fs, gcsfs and adlfs are the optional extras ``imgscore[s3]``, ``[gcs]`` and ``[azure]``
— a local run imports none of them.

Local roots keep their POSIX behaviour: files are written under a ``.``-prefixed temp name,
fsynced and renamed (readers never see half a file); an exclusive create is ``O_EXCL`` plus a
hard link. Object stores have no rename, and need none: one PUT is atomic (the object appears
whole or not at all), so each write is one PUT of the finished bytes, and an exclusive create is
a PUT with ``If-None-Match: *`` (:func:`create_new`).

One path type, :class:`upath.UPath` (universal-pathlib), for everything under an output root:
:func:`path` and every function that names a file of a run (part files, commit records, the
manifest, the lock, report.html) return one. Why: with one object for local and remote places, a
failure path (removing a stale part file, naming a known-bad list in the report) cannot work on
disk and crash on a bucket, as it did when a local path was a ``Path`` and a URL a ``str``. A
local root gives a ``PosixUPath``, a real ``pathlib.Path`` subclass, so local code keeps its
semantics (temp-then-rename, ``O_EXCL``, fsync, symlink checks, ``os.open`` of the path); a
remote one rides on the same fsspec filesystem this module opens (the same storage options, the
same instance: :func:`path`), where a wrapper of fsspec objects of our own would be one more thing
to write and keep. Prefect parameters and records keep plain strings (``str(path)``).

Settings (``storage.*`` in the config) are put in force for a process by :func:`configure`;
options never hold secrets (:func:`check_options`): credentials come from each machine's own
environment, or from ``${VAR}`` references that are expanded on the machine that opens the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeAlias

from upath import UPath

# What a function that takes a root or a path under one accepts: a string from the config (a
# local path or a URL), or a path (``pathlib.Path``, or the ``UPath`` that :func:`path` returns).
AnyPath: TypeAlias = str | os.PathLike | UPath

# URL scheme → (fsspec protocol, the package that implements it, the pip extra that installs it)
SCHEMES: dict[str, tuple[str, str, str]] = {
    "s3": ("s3", "s3fs", "s3"),
    "s3a": ("s3", "s3fs", "s3"),
    "gs": ("gs", "gcsfs", "gcs"),
    "gcs": ("gs", "gcsfs", "gcs"),
    "az": ("az", "adlfs", "azure"),
    "abfs": ("abfs", "adlfs", "azure"),
    "abfss": ("abfs", "adlfs", "azure"),
}
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")

# Option names whose values are credentials: only ``${VAR}`` references are accepted for them.
_SECRET_NAME = re.compile(r"(^|_)(key|secret|token|password|passwd|sas|signature)$|secret|password|credential|connection_string", re.I)
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_TOKEN_WORDS = frozenset({"anon", "cloud", "google_default", "browser"})  # gcsfs token modes, not secrets


class StorageError(OSError):
    """A store answered with an error, or did not answer in time, after the client's retries."""


# ------------------------------------------------------------------------------------ roots


def _text(p: AnyPath) -> str:
    """A path or URL as a string: a remote ``UPath``'s URL (``os.fspath`` refuses one), a local
    path's text."""
    return str(p) if isinstance(p, UPath) else os.fspath(p)


def scheme_of(root: str | os.PathLike) -> str | None:
    """The URL scheme of ``root`` (``s3``, ``gs``, ``az``, …), or None for a local path
    (a ``file://`` URL included)."""
    m = _URL.match(str(root))
    if m is None or m.group(1).lower() == "file":
        return None
    return m.group(1).lower()


def is_remote(root: str | os.PathLike | None) -> bool:
    """True when ``root`` is an object-store URL (not a local path or ``file://`` URL)."""
    return root is not None and scheme_of(root) is not None


def normalize_root(value: str | os.PathLike) -> str:
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


def join(root: str | os.PathLike, *parts: str) -> str:
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
    (:func:`configure`): its ``.fs`` is the instance :func:`filesystem` returns, so a ``Path``
    method called on it (``unlink``, ``exists``, ``read_bytes``, ``/``) talks to the same
    endpoint, with the same retries and timeouts, as the rest of this module. ``str()`` of a
    remote path is its URL (the one form recorded or shown); it holds no credentials, but its
    ``storage_options`` may (expanded ``${VAR}`` references): never pass a remote ``UPath`` as a
    Prefect parameter or pickle it into a record — pass ``str(path)``.

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
    return UPath(url, **_options_for(url))


def _options_for(url: AnyPath) -> dict[str, Any]:
    """The fsspec storage options an object-store URL is opened with (client defaults, then
    ``storage.options`` expanded): what :func:`filesystem` passes to the filesystem class."""
    protocol = SCHEMES[scheme_of(url)][0]
    return _deep_merge(_client_defaults(protocol, _settings), _expand(dict(_settings.options), "storage.options"))


def same_root(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two roots are the same place: the same URL (normalized), or the same folder once
    symlinks are resolved."""
    if is_remote(a) or is_remote(b):
        return normalize_root(a) == normalize_root(b)
    return os.path.realpath(a) == os.path.realpath(b)


def name_of(url: str | os.PathLike) -> str:
    """The last component of a path or URL."""
    return _text(url).rstrip("/").rsplit("/", 1)[-1] if is_remote(url) else os.path.basename(_text(url))


def parent_of(url: str | os.PathLike) -> str:
    """The path or URL one level up."""
    text = _text(url)
    return text.rstrip("/").rsplit("/", 1)[0] if is_remote(text) else os.path.dirname(text)


def display(url: str | os.PathLike) -> str:
    """How a root is shown and recorded (no credentials can be in it: they are never in URLs here)."""
    return _text(url)


# --------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """What opening a store needs beyond the environment's credential chain.

    ``options``: fsspec storage options (``endpoint_url``, ``client_kwargs``, ``anon``, …);
    values that are credentials must be ``${VAR}`` references (:func:`check_options`).
    ``retries``: retries after the first attempt of each request (throttling, 5xx, timeouts),
    with the client's exponential backoff. ``read_timeout_s``: seconds a socket read may stall;
    one object read (all its attempts) is cut at ``read_timeout_s * (retries + 1)``.
    ``connect_timeout_s``: seconds to open a connection.
    """

    options: tuple[tuple[str, Any], ...] = ()
    retries: int = 4
    read_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0

    @classmethod
    def of(cls, options: Mapping[str, Any] | None = None, retries: int = 4, read_timeout_s: float = 30.0,
           connect_timeout_s: float = 10.0) -> Settings:
        return cls(tuple(sorted((options or {}).items())), retries, read_timeout_s, connect_timeout_s)

    @property
    def object_timeout_s(self) -> float:
        """The most one object read may take, all attempts together."""
        return self.read_timeout_s * (self.retries + 1) + self.connect_timeout_s


_settings = Settings()
_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Put ``settings`` in force for this process (stores opened later use them). Called where
    a run's config arrives: the CLI, the flows, each shard task run (a Dask worker elsewhere).
    DataLoader worker processes inherit them."""
    global _settings
    with _lock:
        _settings = settings


def current_settings() -> Settings:
    return _settings


def check_options(options: Mapping[str, Any], where: str = "storage.options") -> None:
    """Refuse credentials written into the config: a value of an option named like a secret
    (``key``, ``secret``, ``token``, ``password``, ``sas_token``, ``account_key``,
    ``connection_string``, …, nested mappings included) must be a ``${VAR}`` reference, which is
    expanded from the environment of the machine that opens the store — so the config, and
    everything that records it (manifest, Parquet metadata, Prefect parameters), never holds a
    secret.

    Raises:
        ValueError: naming the option and the fix.
    """
    for name, value in options.items():
        dotted = f"{where}.{name}"
        if isinstance(value, Mapping):
            check_options(value, dotted)
            continue
        if not _SECRET_NAME.search(str(name)) or value is None or isinstance(value, bool):
            continue
        if isinstance(value, str) and (_ENV_REF.match(value) or (name == "token" and value in _TOKEN_WORDS)):
            continue
        raise ValueError(
            f"{dotted} looks like a credential; secrets are never written in the config (it is recorded in the manifest and "
            f"Parquet metadata): leave it to the standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            f"GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_KEY, …) or write {name}: ${{SOME_ENV_VAR}}"
        )


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, str) and (m := _ENV_REF.match(value)):
        var = m.group(1)
        if var not in os.environ:
            raise ValueError(f"{where} refers to ${{{var}}}, which is not set in this environment; export {var} on every machine of the run")
        return os.environ[var]
    return value


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _client_defaults(protocol: str, s: Settings) -> dict[str, Any]:
    """Per-protocol defaults: retries with backoff and timeouts, and no listing cache (a run
    lists what other processes just wrote)."""
    if protocol == "s3":
        # botocore's "standard" retry mode: throttling (SlowDown, 503) and transient errors (500,
        # 502, 504, timeouts, resets) with exponential backoff and jitter.
        return {
            "use_listings_cache": False,
            "config_kwargs": {
                "retries": {"total_max_attempts": s.retries + 1, "mode": "standard"},
                "read_timeout": s.read_timeout_s,
                "connect_timeout": s.connect_timeout_s,
            },
        }
    if protocol == "gs":
        return {"timeout": s.read_timeout_s}
    return {}


_filesystems: dict[tuple, Any] = {}
_client_env: dict[str, int] = {}  # protocol -> the environment fingerprint its cached clients were made with
# Environment variables a client reads when it is created: a store is reopened when they change.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "AWS_REGION",
               "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_CONNECTION_STRING")


def filesystem(root: str | os.PathLike):
    """``(fsspec filesystem, path inside it)`` for an object-store URL, opened with the settings
    in force (:func:`configure`); one instance per process and settings (fsspec makes a fresh one
    in a forked child).

    Raises:
        ModuleNotFoundError: the package for the scheme is not installed (message: the pip line).
        ValueError: a ``${VAR}`` option whose variable is unset.
    """
    import fsspec

    text = _text(root)
    scheme = scheme_of(text)
    if scheme is None:
        raise ValueError(f"{text!r} is a local path, not an object-store URL")
    protocol, package, extra = SCHEMES[scheme]
    s = _settings
    env = hash(tuple(os.environ.get(v) for v in _CLIENT_ENV))
    key = (protocol, s, os.getpid(), env)
    fs = _filesystems.get(key)
    if fs is None:
        try:
            __import__(package)
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                f"{text!r} needs {package}, which is not installed: pip install 'imgscore[{extra}]'"
            ) from None
        cls = fsspec.get_filesystem_class(protocol)
        with _lock:
            if _client_env.get(protocol, env) != env:
                # the environment a client reads when it is made changed: fsspec's cache (keyed by
                # options only) would hand out clients made before, here and to every UPath
                cls.clear_instance_cache()
                for k in [k for k in _filesystems if k[0] == protocol]:
                    del _filesystems[k]
            _client_env[protocol] = env
            # through fsspec's instance cache (keyed by class, pid and options): the UPath that
            # :func:`path` builds with the same options gets this very instance as its ``.fs``
            fs = cls(**_options_for(text))
            if protocol == "s3":
                fs.retries = 1  # s3fs's own retry loop off: botocore's standard mode retries (above)
            _filesystems[key] = fs
    return fs, text.split("://", 1)[1]


def missing_package(root: str | os.PathLike | None) -> str | None:
    """The pip line a root needs and lacks (``pip install 'imgscore[s3]'``), or None."""
    scheme = scheme_of(root) if root is not None else None
    if scheme is None:
        return None
    _, package, extra = SCHEMES[scheme]
    try:
        __import__(package)
    except ModuleNotFoundError:
        return f"{_text(root)!r} needs {package}: pip install 'imgscore[{extra}]'"
    return None


def bucket_of(url: AnyPath) -> str:
    """The bucket (S3, GCS) or container (Azure) an object-store URL names: ``s3://b/p`` → ``b``."""
    return normalize_root(_text(url)).split("://", 1)[1].split("/", 1)[0]


def endpoint_of(url: AnyPath) -> str:
    """Where this process sends the requests for ``url``'s store: the S3 endpoint the client
    resolved (``AWS_ENDPOINT_URL``, ``storage.options.endpoint_url``, or AWS's regional one), else
    the scheme (``gs://``, ``az://``: their clients have one service address per account)."""
    fs, _ = filesystem(url)
    client = getattr(fs, "s3", None)  # s3fs's botocore client, made on the first request
    return getattr(getattr(client, "meta", None), "endpoint_url", None) or f"{scheme_of(url)}://"


def missing_bucket(url: AnyPath, key: str) -> str | None:
    """The refusal for a root whose bucket does not exist (one request: the bucket's HEAD), or
    None: a local root, a bucket that exists, or a store that did not say it is missing (access
    denied, a network error: left to the caller's own check, whose message carries the store's
    answer). ``key`` names the setting in the message (``input.root``, ``output.root``).

    Why it is asked: a listing of a missing bucket answers nothing, which reads as an empty
    prefix ("holds no objects"), and some stores create a bucket on the first PUT into it.
    """
    if not is_remote(url):
        return None
    fs, _ = filesystem(url)
    bucket = bucket_of(url)
    try:
        fs.info(bucket)
    except FileNotFoundError:
        return f"bucket {bucket!r} does not exist at {endpoint_of(url)}; create it or fix {key}"
    except (OSError, ValueError):
        return None
    return None


# ------------------------------------------------------------------------ whole-file I/O


def _is_precondition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is a store's 412 answer to ``If-None-Match: *`` (the object exists).
    s3fs raises FileExistsError only when the answer names the condition; SeaweedFS and MinIO
    answer ``PreconditionFailed`` without it (s3fs then raises OSError with the cause attached)."""
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__ or exc.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "ConditionNotMet", "BlobAlreadyExists") or "pre-condition" in str(exc).lower()


def exists(url: str | os.PathLike) -> bool:
    """Whether a file or object (or, locally, a folder) exists at ``url``."""
    if not is_remote(url):
        return os.path.exists(url)
    fs, path = filesystem(url)
    return fs.exists(path)


def is_file(url: str | os.PathLike) -> bool:
    """Whether a file or object exists at ``url`` (a local folder is not a file)."""
    if not is_remote(url):
        return os.path.isfile(url)
    fs, path = filesystem(url)
    return fs.isfile(path)


def read_bytes(url: str | os.PathLike) -> bytes:
    """The whole file or object.

    Raises:
        FileNotFoundError: nothing at ``url``. OSError: the store failed after its retries.
    """
    if not is_remote(url):
        return Path(url).read_bytes()
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes(url: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` at ``url`` so that a reader sees the old content or the new, never part.

    Local: ``imgscore.io.parquet.write_bytes_atomic`` (a new ``.NAME.PID.tmp`` file,
    fsynced, renamed). Object store: one PUT. Returns ``url``.
    """
    text = _text(url)
    if not is_remote(text):
        from imgscore.io.parquet import write_bytes_atomic

        write_bytes_atomic(data, text)
        return text
    fs, path = filesystem(text)
    fs.pipe_file(path, data)
    return text


def create_new(url: str | os.PathLike, data: bytes) -> bool:
    """Create ``url`` holding ``data`` only if nothing is there yet; True when this call created it.

    Two writers racing on one name: exactly one gets True. Local: the bytes go to a temp file
    (fsynced) that is hard-linked to the name (``link`` fails when the name exists) — the file
    appears whole. Object store: a PUT with ``If-None-Match: *`` (S3 since 2024, GCS and Azure
    natively, SeaweedFS, MinIO); the store answers 412 when the object exists.

    Raises:
        OSError: the store failed for another reason (after its retries).
    """
    text = _text(url)
    if not is_remote(text):
        path = Path(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    fs, path = filesystem(text)
    try:
        fs.pipe_file(path, data, mode="create")
    except OSError as exc:
        if _is_precondition_failed(exc):
            return False
        raise
    return True


def delete(url: str | os.PathLike) -> None:
    """Delete one file or object; nothing there is fine (S3 answers a DELETE of a missing key
    with success too)."""
    text = _text(url)
    if not is_remote(text):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(text)
        return
    fs, path = filesystem(text)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def delete_tree(url: str | os.PathLike) -> None:
    """Delete everything under ``url`` (a local folder, or every object with the prefix)."""
    text = _text(url)
    if not is_remote(text):
        import shutil

        shutil.rmtree(text, ignore_errors=True)
        return
    fs, path = filesystem(text)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def make_dirs(url: str | os.PathLike) -> None:
    """Create a local folder and its parents; nothing for object stores (prefixes need no creating)."""
    if not is_remote(url):
        os.makedirs(url, exist_ok=True)


def list_names(url: str | os.PathLike) -> list[str]:
    """Names directly under ``url`` (files and folders, or objects and common prefixes), sorted;
    ``[]`` when there is nothing (no folder, no object with the prefix)."""
    text = _text(url)
    if not is_remote(text):
        try:
            return sorted(os.listdir(text))
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, path = filesystem(text)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def glob(pattern: str) -> list[str]:
    """Paths or URLs matching ``pattern`` (``*`` within one component), sorted."""
    if not is_remote(pattern):
        import glob as _glob

        return sorted(_glob.glob(pattern))
    scheme = scheme_of(pattern)
    fs, path = filesystem(pattern)
    return sorted(f"{scheme}://{p}" for p in fs.glob(path))


# ---------------------------------------------------------------------------------- Parquet


def open_input(url: str | os.PathLike):
    """A seekable binary file for reading (Parquet footers, row groups): a local file, or an
    fsspec file that reads the object in ranged GETs. Use as a context manager."""
    text = _text(url)
    if not is_remote(text):
        return open(text, "rb")
    fs, path = filesystem(text)
    return fs.open(path, "rb")


def arrow_filesystem(url: str | os.PathLike):
    """``(pyarrow FileSystem, path)`` for ``pyarrow.dataset`` and ``pyarrow.parquet`` over a root:
    the local file system, or the fsspec store wrapped (``pyarrow.fs.FSSpecHandler``)."""
    import pyarrow.fs as pafs

    text = _text(url)
    if not is_remote(text):
        return pafs.LocalFileSystem(), text
    fs, path = filesystem(text)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def arrow_files(files: list[str]):
    """``(pyarrow FileSystem or None, paths)`` for ``pyarrow.dataset.dataset(paths, filesystem=…)``
    over files of one root: local paths as they are (filesystem None), object URLs without their
    scheme on the wrapped fsspec store."""
    if not files or not is_remote(files[0]):
        return None, [_text(f) for f in files]
    fs, _ = arrow_filesystem(files[0])
    return fs, [f.split("://", 1)[1] for f in files]


# --------------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing: ``key`` relative to the listed root (``/``-separated),
    ``size`` bytes, ``mtime_ns`` last-modified (ns since the epoch; stores keep whole seconds or
    milliseconds), ``version`` the store's identity of these bytes (S3/Azure ETag, with the
    S3 version id when versioning is on; GCS generation) or None."""

    key: str
    size: int | None
    mtime_ns: int | None
    version: str | None


def _mtime_ns(info: Mapping[str, Any]) -> int | None:
    for k in ("LastModified", "last_modified", "mtime", "updated", "Last-Modified"):
        v = info.get(k)
        if v is None:
            continue
        if isinstance(v, datetime):
            return int(v.timestamp() * 1_000_000) * 1000
        if isinstance(v, int | float):
            return int(v * 1_000_000_000)
        with contextlib.suppress(ValueError):
            return int(datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp() * 1_000_000) * 1000
    return None


def object_version(info: Mapping[str, Any]) -> str | None:
    """The store's identity of an object's bytes from a listing entry: ``ETag`` (quotes
    stripped), ``ETag@VersionId`` when S3 versioning gives one, GCS ``generation``, Azure
    ``etag``; None when the store gives none."""
    etag = info.get("ETag") or info.get("etag")
    etag = str(etag).strip('"') if etag else None
    vid = info.get("VersionId") or info.get("version_id")
    if etag and vid and vid != "null":
        return f"{etag}@{vid}"
    if etag:
        return etag
    gen = info.get("generation")
    return str(gen) if gen is not None else None


def list_objects(url: str | os.PathLike, recursive: bool = True) -> tuple[list[ObjectInfo], list[str]]:
    """The objects under the prefix ``url`` and, when not ``recursive``, its immediate
    sub-prefixes ("folders"). ``recursive``: one flat listing of every key under the prefix,
    paginated by the client (S3 ListObjectsV2, 1,000 keys a page). Directory markers (keys
    ending in ``/``, zero bytes) are left out.

    Returns:
        (objects with keys relative to ``url``, sorted by key; sub-prefix names, sorted).
    """
    fs, path = filesystem(url)
    base = path.rstrip("/") + "/"
    objects: list[ObjectInfo] = []
    prefixes: list[str] = []
    try:
        if recursive:
            found = fs.find(base, detail=True, withdirs=False)
            entries = found.items()
        else:
            entries = ((e["name"], e) for e in fs.ls(base, detail=True))
    except FileNotFoundError:
        return [], []
    for name, info in entries:
        if not name.startswith(base):
            continue
        rel = name[len(base):]
        if info.get("type") == "directory":
            if rel.strip("/"):
                prefixes.append(rel.strip("/"))
            continue
        if not rel or rel.endswith("/"):
            continue
        objects.append(ObjectInfo(rel, info.get("size"), _mtime_ns(info), object_version(info)))
    objects.sort(key=lambda o: o.key)
    return objects, sorted(prefixes)


def stat_object(url: str | os.PathLike) -> ObjectInfo | None:
    """One object's size, last-modified and version (a HEAD), or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        return None
    return ObjectInfo(name_of(url), info.get("size"), _mtime_ns(info), object_version(info))


def fetch_objects(urls: list[str]) -> list[concurrent.futures.Future]:
    """Start GETs of several objects of one store at once; one future per URL, in order.

    Each future's result is the object's bytes, or the exception its read ended with — after the
    client's retries with backoff, and cut at :attr:`Settings.object_timeout_s` in all
    (``TimeoutError``); a future never raises. The requests run on the client's event loop
    thread, so the caller can decode the first objects while the later ones arrive.

    This is how DataLoader workers read images: each worker process has its own client (fsspec
    builds one per process), and a batch's GETs overlap, so a slow object delays only itself.
    """
    if not urls:
        return []
    fs, _ = filesystem(urls[0])
    limit = _settings.object_timeout_s
    attempts = _settings.retries + 1
    # s3fs: one GET per object (with max_concurrency > 1 it first HEADs the object to split it into ranges)
    kwargs = {"max_concurrency": 1} if SCHEMES[scheme_of(urls[0])][0] == "s3" else {}

    async def one(path: str):
        try:
            return await asyncio.wait_for(fs._cat_file(path, **kwargs), timeout=limit)
        except TimeoutError:
            return TimeoutError(f"no complete answer within {limit:g} s ({attempts} attempts)")
        except BaseException as exc:  # handed back per object: one failure never fails the batch
            return exc

    return [asyncio.run_coroutine_threadsafe(one(u.split("://", 1)[1]), fs.loop) for u in urls]


def read_objects(urls: list[str]) -> list[bytes | BaseException]:
    """:func:`fetch_objects`, waited for: each object's bytes or the exception its read ended with."""
    return [f.result() for f in fetch_objects(urls)]


def read_files(urls: list[str]) -> list[bytes | BaseException]:
    """Whole files or objects under one root: each one's bytes, or the exception its read ended
    with (never raised). Objects are read in one batch of GETs (:func:`read_objects`), local files
    one after the other."""
    if urls and is_remote(urls[0]):
        return read_objects(urls)
    out: list[bytes | BaseException] = []
    for url in urls:
        try:
            out.append(Path(url).read_bytes())
        except OSError as exc:
            out.append(exc)
    return out


def describe_error(exc: BaseException) -> str:
    """One line for an errors row: what the store said (code and message) or the client error."""
    cause = exc.__cause__ or exc
    resp = getattr(cause, "response", None)
    if isinstance(resp, Mapping) and resp.get("Error"):
        err = resp["Error"]
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        attempts = resp.get("ResponseMetadata", {}).get("RetryAttempts")
        tail = f" after {attempts + 1} attempts" if isinstance(attempts, int) else ""
        return f"{err.get('Code')} ({status}): {err.get('Message', '')}{tail}".strip()
    return f"{type(exc).__name__}: {exc}"


def walk_order_key(key: str) -> tuple:
    """Sort key that puts object keys in the local scan's order (torchvision's): in each folder
    its files by name, then its subfolders by name, recursively — ``a/z.jpg`` before ``a/b/c.jpg``."""
    parts = key.split("/")
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)




def local_path(root: AnyPath) -> str | None:
    """The operating-system path of a local root, or of a path under one (a ``file://`` URL as its
    path), for code that opens files itself (``open``, ``os.stat``, Pillow); None for an
    object-store URL, which only the functions here read."""
    text = _text(root)
    return None if is_remote(text) else normalize_root(text)
