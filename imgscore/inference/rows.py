"""Step 2 of a shard: the loader's batches through every model's forward, with per-image
isolation, each (image, model) pair turned into exactly one row — a predictions row or an
errors row (:func:`prediction_row`, :func:`error_row`: the only places rows are built).

Several models score one decode: each is a :class:`ModelPass` over the same batches
(:func:`score_passes`); one model is the one-pass case (:func:`score_batches`).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from imgscore.images.dataset import Batch
from imgscore.images.entries import ImageEntry
from imgscore.inference import autotune
from imgscore.inference import embeddings as emb
from imgscore.inference.backends.forward import Forward
from imgscore.inference.isolation import Isolation, score_isolated
from imgscore.inference.scorer import Scorer

log = logging.getLogger("imgscore")


@dataclass(frozen=True)
class RowContext:
    """What every row of one shard attempt shares."""

    run_id: str
    input_root: str  # the run's input.root (absolute), on every row
    shard_id: int
    attempt: int
    model_id: str
    classes: list[str]
    device: str
    worker: str | None
    topk: int
    model_name: str = ""  # the config's name of the model (models[i].name; model.arch by default)


def prediction_row(
    ctx: RowContext,
    entry: ImageEntry,
    batch_id: int,
    top_indices: list[int],
    top_scores: list[float],
    scored_at: datetime,
    file_stat: tuple[int | None, int | None] | None = None,
) -> dict[str, Any]:
    """One predictions row (``PREDICTIONS_SCHEMA``) for an image scored in ``batch_id``.

    ``top_indices``/``top_scores``: the k best classes and their softmax probabilities in [0, 1],
    best first. ``file_stat``: (size bytes, mtime ns) of the bytes actually decoded (a file
    replaced after the scan is described as read); the scan's when not given.
    """
    size, mtime = file_stat if file_stat is not None else (entry.size, entry.mtime_ns)
    return {
        "run_id": ctx.run_id,
        "input_root": ctx.input_root,
        "image_path": entry.image_path,
        "label": entry.label,
        "label_name": entry.label_name,
        "pred_index": top_indices[0],
        "pred_label": ctx.classes[top_indices[0]],
        "score": top_scores[0],
        "topk_indices": top_indices,
        "topk_scores": top_scores,
        "model_id": ctx.model_id,
        "model_name": ctx.model_name,
        "device": ctx.device,
        "worker": ctx.worker,
        "shard_id": ctx.shard_id,
        "batch_id": batch_id,
        "scored_at": scored_at,
        "file_size": size,
        "file_mtime_ns": mtime,
        # the object's ETag when the bytes read are the ones listed (an object replaced since has none)
        "file_version": entry.version if mtime == entry.mtime_ns else None,
    }


def error_row(
    ctx: RowContext,
    entry: ImageEntry | None,
    batch_id: int | None,
    stage: str,
    error_type: str,
    message: str,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    """One errors row (``ERRORS_SCHEMA``) for ``entry``'s image — None for a whole-batch failure
    (``image_path`` null) — with the file's size (bytes) and mtime (ns) as scanned, the key the
    failure ledger matches later nights against (:mod:`imgscore.runstate.incremental`).
    ``batch_id`` None outside any batch; ``stage`` one of scan, decode, preprocess, inference."""
    image_path = entry.image_path if entry is not None else None
    log.debug(
        "shard %d batch %s: %s failed at %s: %s: %s",
        ctx.shard_id,
        batch_id,
        image_path,
        stage,
        error_type,
        message.splitlines()[0] if message else "",
    )
    return {
        "run_id": ctx.run_id,
        "input_root": ctx.input_root,
        "image_path": image_path,
        "shard_id": ctx.shard_id,
        "batch_id": batch_id,
        "stage": stage,
        "error_type": error_type,
        "message": message,
        "attempt": ctx.attempt,
        "occurred_at": occurred_at or datetime.now(UTC),
        "worker": ctx.worker,
        "model_id": ctx.model_id,
        "model_name": ctx.model_name,
        "file_size": entry.size if entry is not None else None,
        "file_mtime_ns": entry.mtime_ns if entry is not None else None,
        "file_version": entry.version if entry is not None else None,
    }


@dataclass
class ShardRows:
    """What scoring a list of images produced: rows in image order, and what was counted."""

    predictions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    # float32 [D] per predictions row, same order (output.embeddings)
    embeddings: list[np.ndarray] = field(default_factory=list)
    warnings: collections.Counter[str] = field(default_factory=collections.Counter)  # Pillow warning → count
    oom_events: int = 0
    loader_workers: int = 0
    split: autotune.Split | None = None  # DataLoader workers, threads and batch the images were scored with
    forward: Forward | None = None  # the backend's forward that scored them
    setup_s: float | None = None  # seconds from the shard's start to its first batch

    def facts(self) -> dict[str, Any]:
        """How these rows were scored, for the commit record: backend, precision, threads, batch,
        the split's predictions and the set-up time."""
        out: dict[str, Any] = {"setup_s": self.setup_s}
        if self.forward is not None:
            out.update(self.forward.describe())
        if self.split is not None:
            out.update(threads=self.split.threads, batch_size=self.split.batch, split_predicted=self.split.predicted)
            if self.split.lanes:
                out["lanes"] = True
        return out


