"""The shard's Dataset and collate function: decode failures become records, never crashes.

``ShardDataset[i]`` returns either a :class:`Sample` (the image tensor) or a :class:`Failure`
(the entry's position, stage, error type and message). Both are plain picklable objects, so the
path and the message survive the DataLoader worker-process boundary. :func:`collate_samples`
stacks the samples and passes the failures along; no substitute sample is ever scored in place
of a broken image.

With an object-store ``input.root`` the bytes are read here too, inside the DataLoader worker
processes (each has its own client: :func:`imgscore.io.objects.read_objects`), a batch's GETs
at once (:meth:`ShardDataset.__getitems__`, which the DataLoader calls with a whole batch of
positions). A GET that still fails after the client's retries, or does not finish within the
storage timeout, is a :class:`Failure` of that image (``ObjectReadError``; a missing object is
``DecodeError.unreadable``, as a missing file) — the batch and the shard go on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypeAlias, cast

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from imgscore.images.decode import DecodedImage, decode_bytes, decode_file
from imgscore.images.entries import ImageEntry
from imgscore.images.preprocess import DecodeError, DecodeOptions, PreprocessSpec, build_transform
from imgscore.io import object_store, objects, storage


@dataclass
class Sample:
    """A decoded image: ``tensor`` float32 [3, crop, crop]; ``pos`` indexes the shard's entries;
    ``file_size`` (bytes) and ``file_mtime_ns`` describe the file as it was decoded (it may have
    been replaced since the scan)."""

    pos: int
    tensor: torch.Tensor
    warnings: list[str] = field(default_factory=list)
    file_size: int | None = None
    file_mtime_ns: int | None = None


@dataclass
class Failure:
    """An image that could not be prepared; ``stage`` is scan, decode or preprocess.

    ``image_path`` (the entry's display path) travels with the record, so the errors row names
    the file even when the failure was built in a DataLoader worker process.
    """

    pos: int
    image_path: str
    stage: str
    error_type: str
    message: str
    warnings: list[str] = field(default_factory=list)


# What ShardDataset yields for one image and one transform.
Item: TypeAlias = Sample | Failure


@dataclass
class Batch:
    """What the DataLoader yields: ``tensor`` float32 [B, 3, crop, crop] (None if every image
    failed), ``positions`` the B entry positions in order, ``failures`` the rest of the batch,
    ``file_stats`` position → (size bytes, mtime ns) of each decoded file."""

    tensor: torch.Tensor | None
    positions: list[int]
    failures: list[Failure]
    warnings: list[str]
    file_stats: dict[int, tuple[int | None, int | None]] = field(default_factory=dict)
    # Set when the forward already ran in the DataLoader process (lanes; ``tensor`` is None then):
    # the scored positions and their probabilities float32 [n, C], and the images whose forward
    # failed as (position, error type, message).
    scored: tuple[list[int], torch.Tensor] | None = None
    forward_failures: list[tuple[int, str, str]] = field(default_factory=list)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) so CUDA copies can be non-blocking."""
        if self.tensor is not None:
            self.tensor = self.tensor.pin_memory()
        return self


def decode_spec(specs: list[PreprocessSpec]) -> PreprocessSpec:
    """The spec one shared decode of ``specs`` runs with: their decode settings (equal by
    :func:`decode_key`) and the largest ``resize``, so a JPEG's draft (DCT-domain downscale,
    ``preprocess.jpeg_draft``) keeps enough pixels for the model that resizes least. Each
    model's own resize, crop and normalisation then run on that one decoded image."""
    return replace(specs[0], resize=max(s.resize for s in specs))


def decode_key(spec: PreprocessSpec) -> PreprocessSpec:
    """What decoding depends on besides the draft size: ``spec`` with the transform's fields
    (resize, crop, mean, std, interpolation) at their defaults. Specs with equal keys share one decode."""
    return replace(
        spec,
        resize=PreprocessSpec.resize,
        crop=PreprocessSpec.crop,
        mean=PreprocessSpec.mean,
        std=PreprocessSpec.std,
        interpolation=PreprocessSpec.interpolation,
    )


class ShardDataset(Dataset[Item | tuple[Item, ...]]):
    """Map-style dataset over one shard's :class:`ImageEntry` list.

    Args:
        root: ``input.root`` (a folder or an object-store URL); entries' ``rel`` paths are relative to it.
        entries: the shard's images, in order.
        spec: the model's eval transform; or a list of distinct transforms (several models):
            each image is then read once, decoded once per distinct :func:`decode_key` (drafted
            for the largest resize, :func:`decode_spec`) and transformed once per spec.
        opts: decode policy (pixel limit, EXIF).
        settings: the object-store settings (retries, timeouts, options) the worker processes
            read with; default: those in force in the process that builds the dataset.

    ``ds[i]`` is a :class:`Sample` or a :class:`Failure` for one spec; for a list, a tuple of
    them in the list's order (collate with :func:`collate_per_transform`).
    """

    def __init__(
        self,
        root: str,
        entries: list[ImageEntry],
        spec: PreprocessSpec | list[PreprocessSpec],
        opts: DecodeOptions,
        settings: object_store.Settings | None = None,
    ) -> None:
        self.root = str(root)
        self.entries = entries
        self.multi = isinstance(spec, list)
        self.specs: list[PreprocessSpec] = list(spec) if isinstance(spec, list) else [spec]
        self.spec = self.specs[0]
        self.opts = opts
        self.local_root = storage.local_path(self.root)  # None for an object store: its bytes are fetched here
        self.settings = settings or object_store.current_settings()
        groups: dict[PreprocessSpec, list[int]] = {}
        for i, sp in enumerate(self.specs):
            groups.setdefault(decode_key(sp), []).append(i)
        self._decodes = [(decode_spec([self.specs[i] for i in idx]), idx) for idx in groups.values()]
        self._transforms: list[T.Compose | None] | None = None  # built lazily, once per worker process

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, pos: int) -> Item | tuple[Item, ...]:
        return self.__getitems__([pos])[0]

    def __getitems__(self, positions: Sequence[int]) -> list[Item | tuple[Item, ...]]:
        """The samples of a batch, in order. An object store's images are all requested at once
        (their GETs overlap) and decoded one by one as they arrive; local files are opened one by one."""
        if self.local_root is not None:
            return [self._prepare(p, None) for p in positions]
        if object_store.current_settings() != self.settings:  # a worker process started by spawn
            object_store.configure(self.settings)
        wanted = [p for p in positions if not self.entries[p].scan_error]
        fetching = dict(
            zip(
                wanted,
                objects.fetch_objects([storage.join(self.root, self.entries[p].rel) for p in wanted]),
                strict=True,
            )
        )
        # decoded in order as they arrive: the later GETs go on while the first images decode
        return [self._prepare(p, fetching[p].result() if p in fetching else None) for p in positions]

    def _read_failure(self, pos: int, exc: BaseException) -> Failure:
        """The record of an object whose GET failed (or that no longer exists)."""
        entry = self.entries[pos]
        url = storage.join(self.root, entry.rel)
        if isinstance(exc, FileNotFoundError):
            return Failure(
                pos,
                entry.image_path,
                "decode",
                "DecodeError.unreadable",
                f"cannot read object {url}: it no longer exists",
            )
        return Failure(
            pos, entry.image_path, "decode", "ObjectReadError", f"GET {url} failed: {objects.describe_error(exc)}"
        )

    def _decode(self, pos: int, data: bytes | None, warned: list[str], spec: PreprocessSpec) -> DecodedImage:
        """Image ``pos`` decoded with ``spec``: from ``data`` (an object's bytes), or from its file
        under a local root when ``data`` is None."""
        entry = self.entries[pos]
        if data is not None:
            return decode_bytes(data, entry.image_path, spec, self.opts, warned)
        if self.local_root is None:
            raise ValueError(f"{self.root} is an object store: its images are decoded from the bytes fetched")
        return decode_file(os.path.join(self.local_root, entry.rel), spec, self.opts, warned)

    def _prepare(self, pos: int, data: bytes | BaseException | None) -> Item | tuple[Item, ...]:
        """One image for every spec: scan error, read failure, decode failure, preprocess
        failure, or a sample — a :class:`Sample` or :class:`Failure`, or a tuple of them (one per
        spec) for a list of specs. ``data``: the object's bytes (or its read's exception) for a
        store; None for a file (read once per distinct decode setting)."""
        entry = self.entries[pos]
        out: list[Item | None] = [None] * len(self.specs)
        if entry.scan_error:
            out = [Failure(pos, entry.image_path, "scan", "ScanError", entry.scan_error) for _ in self.specs]
        elif isinstance(data, BaseException):
            out = [self._read_failure(pos, data) for _ in self.specs]
        else:
            for dspec, idx in self._decodes:
                self._prepare_group(pos, data, dspec, idx, out)
        items = cast(list[Item], out)  # every spec's slot is filled above
        return tuple(items) if self.multi else items[0]

    def _transform(self, i: int) -> T.Compose:
        """Spec ``i``'s transform, built once per process (a DataLoader worker builds its own)."""
        if self._transforms is None:
            self._transforms = [None] * len(self.specs)
        tf = self._transforms[i]
        if tf is None:
            tf = self._transforms[i] = build_transform(self.specs[i])
        return tf

    def _prepare_group(
        self, pos: int, data: bytes | None, dspec: PreprocessSpec, idx: list[int], out: list[Item | None]
    ) -> None:
        """Decode the image once with ``dspec`` and fill ``out[i]`` for each spec ``i`` of ``idx``."""
        entry = self.entries[pos]
        warned: list[str] = []
        fail: tuple[str, str, str] | None
        try:
            decoded = self._decode(pos, data, warned, dspec)
        except DecodeError as exc:
            fail = ("decode", f"DecodeError.{exc.kind}", str(exc))
        except Exception as exc:  # anything else Pillow raises for a hostile file: recorded, not raised
            fail = ("decode", type(exc).__name__, str(exc) or repr(exc))
        else:
            fail = None
        for n, i in enumerate(idx):
            w = warned if n == 0 else []  # a decode's warnings are counted once, with its first spec
            if fail is not None:
                out[i] = Failure(pos, entry.image_path, *fail, w)
                continue
            try:
                tensor = self._transform(i)(decoded.image)
            except Exception as exc:
                out[i] = Failure(pos, entry.image_path, "preprocess", type(exc).__name__, str(exc) or repr(exc), w)
                continue
            if data is None:
                out[i] = Sample(pos, tensor, w, decoded.file_size, decoded.file_mtime_ns)
                continue
            # an object: the scan's last-modified (and version) describe the bytes when the size agrees;
            # otherwise the object was replaced since the scan, and its row must not match it later
            same = decoded.file_size == entry.size
            out[i] = Sample(pos, tensor, w, decoded.file_size, entry.mtime_ns if same else None)


def collate_samples(items: list[Sample | Failure]) -> Batch:
    """Stack the samples of a batch; keep the failures beside them (never drop, never substitute)."""
    samples = [s for s in items if isinstance(s, Sample)]
    failures = [s for s in items if isinstance(s, Failure)]
    warnings = [w for s in items for w in s.warnings]
    tensor = torch.stack([s.tensor for s in samples]) if samples else None
    return Batch(
        tensor, [s.pos for s in samples], failures, warnings, {s.pos: (s.file_size, s.file_mtime_ns) for s in samples}
    )


def collate_per_transform(items: list[tuple[Item, ...]]) -> list[Batch]:
    """A batch of :class:`ShardDataset` items for several specs (tuples) → one :class:`Batch`
    per spec, in the specs' order, each as :func:`collate_samples` makes it."""
    return [collate_samples([item[i] for item in items]) for i in range(len(items[0]))] if items else []
