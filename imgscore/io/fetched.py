"""A file named by a local path, an object-store URL or an http(s) URL, as a local file: a remote
one fetched once per machine into a cache keyed by the object's identity, checked by sha256.

What it is for: ``model.checkpoint`` on the bucket the images are on (or a web server), read by
every Dask worker without copying it to each machine by hand.

- **Identity.** What the store says these bytes are: S3 ``ETag`` (``ETag@VersionId`` when the
  bucket is versioned), GCS generation, Azure ETag; over http(s) the ``ETag``, else
  ``Last-Modified`` and the size. A changed object has a new identity, so it is never a stale hit.
- **Cache entry.** ``CACHE/<sha256(url + identity)>/<file name>`` plus ``<file name>.sha256`` (the
  hex of the bytes, written after they were hashed). A hit is a file whose sha256 is the one
  recorded; anything else is fetched again.
- **Concurrency.** One fetch per cache entry: threads and processes of a machine that miss at once
  wait on the entry's lock file (``filelock``, an ``flock`` on POSIX) and find the file the first
  one fetched. Bytes go to a temporary file in the entry's folder and are renamed over the final
  name (one ``rename``, atomic on POSIX), so a reader never sees a torn file, even without the lock
  (a cache folder on a filesystem where ``flock`` is a no-op).
- **Pinning.** A :class:`Pin` (identity + sha256, resolved once for a run) must be what is loaded:
  a store whose object changed serves the pinned S3 version when versioning kept it, else the
  fetch is refused; bytes that hash differently are refused. A pin without an identity (written by
  hand: only the sha256) checks the bytes only.

Why urllib for http(s) and not fsspec's http filesystem: fsspec's needs aiohttp, which is not a
dependency of imgscore; a checkpoint is one GET (and one HEAD), which the standard library does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from imgscore.errors import ModelError
from imgscore.io import file_ops, object_store, objects, registry

_HTTP = ("http://", "https://")
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/imgscore`` (``~/.cache/imgscore`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgscore"


def cache_root(cache_dir: Path | None) -> Path:
    """The local folder exports, ``auto``'s measurements and fetched checkpoints (``models/``) are
    cached in: ``inference.cache_dir`` (``~`` expanded), else :func:`default_cache_dir`."""
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()).absolute()


@dataclass(frozen=True)
class Pin:
    """The bytes a run loads: the store's identity of them and their sha256 hex."""

    identity: str
    sha256: str

    def text(self) -> str:
        """``'SHA256 IDENTITY'`` (``model.checkpoint_pin``)."""
        return f"{self.sha256} {self.identity}".strip()

    @classmethod
    def parse(cls, text: str) -> Pin:
        """``'SHA256 IDENTITY'`` or ``'SHA256'`` alone (any identity, these bytes)."""
        sha, _, identity = text.strip().partition(" ")
        return cls(identity=identity.strip(), sha256=sha.lower())


@dataclass(frozen=True)
class LocalCopy:
    """A source as a local file: ``path`` to read, ``url`` as configured, ``identity`` (None for
    a local file), ``sha256`` hex when it was fetched (else None: the caller hashes local files),
    ``classes``: the class-names file that came with it."""

    path: Path
    url: str
    identity: str | None = None
    sha256: str | None = None
    classes: Path | None = None  # a classes.txt that came with an MLflow model or run artifact