@dataclass
class ModelPass:
    """One model of a several-model pass over a shard's batches: its scorer, its rows' context,
    which of the loader's batches (one per distinct transform) it reads (``spec``), its forward
    and its isolation state."""

    scorer: Scorer
    ctx: RowContext
    spec: int
    fn: Forward
    iso: Isolation

    @classmethod
    def start(
        cls,
        scorer: Scorer,
        ctx: RowContext,
        spec: int = 0,
        forward: Forward | None = None,
        max_batch: int | None = None,
    ) -> ModelPass:
        """A pass with ``forward`` (default: the scorer's with its thread share) and a largest
        forward of ``max_batch`` images (default ``inference.batch_size``; ``auto`` starts at
        :data:`imgscore.inference.autotune.MIN_BATCH`)."""
        inf = scorer.inference
        batch = max_batch or (inf.batch_size if isinstance(inf.batch_size, int) else autotune.MIN_BATCH)
        return cls(scorer, ctx, spec, forward or scorer.forward(scorer.threads), Isolation(max_batch=batch))


def score_batches(
    batches: Iterator[Batch],
    entries: list[ImageEntry],
    scorer: Scorer,
    ctx: RowContext,
    forward: Forward | None = None,
    max_batch: int | None = None,
) -> ShardRows:
    """Forward every batch with per-image isolation and turn each image into one row: one
    model's :func:`score_passes`. ``forward``: the backend's forward (default: the scorer's with
    its thread share); ``max_batch``: the largest forward (default ``inference.batch_size``)."""
    return score_passes(([b] for b in batches), entries, [ModelPass.start(scorer, ctx, 0, forward, max_batch)])


def score_passes(batches: Iterator[list[Batch]], entries: list[ImageEntry], passes: list[ModelPass]) -> ShardRows:
    """Forward every batch through every model with per-image isolation; each (image, model)
    pair becomes one row.

    ``batches`` yields, per DataLoader batch, one :class:`Batch` per distinct transform;
    ``ModelPass.spec`` picks a model's. Decode failures (per image, recorded once per model: each
    pair failed), inference failures isolated by :func:`score_isolated` and non-finite outputs
    become errors rows; every other pair a predictions row with its model's top-k — the same
    code for every backend. Rows come out batch by batch, model by model within a batch, in
    image order within each; Pillow warnings are counted once per decoded image.
    """
    rows = ShardRows(forward=passes[0].fn)
    with torch.inference_mode():
        for batch_id, group in enumerate(batches):
            if batch_id == 0:
                rows.setup_s = time.perf_counter()  # made relative to the shard's start by score_entries
            for b in group:
                rows.warnings.update(b.warnings)
            for p in passes:
                _score_pass_batch(rows, p, group[p.spec], batch_id, entries)
    rows.oom_events = sum(p.iso.oom_events for p in passes)
    return rows


def _score_pass_batch(rows: ShardRows, mp: ModelPass, batch: Batch, batch_id: int, entries: list[ImageEntry]) -> None:
    """One model's rows for one batch, appended to ``rows``."""
    ctx = mp.ctx
    for f in batch.failures:
        if entries[f.pos].wants(ctx.model_name):
            rows.errors.append(error_row(ctx, entries[f.pos], batch_id, f.stage, f.error_type, f.message))
    if batch.scored is not None:  # lanes: the forward ran in the DataLoader process (LaneCollate)
        for pos, etype, msg in batch.forward_failures:
            rows.errors.append(error_row(ctx, entries[pos], batch_id, "inference", etype, msg))
        positions, out = batch.scored
        if not positions:
            return
    else:
        scored = _forward_here(rows, mp, batch, batch_id, entries)
        if scored is None:
            return
        positions, out = scored
    n_classes = len(ctx.classes)
    probs = out[:, :n_classes]
    if mp.scorer.tap is not None:
        rows.embeddings.extend(out[:, n_classes:].numpy())
    top_s, top_i = torch.topk(probs, ctx.topk, dim=1)
    now = datetime.now(UTC)
    for row, pos in enumerate(positions):
        rows.predictions.append(
            prediction_row(
                ctx,
                entries[pos],
                batch_id,
                [int(v) for v in top_i[row]],
                [float(v) for v in top_s[row]],
                now,
                batch.file_stats.get(pos),
            )
        )


def _forward_here(
    rows: ShardRows, mp: ModelPass, batch: Batch, batch_id: int, entries: list[ImageEntry]
) -> tuple[list[int], torch.Tensor] | None:
    """The forward of the batch's images this model scores, in this process, with per-image
    isolation (its failures appended to ``rows``): (positions, outputs float32 [n, C] — with the
    embedding after the probabilities when the scorer taps one), or None when none was scored."""
    if batch.tensor is None:
        return None
    ctx, scorer, fn, iso = mp.ctx, mp.scorer, mp.fn, mp.iso
    # run.skip_scored: the images this model scored before are not its
    mine = [i for i, p in enumerate(batch.positions) if entries[p].wants(ctx.model_name)]
    if not mine:
        return None
    tensor, positions = batch.tensor, batch.positions
    if len(mine) < len(positions):
        tensor, positions = tensor[mine], [positions[i] for i in mine]
    device = scorer.device
    run_fn = emb.with_embeddings(fn, scorer.tap) if scorer.tap is not None else fn  # probs, then features
    memory_format = torch.channels_last if (fn.channels_last and tensor.ndim == 4) else torch.contiguous_format
    x = tensor.to(device, non_blocking=device.type == "cuda", memory_format=memory_format)
    n_before = len(iso.failures)
    scored = score_isolated(run_fn, x, positions, iso)
    for pos, etype, msg in iso.failures[n_before:]:
        rows.errors.append(error_row(ctx, entries[pos], batch_id, "inference", etype, msg))
    if not scored:
        return None
    return [p for p, _ in scored], torch.stack([p for _, p in scored])
