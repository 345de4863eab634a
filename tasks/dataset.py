"""The shard's Dataset and collate function: decode failures become records, never crashes.

``ShardDataset[i]`` returns either a :class:`Sample` (the image tensor) or a :class:`Failure`
(the entry's position, stage, error type and message). Both are plain picklable objects, so the
path and the message survive the DataLoader worker-process boundary. :func:`collate_samples`
stacks the samples and passes the failures along; no substitute sample is ever scored in place
of a broken image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from imgscore.tasks.preprocess import (
    DecodeError,
    DecodeOptions,
    PreprocessSpec,
    build_transform,
    decode_file,
)
from imgscore.tasks.scan import ImageEntry


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

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) so CUDA copies can be non-blocking."""
        if self.tensor is not None:
            self.tensor = self.tensor.pin_memory()
        return self


class ShardDataset(Dataset):
    """Map-style dataset over one shard's :class:`ImageEntry` list.

    Args:
        root: ``input.root``; entries' ``rel`` paths are relative to it.
        entries: the shard's images, in order.
        spec: the model's eval transform.
        opts: decode policy (pixel limit, EXIF).
    """

    def __init__(self, root: str, entries: list[ImageEntry], spec: PreprocessSpec, opts: DecodeOptions):
        self.root = root
        self.entries = entries
        self.spec = spec
        self.opts = opts
        self._transform = None  # built lazily, once per worker process

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, pos: int) -> Sample | Failure:
        entry = self.entries[pos]
        if entry.scan_error:
            return Failure(pos, entry.image_path, "scan", "ScanError", entry.scan_error)
        warned: list[str] = []
        path = os.path.join(self.root, entry.rel)
        try:
            decoded = decode_file(path, self.spec, self.opts, warned)
        except DecodeError as exc:
            return Failure(pos, entry.image_path, "decode", f"DecodeError.{exc.kind}", str(exc), warned)
        except Exception as exc:  # anything else Pillow raises for a hostile file: recorded, not raised
            return Failure(pos, entry.image_path, "decode", type(exc).__name__, str(exc) or repr(exc), warned)
        try:
            if self._transform is None:
                self._transform = build_transform(self.spec)
            tensor = self._transform(decoded.image)
        except Exception as exc:
            return Failure(pos, entry.image_path, "preprocess", type(exc).__name__, str(exc) or repr(exc), warned)
        return Sample(pos, tensor, warned, decoded.file_size, decoded.file_mtime_ns)


def collate_samples(items: list[Sample | Failure]) -> Batch:
    """Stack the samples of a batch; keep the failures beside them (never drop, never substitute)."""
    samples = [s for s in items if isinstance(s, Sample)]
    failures = [s for s in items if isinstance(s, Failure)]
    warnings = [w for s in items for w in s.warnings]
    tensor = torch.stack([s.tensor for s in samples]) if samples else None
    return Batch(tensor, [s.pos for s in samples], failures, warnings, {s.pos: (s.file_size, s.file_mtime_ns) for s in samples})
