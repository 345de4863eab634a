"""Opening an object store: URL schemes, the ``storage.*`` settings, one fsspec filesystem per process.

:mod:`imgscore.io.storage` is the layer callers use; this module is what it stands on for
``s3://``, ``gs://`` and ``az://`` roots (listings and batched GETs: :mod:`imgscore.io.objects`).

Why fsspec (with s3fs, gcsfs, adlfs) and not ``pyarrow.fs`` or obstore: it is the layer the
analytics readers already use (pandas, polars, Dask and DuckDB take fsspec ``storage_options``),
so ``storage.options`` means the same thing to imgscore and to whoever reads its Parquet; its
S3 client is botocore, which reads the whole AWS credential chain (``AWS_ACCESS_KEY_ID`` …,
``AWS_PROFILE`` and ``~/.aws/config``, ``AWS_ENDPOINT_URL``, container and instance roles) and
retries throttling and 5xx answers with backoff (``retries: mode standard``); it creates objects
conditionally (``If-None-Match: *``, :func:`imgscore.io.storage.create_new`); and it keeps one client per process
after a fork (fsspec clears its instance cache in a child), which is what DataLoader worker
processes need. ``pyarrow.fs`` has no conditional put and no Azure/GCS URL parity with the
readers' options; obstore has conditional puts but no ``AWS_PROFILE`` without boto3 and would
be a second client beside the one the readers use. fsspec itself is already installed with
torch; s3fs, gcsfs and adlfs are the optional extras ``imgscore[s3]``, ``[gcs]`` and ``[azure]``
— a local run imports none of them.

Settings (``storage.*`` in the config) are put in force for a process by :func:`configure`;
options never hold secrets (:func:`check_options`): credentials come from each machine's own
environment, or from ``${VAR}`` references that are expanded on the machine that opens the store.
"""

from __future__ import annotations

import os
import re
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from upath import UPath

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

# A root or a path under one, as this module reads it (imgscore.io.storage.AnyPath).
_Where = str | os.PathLike[str] | UPath

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
_SECRET_NAME = re.compile(
    r"(^|_)(key|secret|token|password|passwd|sas|signature)$|secret|password|credential|connection_string", re.I
)
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_TOKEN_WORDS = frozenset({"anon", "cloud", "google_default", "browser"})  # gcsfs token modes, not secrets


def credential_in_url(url: str) -> str | None:
    """What in ``url`` is a credential, named without its value (``'a user name or password …'``,
    ``"the query parameter 'X-Amz-Signature'"``), else None: a presigned or SAS URL, or one with a
    password in it, would be recorded wherever the config is (manifest, Parquet metadata, flow-run
    parameters)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password or (parts.username and parts.scheme.lower() in ("http", "https")):
        return "a user name or password before the host (user:password@ or token@)"
    for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        flat = name.replace("-", "_")
        if _SECRET_NAME.search(flat) or flat.lower() in ("sig", "code", "auth", "x_goog_signature"):
            return f"the query parameter {name!r}"
    return None


def _text(p: _Where) -> str:
    """A path or URL as a string: a remote ``UPath``'s URL (``os.fspath`` refuses one), a local
    path's text."""
    return str(p) if isinstance(p, UPath) else os.fspath(p)


def scheme_of(root: _Where) -> str | None:
    """The URL scheme of ``root`` (``s3``, ``gs``, ``az``, …), or None for a local path
    (a ``file://`` URL included)."""
    m = _URL.match(str(root))
    if m is None or m.group(1).lower() == "file":
        return None
    return m.group(1).lower()


def _protocol(url: _Where) -> str:
    """The fsspec protocol of an object-store URL (``s3``, ``gs``, ``az``, ``abfs``).

    Raises:
        ValueError: ``url`` is a local path, or its scheme is not one of :data:`SCHEMES`.
    """
    scheme = scheme_of(url)
    if scheme is None or scheme not in SCHEMES:
        raise ValueError(f"{_text(url)!r} is not an object-store URL")
    return SCHEMES[scheme][0]


