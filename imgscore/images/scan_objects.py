"""Scan an object-store prefix (``input.root=s3://bucket/images``) as :mod:`imgscore.images.scan`
scans a folder: the same ImageFolder semantics, the same order, the same index rows.

- **Layout and classes**: one delimiter listing of the root (S3 ``ListObjectsV2`` with
  ``Delimiter=/``) gives its "folders" (common prefixes) and its own objects; a class is the first
  path component under the root; ``layout=auto`` decides as for a folder (class prefixes and no
  images directly under the root → imagefolder).
- **Listing**: each class prefix (or, flat, each top-level prefix) is listed as one flat,
  paginated listing of every key under it (1,000 keys a page), and up to ``input.scan_threads``
  prefixes are listed at once (``auto``: :data:`~imgscore.images.scan.NETWORK_SCAN_THREADS`).
  Their batches are yielded prefix by prefix in order (``ordered_map``), so the index and every
  shard are the same with 1 thread or 16.
- **Order**: keys are put in the local scan's (torchvision's) order — in each "folder" its objects
  by name, then its sub-folders (:func:`~imgscore.io.objects.walk_order_key`) — so a tree
  copied to a bucket gives the same image list, shards and labels as on disk.
- **Every object accounted for**: an object under the root is an image to score, or listed in
  ``skipped`` with its reason (:func:`~imgscore.images.extensions.skip_reason`); only hidden names
  (``.DS_Store``, ``._x.jpg``, anything under a ``.``-folder) and ``__MACOSX`` appear nowhere, as
  on disk; directory markers (``key/``, zero bytes) are no objects.
- **Index rows** keep the object's size, last-modified time (as ``mtime_ns``) and its ``version``
  (ETag, ``ETag@VersionId`` with S3 versioning, GCS generation), which every prediction and
  errors row carries as ``file_version``: ``run.skip_scored`` and the failure ledger key on all
  three, so a replaced object is scored again even within the same second.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from imgscore.errors import InputError
from imgscore.images.entries import ImageEntry, note_skipped
from imgscore.images.extensions import is_hidden, skip_reason
from imgscore.images.scan_stream import Scan, ScanItem, ScanUnit, batched
from imgscore.io import object_store, objects, storage


def _hidden_key(key: str) -> bool:
    """A key with any hidden component (``.x``, ``__MACOSX``) is left out, as the local walk
    never enters hidden folders nor lists hidden files."""
    return any(is_hidden(part) for part in key.split("/"))


@dataclass
class ObjectScan(Scan):
    """A :class:`~imgscore.images.scan_stream.Scan` whose units are key prefixes of an object store.
    ``root`` is the root URL (a string)."""

    def scan_unit(self, unit: ScanUnit) -> Iterator[ScanItem]:
        """Yield the unit's record batches (index order), then ``("skipped", list)``."""
        skipped: list[dict[str, str]] = []
        root = str(self.root)
        if unit.objects is not None:
            listed = unit.objects  # the root's own objects (flat layout), already listed
            base = ""
        else:
            top = unit.top or root
            base = top[len(root) :].strip("/") + "/"
            listed, _ = objects.list_objects(top, recursive=True)
        left_out = self.exclude + "/" if self.exclude else None  # output.root's prefix under the root

        def images() -> Iterator[ImageEntry]:
            shown = (o for o in listed if not _hidden_key(o.key))
            for obj in sorted(shown, key=lambda o: objects.walk_order_key(o.key)):
                rel = base + obj.key
                if left_out is not None and rel.startswith(left_out):
                    continue
                why = skip_reason(rel, self.formats)
                if why is not None:
                    note_skipped(skipped, rel, why)
                    continue
                yield ImageEntry(rel, unit.label, unit.label_name, obj.size, obj.mtime_ns, version=obj.version)

        yield from batched(images(), skipped)


def _refuse_listing(root: str, exc: BaseException) -> InputError:
    return InputError(
        f"input.root {root!r} cannot be listed ({objects.describe_error(exc)}); check the bucket name and the "
        "credentials this machine finds (AWS_ACCESS_KEY_ID/AWS_PROFILE, AWS_ENDPOINT_URL, "
        "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)"
    )


def open_object_scan(
    root: str, layout: str = "auto", formats: tuple[str, ...] | list[str] | None = None, exclude: str | None = None
) -> ObjectScan:
    """Check the prefix ``root`` and decide the layout and classes; keys are listed in
    :meth:`ObjectScan.batches`. ``exclude``: the key prefix (relative to ``root``) of
    ``output.root`` inside it, never scanned (:func:`imgscore.images.scan.output_within_input`).

    Raises:
        InputError: the bucket does not exist (named, with the endpoint), the prefix holds no
            object (the URL is wrong or empty), or cannot be listed (access denied: the store's
            answer is in the message).
    """
    try:
        top, prefixes = objects.list_objects(root, recursive=False)
    except (OSError, ValueError) as exc:
        raise _refuse_listing(root, exc) from None
    classes = [p for p in prefixes if not is_hidden(p) and p != exclude]
    top_files = [o for o in top if not is_hidden(o.key)]
    if not classes and not top_files and not prefixes and not top:
        if (why := object_store.missing_bucket(root, "input.root")) is not None:
            raise InputError(why)
        raise InputError(
            f"input.root {root!r} holds no objects; check the bucket and prefix (keys are listed under "
            f"{root.rstrip('/')}/)"
        )
    formats = tuple(formats) if formats is not None else None
    if layout == "auto":
        layout = (
            "imagefolder" if classes and all(skip_reason(o.key, formats) is not None for o in top_files) else "flat"
        )
    scan = ObjectScan(root=root, layout=layout, classes=[], formats=formats, exclude=exclude)
    if layout == "imagefolder":
        scan.classes = list(classes)
        scan.units = [ScanUnit(storage.join(root, c), i, c) for i, c in enumerate(classes)]
        tail: list[dict[str, str]] = []
        for o in top_files:
            why = skip_reason(o.key, formats) or "image outside any class folder (layout=imagefolder)"
            note_skipped(tail, o.key, why)
        scan.tail_skipped = tail
    else:
        scan.units = [ScanUnit(None, None, None, objects=top_files)]
        scan.units += [ScanUnit(storage.join(root, d), None, None) for d in classes]
    return scan


def object_entry(root: str, rel: str, label: int | None, label_name: str | None) -> ImageEntry:
    """The index entry of the object ``rel`` under ``root`` as it is now (a HEAD: size,
    last-modified, version); one that is gone gets a ``scan_error``."""
    info = objects.stat_object(storage.join(root, rel))
    if info is None:
        return ImageEntry(rel, label, label_name, None, None, scan_error="object not found: deleted since the scan")
    return ImageEntry(rel, label, label_name, info.size, info.mtime_ns, version=info.version)