def is_fetched(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` is an object-store, http(s) or MLflow URL (fetched into the cache), not a local path."""
    text = os.fspath(source)
    return text.startswith(_HTTP) or registry.is_registry(text) or object_store.scheme_of(text) is not None


def identity_of(url: str, key: str, registry_uri: str | None = None) -> str:
    """The source's current identity (one HEAD; for an MLflow alias, the version it names now).

    Raises:
        ModelError: the object, bucket or page does not exist, access is denied, the store fails;
            for MLflow URIs as :func:`imgscore.io.registry.resolve`.
    """
    if registry.is_registry(url):
        return registry.resolve(url, registry_uri, key)
    if url.startswith(_HTTP):
        with _http(url, "HEAD", key) as resp:
            etag = resp.headers.get("ETag")
            if etag:
                return etag.strip('"')
            return f"{resp.headers.get('Last-Modified', '')}|{resp.headers.get('Content-Length', '')}"
    if (why := object_store.missing_bucket(url, key)) is not None:
        raise ModelError(f"{key} {url!r}: {why}")
    try:
        info = objects.stat_object(url)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{key} {url!r} cannot be read here ({objects.describe_error(exc)}); check the credentials this "
            "machine finds (AWS_*, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)"
        ) from None
    if info is None:
        raise ModelError(f"{key} {url!r} does not exist; upload the checkpoint there or fix {key}")
    return info.version or f"{info.mtime_ns}|{info.size}"


def local_copy(
    source: str | os.PathLike[str],
    cache_dir: Path,
    key: str,
    pin: Pin | None = None,
    registry_uri: str | None = None,
) -> LocalCopy:
    """``source`` as a local file: a local path as it is; a URL from the cache, fetched on a miss.
    An MLflow URI is fetched at the pinned version when pinned (an alias that moved since is not
    asked), else at the version its alias names now.

    Raises:
        ModelError: as :func:`identity_of`; the object changed since ``pin`` and the store keeps no
            older version (named: URL, expected identity and sha256); fetched bytes whose sha256
            is not the pinned one.
    """
    url = os.fspath(source)
    if not is_fetched(url):
        if pin is None or not Path(url).is_file():
            return LocalCopy(Path(url), url)
        return _checked(LocalCopy(Path(url), url, None, file_ops.sha256_of_file(Path(url))), pin, key)  # a hand-set pin
    if registry.is_registry(url):
        identity = pin.identity if pin is not None and pin.identity else registry.resolve(url, registry_uri, key)
        return _checked(_registry_copy(url, identity, registry_uri, cache_dir, key), pin, key)
    current = identity_of(url, key)
    identity, version_id = current, None
    if pin is not None and pin.identity and pin.identity != current:
        version_id = _kept_version(url, pin)
        if version_id is None:
            raise ModelError(
                f"{key} {url!r} changed since the run was planned (expected identity {pin.identity}, sha256 "
                f"{pin.sha256}; now {current}) and the store keeps no older version; restore that object, or "
                "start a new run with `imgscore run`"
            )
        identity = pin.identity
    entry = cache_dir / hashlib.sha256(f"{url}\n{identity}".encode()).hexdigest()[:32]
    final = entry / (url.rstrip("/").rsplit("/", 1)[-1] or "checkpoint")
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry / ".lock")):  # the first of the machine's threads/processes fetches, the rest find it
        sha = _cached_sha(final)
        if sha is None:
            sha = _download(url, final, key, version_id)
            if version_id is None and identity_of(url, key) != identity:  # replaced between the HEAD and the GET
                for p in (final, final.with_name(final.name + ".sha256")):
                    p.unlink(missing_ok=True)
                raise ModelError(f"{key} {url!r} changed while it was being fetched; run again once it is uploaded")
    return _checked(LocalCopy(final, url, identity, sha), pin, key)


def _checked(copy: LocalCopy, pin: Pin | None, key: str) -> LocalCopy:
    """``copy``, when its bytes are the pinned ones (or nothing is pinned)."""
    if pin is not None and copy.sha256 != pin.sha256:
        raise ModelError(
            f"{key} {copy.url!r} (identity {copy.identity}) has sha256 {copy.sha256}, not the {pin.sha256} the run "
            "was planned with; this shard scores nothing: restore it, or start a new run with `imgscore run`"
        )
    return copy


def _registry_copy(url: str, identity: str, registry_uri: str | None, cache_dir: Path, key: str) -> LocalCopy:
    """An MLflow model version or run artifact in the cache: ``CACHE/<key>/artifacts/…`` plus
    ``entry.json`` (the checkpoint's and classes file's paths in it, and the checkpoint's sha256),
    written last, so an entry without it is refetched. Keyed by registry and resolved identity:
    ``@champion`` and the version it names share one entry."""
    where = registry.effective_uri(registry_uri)  # two registries may both have a models:/defects/3
    entry = cache_dir / hashlib.sha256(f"{where}\n{identity}".encode()).hexdigest()[:32]
    entry.mkdir(parents=True, exist_ok=True)
    record = entry / "entry.json"
    with FileLock(str(entry / ".lock")):
        try:
            got = json.loads(record.read_text())
            ckpt = entry / got["checkpoint"]
            if ckpt.is_file() and file_ops.sha256_of_file(ckpt) == got["sha256"]:
                classes = entry / got["classes"] if got.get("classes") else None
                return LocalCopy(ckpt, url, identity, got["sha256"], classes)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no entry yet, or a torn or stale one: fetched again
        shutil.rmtree(entry / "artifacts", ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=entry))
        try:
            local = registry.download(identity, registry_uri, tmp / "artifacts", key)
            ckpt, classes = registry.checkpoint_in(local, key, url)
            os.replace(tmp / "artifacts", entry / "artifacts")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ckpt = entry / "artifacts" / ckpt.relative_to(tmp / "artifacts")
        classes = entry / "artifacts" / classes.relative_to(tmp / "artifacts") if classes is not None else None
        sha = file_ops.sha256_of_file(ckpt)
        rel = {"checkpoint": str(ckpt.relative_to(entry)), "sha256": sha}
        rel["classes"] = str(classes.relative_to(entry)) if classes is not None else ""
        fd, side = tempfile.mkstemp(prefix=".entry.", dir=entry)
        with os.fdopen(fd, "w") as f:
            json.dump(rel, f)
        os.replace(side, record)
        return LocalCopy(ckpt, url, identity, sha, classes)


def _kept_version(url: str, pin: Pin) -> str | None:
    """The S3 version id in ``pin``'s identity (``ETag@VersionId``) when the store still serves it."""
    if object_store.scheme_of(url) not in ("s3", "s3a") or "@" not in pin.identity:
        return None
    vid = pin.identity.rsplit("@", 1)[1]
    fs, path = _version_aware(url)
    try:
        fs.info(path, version_id=vid)
    except (OSError, ValueError):
        return None
    return vid


def _version_aware(url: str) -> tuple[Any, str]:
    """An s3fs filesystem that takes ``version_id`` (s3fs refuses it on the shared instance, which
    is not version-aware: listing versions costs every other call), and the path in it."""
    fs, path = object_store.filesystem(url)
    return type(fs)(**object_store.options_for(url), version_aware=True), path


def _cached_sha(final: Path) -> str | None:
    """The sha256 of a whole cache entry (its bytes hash to the recorded value), else None."""
    side = final.with_name(final.name + ".sha256")
    try:
        recorded = side.read_text().strip()
    except OSError:
        return None
    if not final.is_file() or file_ops.sha256_of_file(final) != recorded:
        return None
    return recorded


def _download(url: str, final: Path, key: str, version_id: str | None) -> str:
    """GET ``url`` into a temporary file beside ``final``, hash it, rename it over ``final`` and
    write its ``.sha256``; returns the hex."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in _chunks(url, key, version_id):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sha = h.hexdigest()
    fd, side_tmp = tempfile.mkstemp(prefix=f".{final.name}.sha256.", dir=final.parent)  # unique per thread too
    with os.fdopen(fd, "w") as side:
        side.write(sha + "\n")
    os.replace(side_tmp, final.with_name(final.name + ".sha256"))
    return sha


def _chunks(url: str, key: str, version_id: str | None):
    if url.startswith(_HTTP):
        with _http(url, "GET", key) as resp:
            while chunk := resp.read(_CHUNK):
                yield chunk
        return
    fs, path = _version_aware(url) if version_id else object_store.filesystem(url)
    kwargs = {"version_id": version_id} if version_id else {}
    try:
        with fs.open(path, "rb", **kwargs) as f:
            while chunk := f.read(_CHUNK):
                yield chunk
    except FileNotFoundError:
        raise ModelError(f"{key} {url!r} does not exist; upload the checkpoint there or fix {key}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{key} {url!r} could not be read here ({objects.describe_error(exc)})") from None


def _http(url: str, method: str, key: str):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise ModelError(f"{key} {url!r} does not exist (HTTP 404); fix the URL in {key}") from None
        raise ModelError(f"{key} {url!r} answered HTTP {exc.code} {exc.reason}; fix the URL or the server") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ModelError(f"{key} {url!r} cannot be reached ({exc}); check the URL and the network") from None
