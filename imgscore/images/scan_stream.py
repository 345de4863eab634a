"""The streamed scan: units scanned on threads, their record batches yielded in index order.

A scan is cut into *units* — a class folder, a top-level subfolder of a flat tree, the files
directly in the root (or, on an object store, a key prefix) — that threads scan at once
(:func:`ordered_map`); their batches are yielded unit by unit in order, so the image list, and
every shard cut from it, is the same with 1 thread or 16. :class:`Scan` walks local folders
(:mod:`imgscore.images.walk`); :class:`imgscore.images.scan_objects.ObjectScan` lists prefixes.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar, cast

import pyarrow as pa

from imgscore.images.entries import ImageEntry, entries_batch
from imgscore.images.walk import classify, walk_files
from imgscore.io.objects import ObjectInfo
from imgscore.io.storage import AnyPath

SCAN_BATCH_ROWS = 4096  # rows per RecordBatch the scan yields (its memory is a few of these)

# What a unit's scan yields: record batches of the index, then ("skipped", the unit's skipped files).
ScanItem: TypeAlias = pa.RecordBatch | tuple[str, list[dict[str, str]]]
U = TypeVar("U")
T = TypeVar("T")


@dataclass
class ScanUnit:
    """A slice of the scan that one thread scans: a class folder (or key prefix), a top-level
    subfolder of a flat tree, or the root's own files (``files``: their paths; on an object
    store ``objects``: as listed). Units in order give the index order. ``chain``: the real
    paths of the folders above ``top``."""

    top: str | None
    label: int | None
    label_name: str | None
    files: list[str] | None = None
    chain: frozenset[str] = frozenset()
    objects: list[ObjectInfo] | None = None


def batched(entries: Iterable[ImageEntry], skipped: list[dict[str, str]]) -> Iterator[ScanItem]:
    """A unit's ``entries`` as record batches of at most :data:`SCAN_BATCH_ROWS` rows, then
    ``("skipped", skipped)`` — filled while ``entries`` was consumed."""
    chunk: list[ImageEntry] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) >= SCAN_BATCH_ROWS:
            yield entries_batch(chunk)
            chunk = []
    if chunk:
        yield entries_batch(chunk)
    yield ("skipped", skipped)


@dataclass
class Scan:
    """A scan of ``input.root`` that yields its image list in order, without holding it.

    :func:`imgscore.images.scan.open_scan` decides the layout and the classes; :meth:`batches` walks the tree and
    yields :data:`INDEX_SCHEMA` record batches. The order is fixed by the tree alone: classes (or
    the root's files, then its subfolders) sorted by name, and inside each, torchvision's order
    (a folder's files sorted by name, then its subfolders). Threads scan several units at once
    but their batches are yielded unit by unit in that order, so the index — and every shard cut
    from it — is the same with 1 thread or 16. ``skipped`` fills as the walk goes; ``images`` is
    the count yielded so far.
    """

    root: AnyPath  # a folder, or an object-store URL (imgscore.images.scan_objects.ObjectScan)
    layout: str
    classes: list[str]  # display names (valid UTF-8)
    follow_symlinks: bool = True
    formats: tuple[str, ...] | None = None  # input.formats (None: the default): which extensions are images
    skipped: list[dict[str, str]] = field(default_factory=list)
    images: int = 0
    # output.root inside input.root: a local folder's real path, or (object store) its key prefix
    # relative to the root; never scanned (:func:`imgscore.images.scan.output_within_input`)
    exclude: str | None = None
    units: list[ScanUnit] = field(default_factory=list, repr=False)
    tail_skipped: list[dict[str, str]] = field(default_factory=list, repr=False)  # added after the units' own

    def scan_unit(self, unit: ScanUnit) -> Iterator[ScanItem]:
        """Yield the unit's record batches, then ``("skipped", list)``: its folder walked (or the
        root's own files) and each file classified (:func:`imgscore.images.walk.classify`)."""
        root = str(self.root)
        skipped: list[dict[str, str]] = []
        if unit.files is not None:
            walk: Iterable[str] = unit.files
        else:
            walk = walk_files(unit.top or root, self.follow_symlinks, skipped, root, unit.chain, self.exclude)
        entries = (classify(path, root, unit.label, unit.label_name, skipped, self.formats) for path in walk)
        yield from batched((e for e in entries if e is not None), skipped)

    def batches(self, threads: int = 1) -> Iterator[pa.RecordBatch]:
        """Yield the image list as record batches of at most :data:`SCAN_BATCH_ROWS` rows, in
        index order, scanning up to ``threads`` units at once.

        Memory: each unit in flight buffers at most 4 batches; a folder's names are held while
        it is listed (sorting needs them all)."""
        for item in ordered_map(self.scan_unit, self.units, threads):
            if isinstance(item, tuple):
                self.skipped.extend(item[1])
            else:
                self.images += item.num_rows
                yield item
        self.skipped.extend(self.tail_skipped)
        self.tail_skipped = []


_DONE = object()


@dataclass
class _Failed:
    exc: BaseException


def _put(q: queue.Queue[object], item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def ordered_map(work: Callable[[U], Iterable[T]], units: list[U], threads: int, depth: int = 4) -> Iterator[T]:
    """``for u in units: yield from work(u)``, with up to ``threads`` units running at once on
    threads and their items yielded in unit order; each running unit buffers ``depth`` items.

    Units start in order on a FIFO pool, so the unit being yielded always has a thread (no
    deadlock); at most ``2 * threads`` units are started ahead. An exception in ``work`` is raised
    here when its unit's turn comes; leaving the loop early stops the threads.
    """
    if threads <= 1 or len(units) <= 1:
        for u in units:
            yield from work(u)
        return
    stop = threading.Event()

    def produce(u: U, q: queue.Queue[object]) -> None:
        try:
            for item in work(u):
                if not _put(q, item, stop):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            _put(q, _Failed(exc), stop)
            return
        _put(q, _DONE, stop)

    pending: collections.deque[queue.Queue[object]] = collections.deque()
    it = iter(units)
    with ThreadPoolExecutor(threads, thread_name_prefix="imgscore-scan") as pool:

        def start_next() -> None:
            for u in it:  # the next unit, if any
                q: queue.Queue[object] = queue.Queue(depth)
                pool.submit(produce, u, q)
                pending.append(q)
                return

        for _ in range(2 * threads):
            start_next()
        try:
            while pending:
                q = pending.popleft()
                while (item := q.get()) is not _DONE:
                    if isinstance(item, _Failed):
                        raise item.exc
                    yield cast(T, item)  # what produce() put: an item of work(u)
                start_next()
        finally:
            stop.set()
