"""Objects under an object-store prefix: listings with size, last-modified and version, HEADs,
and batched GETs with retries and timeouts (what the scan and the DataLoader workers use).

The store is opened by :mod:`imgscore.io.object_store` with the settings in force; every
function here takes object-store URLs (``s3://bucket/key``), never local paths.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from imgscore.io.object_store import current_settings, filesystem, scheme_of
from imgscore.io.storage import is_remote


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


def list_objects(url: str | os.PathLike[str], recursive: bool = True) -> tuple[list[ObjectInfo], list[str]]:
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
        rel = name[len(base) :]
        if info.get("type") == "directory":
            if rel.strip("/"):
                prefixes.append(rel.strip("/"))
            continue
        if not rel or rel.endswith("/"):
            continue
        objects.append(ObjectInfo(rel, info.get("size"), _mtime_ns(info), object_version(info)))
    objects.sort(key=lambda o: o.key)
    return objects, sorted(prefixes)


def stat_object(url: str) -> ObjectInfo | None:
    """One object's size, last-modified and version (a HEAD), or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        return None
    return ObjectInfo(url.rstrip("/").rsplit("/", 1)[-1], info.get("size"), _mtime_ns(info), object_version(info))


def fetch_objects(urls: list[str]) -> list[concurrent.futures.Future[bytes | BaseException]]:
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
    settings = current_settings()
    limit = settings.object_timeout_s
    attempts = settings.retries + 1
    # s3fs: one GET per object (with max_concurrency > 1 it first HEADs the object to split it into ranges)
    kwargs = {"max_concurrency": 1} if scheme_of(urls[0]) in ("s3", "s3a") else {}

    async def one(path: str) -> bytes | BaseException:
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


def walk_order_key(key: str) -> tuple[tuple[int, str], ...]:
    """Sort key that puts object keys in the local scan's order (torchvision's): in each folder
    its files by name, then its subfolders by name, recursively — ``a/z.jpg`` before ``a/b/c.jpg``."""
    parts = key.split("/")
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


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