def options_for(url: _Where) -> dict[str, Any]:
    """The fsspec storage options an object-store URL is opened with (client defaults, then
    ``storage.options`` expanded): what :func:`filesystem` passes to the filesystem class."""
    return _deep_merge(_client_defaults(_protocol(url), _settings), _expand(dict(_settings.options), "storage.options"))


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
    def of(
        cls,
        options: Mapping[str, Any] | None = None,
        retries: int = 4,
        read_timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
    ) -> Settings:
        """Settings from the config's ``storage.*`` values (``options`` as a mapping)."""
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
    """The settings in force in this process (:func:`configure`)."""
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
            f"{dotted} looks like a credential; secrets are never written in the config (it is recorded in the "
            "manifest and Parquet metadata): leave it to the standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            f"AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_KEY, …) or write {name}: ${{SOME_ENV_VAR}}"
        )


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, str) and (m := _ENV_REF.match(value)):
        var = m.group(1)
        if var not in os.environ:
            raise ValueError(
                f"{where} refers to ${{{var}}}, which is not set in this environment; export {var} on every machine of "
                "the run"
            )
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


_filesystems: dict[tuple[str, Settings, int, int], AbstractFileSystem] = {}
_client_env: dict[str, int] = {}  # protocol -> the environment fingerprint its cached clients were made with
# Environment variables a client reads when it is created: a store is reopened when they change.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_CONNECTION_STRING",
)


def filesystem(root: _Where) -> tuple[AbstractFileSystem, str]:
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
            # imgscore.io.storage.path builds with the same options gets this very instance as its ``.fs``
            fs = cls(**options_for(text))
            if protocol == "s3":
                fs.retries = 1  # s3fs's own retry loop off: botocore's standard mode retries (above)
            _filesystems[key] = fs
    return fs, text.split("://", 1)[1]


def missing_package(root: _Where | None) -> str | None:
    """The pip line a root needs and lacks (``pip install 'imgscore[s3]'``), or None."""
    if root is None or (scheme := scheme_of(root)) is None:
        return None
    _, package, extra = SCHEMES[scheme]
    try:
        __import__(package)
    except ModuleNotFoundError:
        return f"{_text(root)!r} needs {package}: pip install 'imgscore[{extra}]'"
    return None


def bucket_of(url: _Where) -> str:
    """The bucket (S3, GCS) or container (Azure) an object-store URL names: ``s3://b/p`` → ``b``."""
    return _text(url).split("://", 1)[1].strip("/").split("/", 1)[0]


def endpoint_of(url: _Where) -> str:
    """Where this process sends the requests for ``url``'s store: the S3 endpoint the client
    resolved (``AWS_ENDPOINT_URL``, ``storage.options.endpoint_url``, or AWS's regional one), else
    the scheme (``gs://``, ``az://``: their clients have one service address per account)."""
    fs, _ = filesystem(url)
    client = getattr(fs, "s3", None)  # s3fs's botocore client, made on the first request
    return getattr(getattr(client, "meta", None), "endpoint_url", None) or f"{scheme_of(url)}://"


def missing_bucket(url: _Where, key: str) -> str | None:
    """The refusal for a root whose bucket does not exist (one request: the bucket's HEAD), or
    None: a local root, a bucket that exists, or a store that did not say it is missing (access
    denied, a network error: left to the caller's own check, whose message carries the store's
    answer). ``key`` names the setting in the message (``input.root``, ``output.root``).

    Why it is asked: a listing of a missing bucket answers nothing, which reads as an empty
    prefix ("holds no objects"), and some stores create a bucket on the first PUT into it.
    """
    if scheme_of(url) is None:
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


def is_precondition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is a store's 412 answer to ``If-None-Match: *`` (the object exists).
    s3fs raises FileExistsError only when the answer names the condition; SeaweedFS and MinIO
    answer ``PreconditionFailed`` without it (s3fs then raises OSError with the cause attached)."""
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__ or exc.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "ConditionNotMet", "BlobAlreadyExists") or "pre-condition" in str(exc).lower()
