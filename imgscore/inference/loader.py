"""Step 1 of a shard: the DataLoader over its images (:func:`build_loader`), with the split of
the worker's cores it runs with (:func:`loader_split`: DataLoader processes, forward threads,
batch size).

Decoding runs in DataLoader worker processes, failures travel as records, never as exceptions
(``imgscore.images.dataset``). When the split chose *lanes*, the forward runs there too, inside
each DataLoader process (:class:`LaneCollate`); only probabilities come back. Only the
DataLoader's own failures become :class:`~imgscore.errors.ShardError` (:func:`loader_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace as dc_replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from imgscore.config.scoring import InputConfig
from imgscore.errors import ShardError, ShardStopped
from imgscore.images.dataset import (
    Batch,
    Failure,
    Sample,
    ShardDataset,
    collate_per_transform,
    collate_samples,
)
from imgscore.images.entries import ImageEntry
from imgscore.images.preprocess import DecodeOptions
from imgscore.inference import autotune
from imgscore.inference.backends.forward import Forward
from imgscore.inference.device import loader_context, loader_workers
from imgscore.inference.isolation import Isolation, score_isolated
from imgscore.inference.scorer import Scorer, transform_specs
from imgscore.runtime import compat


class _JointForward(Forward):
    """For the split's measurement only: every model's forward on one probe batch, resized to
    each model's crop (float32 [B, 3, H, W] in, the first model's probabilities out)."""

    def __init__(self, scorers: list[Scorer], threads: int) -> None:
        self.fns = [(sc.forward(threads), sc.lm.preprocess.crop) for sc in scorers]
        self.channels_last, self.device = self.fns[0][0].channels_last, self.fns[0][0].device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = [
            f(x if x.shape[-1] == crop else torch.nn.functional.interpolate(x, size=(crop, crop), mode="bilinear"))
            for f, crop in self.fns
        ]
        return outs[0]


def loader_split(ds: ShardDataset, entries: list[ImageEntry], scorers: Scorer | list[Scorer]) -> autotune.Split:
    """DataLoader workers, forward threads and batch size for these images: the configured
    numbers, or ``auto`` from costs measured once per process (``imgscore.inference.autotune``),
    keyed by the models, backend, thread share, input size and the images' typical file size.
    With several models the decode measured is the shared one (all of its transforms) and the
    forward is every model's, one after another."""
    scorers = scorers if isinstance(scorers, list) else [scorers]
    scorer = scorers[0]
    inf = scorer.inference
    sizes = sorted(e.size or 0 for e in entries[:8])
    key = (
        *(sc.lm.model_id[:12] for sc in scorers),
        *(sc.lm.arch for sc in scorers),
        scorer.backend,
        inf.precision,
        scorer.threads,
        *(sc.lm.preprocess.crop for sc in scorers),
        int(math.log2(sizes[len(sizes) // 2] + 1)) if sizes else 0,
    )
    # a ShardDataset of a list of transforms yields one item per transform
    probe = _FirstTransform(ds) if ds.multi else ds
    forward_for = scorer.forward if len(scorers) == 1 else (lambda t: _JointForward(scorers, t))
    # lanes (the forward inside forked DataLoader processes): on the CPU, one model, no embeddings
    # hook, eager torch or ONNX Runtime (a one-thread ORT session starts no threads of its own, so
    # the forked copy runs as the parent's would); OpenVINO's runtime keeps threads a fork does not copy
    lanes = len(scorers) == 1 and scorer.backend in LANE_BACKENDS and scorer.device.type == "cpu" and scorer.tap is None
    return autotune.shard_split(
        probe,
        forward_for,
        scorer.threads,
        inf.num_workers,
        inf.batch_size,
        key,
        scorer.device,
        can_fork=loader_workers(1) > 0,
        lanes=lanes,
    )


class _FirstTransform:
    """A ``ShardDataset`` of several transforms seen as one model's, for the split's measurement:
    item ``i`` decoded and transformed for every model (the cost), the first transform's sample returned."""

    def __init__(self, ds: ShardDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Sample | Failure:
        item = self.ds[i]
        return item[0] if isinstance(item, tuple) else item


LANE_BACKENDS = ("torch", "onnxruntime")  # backends whose one-thread forward runs in a forked DataLoader process


class LaneCollate:
    """The DataLoader's ``collate_fn`` when the split runs lanes (``inference.num_workers: auto``,
    :mod:`imgscore.inference.autotune`): collate the batch (:func:`collate_samples`), then run the
    forward here, in the DataLoader process, with its one torch thread, under the same per-image
    isolation and non-finite check as in the scoring process (:func:`score_isolated`). The
    batch goes back with ``tensor`` None, ``scored`` = (positions, probabilities float32
    [n, C]) and ``forward_failures``; top-k and rows are made in the scoring process, as for
    every other split.

    ``fn``: the model's forward, built before the fork (the forked process shares its weights
    copy-on-write); ``max_batch``: the largest forward; ``wanted``: the positions this model
    scores (``run.skip_scored``), None for all.
    """

    def __init__(
        self, fn: Forward, max_batch: int, wanted: frozenset[int] | None = None, in_list: bool = False
    ) -> None:
        self.fn, self.max_batch, self.wanted, self.in_list = fn, max_batch, wanted, in_list

    def __call__(self, items: list[Any]) -> Batch | list[Batch]:
        """``items``: the batch's :class:`ShardDataset` items (1-tuples of them for a one-model list of scorers)."""
        if self.in_list:  # items are 1-tuples, the batch a 1-list (as collate_per_transform makes it)
            return [self.scored_batch([item[0] for item in items])] if items else []
        return self.scored_batch(items)

    def scored_batch(self, items: list[Sample | Failure]) -> Batch:
        """One spec's items → their :class:`Batch`, forwarded here."""
        b = collate_samples(items)
        if b.tensor is None:
            return b
        keep = [i for i, p in enumerate(b.positions) if self.wanted is None or p in self.wanted]
        x = b.tensor if len(keep) == len(b.positions) else b.tensor[keep]
        if self.fn.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        iso = Isolation(max_batch=self.max_batch)
        with torch.inference_mode():
            scored = score_isolated(self.fn, x, [b.positions[i] for i in keep], iso) if keep else []
        b.scored = ([p for p, _ in scored], torch.stack([t for _, t in scored]) if scored else torch.empty(0, 0))
        b.forward_failures, b.tensor = iso.failures, None
        return b


def loader_timeout(timeout_s: float, split: autotune.Split) -> float:
    """Seconds the DataLoader waits for one batch: ``inference.timeout_s``, plus, for lanes (the
    batch's forward runs in the worker, one thread), four times that forward as measured."""
    if split.lanes and split.costs is not None:
        return timeout_s + 4 * split.batch * split.costs.fwd_1
    return timeout_s


def build_loader(
    entries: list[ImageEntry],
    input_root: str,
    scorer: Scorer | list[Scorer],
    input_cfg: InputConfig,
    split: autotune.Split | None = None,
) -> tuple[DataLoader[Any], autotune.Split]:
    """A DataLoader over ``entries`` (files under ``input_root``) yielding
    :class:`~imgscore.images.dataset.Batch` — for a list of scorers, a list of them, one per
    distinct transform (:func:`transform_specs`): each image decoded once — and the split it
    uses (:func:`loader_split` unless given).

    The split's decode processes (0 inside a daemonic Dask worker), forked also inside spawned
    Dask workers (``loader_context``); ``inference.timeout_s`` per batch when there are
    workers; pinned memory for CUDA.
    """
    scorers = scorer if isinstance(scorer, list) else [scorer]
    inf = scorers[0].inference
    opts = DecodeOptions.from_input(input_cfg)
    ds = (
        ShardDataset(input_root, entries, transform_specs(scorers)[0], opts)
        if isinstance(scorer, list)
        else ShardDataset(input_root, entries, scorer.lm.preprocess, opts)
    )
    split = split or loader_split(ds, entries, scorer)
    nw = loader_workers(split.workers)
    collate: Callable[[list[Any]], Batch | list[Batch]] = (
        collate_per_transform if isinstance(scorer, list) else collate_samples
    )
    if split.lanes and nw > 0 and len(scorers) == 1:
        name = scorers[0].name
        wanted = (
            None
            if all(e.wants(name) for e in entries)
            else frozenset(i for i, e in enumerate(entries) if e.wants(name))
        )
        collate = LaneCollate(scorers[0].forward(1), split.batch, wanted, in_list=isinstance(scorer, list))
    elif split.lanes:
        split = dc_replace(split, lanes=False)  # no DataLoader processes here: the forward stays in this one
    compat.no_dataloader_sigchld_handler()  # a dead worker fails its own shard, not the run
    loader = DataLoader(
        ds,
        batch_size=split.batch,
        shuffle=False,
        num_workers=nw,
        collate_fn=collate,
        pin_memory=scorers[0].device.type == "cuda",
        timeout=loader_timeout(inf.timeout_s, split) if nw > 0 else 0,
        multiprocessing_context=loader_context(nw),
    )
    return loader, split


def loader_batches(loader: DataLoader[Any], shard_id: int, stop: Callable[[], bool] | None = None) -> Iterator[Any]:
    """The loader's batches, as its ``collate_fn`` makes them (:func:`build_loader`: a
    :class:`~imgscore.images.dataset.Batch`, or for a list of scorers a list of them, one per
    transform); what the DataLoader itself raises becomes :class:`ShardError`.
    ``stop``: asked before each batch; when it says True the shard is abandoned (:class:`ShardStopped`).

    A DataLoader raises ``RuntimeError`` when a worker process is killed (bus error from too
    little shared memory) or exits, when a batch times out, or when its pin-memory thread dies,
    and ``OSError`` when it cannot start its workers. The shard cannot be trusted as a whole
    then: nothing is committed and Prefect retries it. Only the DataLoader's own calls are
    guarded; an error in scoring code is not relabelled.
    """
    try:
        it = iter(loader)
    except (RuntimeError, OSError) as exc:
        raise ShardError(f"shard {shard_id}: DataLoader failed to start: {exc}") from exc
    while True:
        if stop is not None and stop():
            raise ShardStopped(f"shard {shard_id}: abandoned, the run is stopping")
        try:
            batch = next(it)
        except StopIteration:
            return
        except (RuntimeError, OSError) as exc:
            raise ShardError(f"shard {shard_id}: DataLoader failed: {exc}") from exc
        yield batch
