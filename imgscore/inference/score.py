"""Score one shard: the loader, the batches into rows, the commit — three steps, one file each.

This is the body of the ``score_shard`` task run, split the way a Beam ``DoFn`` pipeline is:

1. :func:`build_loader`: a DataLoader over the shard's images (decode in worker processes,
   failures as records, never as exceptions; when the split chose lanes the forward runs
   there too, :class:`LaneCollate` — not to be confused with a model's :class:`Lane` of a
   several-model pass);
2. :func:`score_batches`: forward passes with per-image isolation, every image turned into one
   predictions row or one errors row (:func:`prediction_row`, :func:`error_row` — the only
   places rows are built);
3. :func:`commit_shard`: both part files, then the commit record (what makes the shard done).

:func:`score_shard` composes them for a shard of a run's index; ``imgscore rerun`` feeds
:func:`score_entries` the images it chose and commits the merge (``imgscore.runstate.rerun_plan``).
Tasks receive references (run folder, shard id, index location) and config sections, never
images, tensors or models; the model comes from the per-process cache.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from datetime import UTC, datetime

import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from upath import UPath

from imgscore.config.running import OutputConfig
from imgscore.config.schema import Config
from imgscore.config.scoring import InferenceConfig, InputConfig, ModelConfig, PreprocessConfig
from imgscore.errors import ShardError, ShardStopped
from imgscore.images.dataset import Batch, ShardDataset, collate_lanes, collate_samples
from imgscore.images.preprocess import DecodeOptions, PreprocessSpec
from imgscore.images.scan import ImageEntry
from imgscore.inference import autotune
from imgscore.inference import embeddings as emb
from imgscore.inference.backends import Forward, forward_probs, make_forward, resolve_backend
from imgscore.inference.device import (
    configure_threads,
    loader_context,
    loader_workers,
    resolve_device,
    worker_name,
)
from imgscore.inference.model import LoadedModel, load_model
from imgscore.io import storage
from imgscore.io.containment import inside
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    file_metadata,
    make_table,
    part_dir,
    part_name,
    write_table_atomic,
)
from imgscore.io.storage import AnyPath
from imgscore.runstate.commits import check_shard
from imgscore.runstate.index import read_shard_entries as _read_index_entries
from imgscore.runstate.manifest import (
    ShardRef,
    ShardResult,
    commit_record_path,
    create_commit_record,
    models_id,
    read_commit_record,
    stop_check,
    stop_requested,
    write_commit_record,
)

__all__ = ["ShardError", "ShardRef", "score_shard", "score_entries", "commit_shard", "build_loader", "score_batches", "forward_probs"]

log = logging.getLogger("imgscore")


def shard_state_path(run_dir: AnyPath, shard_id: int) -> UPath:
    """``run_dir/shards/SSSSS.json``: the shard's commit record."""
    return commit_record_path(run_dir, shard_id)


def read_shard_entries(ref: ShardRef) -> list[ImageEntry]:
    """The shard's images, in index order: one row group of one index file (``ref.index_file``)."""
    return _read_index_entries(ref.run_dir, ref.index_file, ref.row_group if ref.row_group >= 0 else ref.shard_id)


# ------------------------------------------------------------------------------------ scorer


@dataclass(frozen=True)
class Scorer:
    """What scores images in this process: the model on its device, and how batches are fed.

    Built once per shard by :func:`load_scorer`; the model itself comes from the per-process
    cache (``imgscore.inference.model.load_model``), so a worker loads it once.
    """

    lm: LoadedModel
    device: torch.device
    inference: InferenceConfig
    threads: int  # this worker's core share: torch intra-op threads unless the split says fewer
    worker: str  # host:pid
    backend: str = "torch"  # inference.backend, with auto resolved on this machine
    tap: emb.Tap | None = None  # output.embeddings: the hook that reads each image's features
    embedding_dim: int | None = None  # D, the length of those features
    name: str = ""  # the model's name in the config: every row's model_name

    def forward(self, threads: int) -> Forward:
        """The backend's forward pass with ``threads`` threads (one session per process and count)."""
        inf = self.inference
        return make_forward(self.lm, self.backend, inf.precision, threads, inf.cache_dir, inf.channels_last)


def load_scorer(model_cfg: ModelConfig, pre_cfg: PreprocessConfig, inf_cfg: InferenceConfig,
                workers_on_host: int = 1, rank: int | None = None, out_cfg: OutputConfig | None = None) -> Scorer:
    """Resolve this worker's device, thread share and backend, and load (or reuse) the model.

    With ``out_cfg.embeddings`` the scorer also carries the hook on the embedding layer
    (``imgscore.inference.embeddings``) and scores with torch (``auto`` is not measured then).

    Raises:
        ModelError: the model cannot be built or loaded (or exported) on this worker (Prefect
            retries the shard); ConfigError: the backend cannot run here, or no embedding layer.
    """
    device = resolve_device(inf_cfg.device, rank)
    threads = configure_threads(inf_cfg.num_threads, workers_on_host)
    lm = load_model(model_cfg, pre_cfg, device, channels_last=inf_cfg.channels_last)
    if inf_cfg.fold_bn:
        lm = lm.folded()  # cached per loaded model: folded once per process, not per shard
    batch = inf_cfg.batch_size if isinstance(inf_cfg.batch_size, int) else autotune.MIN_BATCH
    # torch, or ONNX Runtime / OpenVINO (export cached on disk); auto: measured once per machine
    if out_cfg is not None and out_cfg.embeddings:
        layer = emb.choose_layer(lm.module, out_cfg.embedding_layer, lm.num_classes)
        dim = emb.embedding_dim(lm.module, layer, lm.preprocess.crop, device)
        return Scorer(lm, device, inf_cfg, threads, worker_name(), "torch", emb.tap_for(lm.module, layer), dim, model_cfg.resolved_name)
    backend = resolve_backend(lm, inf_cfg.backend, inf_cfg.precision, threads, batch, inf_cfg.cache_dir, inf_cfg.channels_last)
    return Scorer(lm, device, inf_cfg, threads, worker_name(), backend, name=model_cfg.resolved_name)


def load_scorers(cfg: Config, workers_on_host: int = 1, rank: int | None = None) -> list[Scorer]:
    """One :class:`Scorer` per model the run scores (``cfg.scored_models()``), in the config's order.

    Raises:
        ModelError, ConfigError: as :func:`load_scorer`, for any of the models.
    """
    return [load_scorer(m, cfg.preprocess_for(m), cfg.inference, workers_on_host, rank, cfg.output) for m in cfg.scored_models()]


# ------------------------------------------------------------------------------------- rows


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


def prediction_row(ctx: RowContext, entry: ImageEntry, batch_id: int, top_indices: list[int], top_scores: list[float],
                   scored_at: datetime, file_stat: tuple[int | None, int | None] | None = None) -> dict:
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


def error_row(ctx: RowContext, entry: ImageEntry | None, batch_id: int | None, stage: str, error_type: str, message: str,
              occurred_at: datetime | None = None) -> dict:
    """One errors row (``ERRORS_SCHEMA``) for ``entry``'s image — None for a whole-batch failure
    (``image_path`` null) — with the file's size (bytes) and mtime (ns) as scanned, the key the
    failure ledger matches later nights against (:mod:`imgscore.runstate.incremental`).
    ``batch_id`` None outside any batch; ``stage`` one of scan, decode, preprocess, inference."""
    image_path = entry.image_path if entry is not None else None
    log.debug("shard %d batch %s: %s failed at %s: %s: %s", ctx.shard_id, batch_id, image_path, stage, error_type,
              message.splitlines()[0] if message else "")
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

    predictions: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    embeddings: list = field(default_factory=list)  # float32 [D] per predictions row, same order (output.embeddings)
    warnings: collections.Counter[str] = field(default_factory=collections.Counter)  # Pillow warning → count
    oom_events: int = 0
    loader_workers: int = 0
    split: autotune.Split | None = None  # DataLoader workers, threads and batch the images were scored with
    forward: Forward | None = None  # the backend's forward that scored them
    setup_s: float | None = None  # seconds from the shard's start to its first batch

    def facts(self) -> dict:
        """How these rows were scored, for the commit record: backend, precision, threads, batch,
        the split's predictions and the set-up time."""
        out: dict = {"setup_s": self.setup_s}
        if self.forward is not None:
            out.update(self.forward.describe())
        if self.split is not None:
            out.update(threads=self.split.threads, batch_size=self.split.batch, split_predicted=self.split.predicted)
            if self.split.lanes:
                out["lanes"] = True
        return out


@dataclass
class _Isolation:
    """Mutable per-shard forward state: the largest batch that fits (lowered on OOM)."""

    max_batch: int
    oom_events: int = 0
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (pos, error_type, message)


def score_isolated(fn, x: torch.Tensor, positions: list[int], state: _Isolation) -> list[tuple[int, torch.Tensor]]:
    """Run ``fn`` on ``x`` in chunks of ``state.max_batch``; isolate failures to single images.

    A chunk whose forward raises is split in halves recursively until the failing images are
    alone; those are appended to ``state.failures`` and every other image is scored. On CUDA
    out-of-memory the chunk is halved and ``state.max_batch`` lowered for the rest of the shard.
    Rows with non-finite outputs are failures too (``NonFiniteOutput``).

    Returns:
        (position, probabilities float32 [C]) for each scored image, in input order.
    """
    out: list[tuple[int, torch.Tensor]] = []

    def run(xs: torch.Tensor, ps: list[int]) -> None:
        try:
            probs = fn(xs)
        except torch.OutOfMemoryError as exc:
            state.oom_events += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(ps) == 1:
                state.failures.append((ps[0], "OutOfMemoryError", str(exc).splitlines()[0]))
                return
            state.max_batch = max(1, min(state.max_batch, len(ps) // 2))
            i = 0  # the rest of this chunk too runs at the lowered size (which may drop again)
            while i < len(ps):
                step = state.max_batch
                run(xs[i : i + step], ps[i : i + step])
                i += step
            return
        except Exception as exc:
            if len(ps) == 1:
                state.failures.append((ps[0], type(exc).__name__, (str(exc) or repr(exc))[:2000]))
                return
            half = len(ps) // 2
            run(xs[:half], ps[:half])
            run(xs[half:], ps[half:])
            return
        finite = torch.isfinite(probs).all(dim=1)
        for i, p in enumerate(ps):
            if bool(finite[i]):
                out.append((p, probs[i]))
            else:
                state.failures.append((p, "NonFiniteOutput", "model output contains NaN or Inf for this image"))

    start = 0
    while start < len(positions):
        step = state.max_batch
        run(x[start : start + step], positions[start : start + step])
        start += step
    return out


def transform_specs(scorers: list[Scorer]) -> tuple[list[PreprocessSpec], list[int]]:
    """The distinct eval transforms of ``scorers`` and, per scorer, the index of its own: models
    with the same preprocessing share one tensor, the others one decode (``ShardDataset``)."""
    specs: list[PreprocessSpec] = []
    for sc in scorers:
        if sc.lm.preprocess not in specs:
            specs.append(sc.lm.preprocess)
    return specs, [specs.index(sc.lm.preprocess) for sc in scorers]


class _JointForward(Forward):
    """For the split's measurement only: every model's forward on one probe batch, resized to
    each model's crop (float32 [B, 3, H, W] in, the first model's probabilities out)."""

    def __init__(self, scorers: list[Scorer], threads: int):
        self.fns = [(sc.forward(threads), sc.lm.preprocess.crop) for sc in scorers]
        self.channels_last, self.device = self.fns[0][0].channels_last, self.fns[0][0].device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = [f(x if x.shape[-1] == crop else torch.nn.functional.interpolate(x, size=(crop, crop), mode="bilinear"))
                for f, crop in self.fns]
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
    key = (*(sc.lm.model_id[:12] for sc in scorers), *(sc.lm.arch for sc in scorers), scorer.backend, inf.precision, scorer.threads,
           *(sc.lm.preprocess.crop for sc in scorers), int(math.log2(sizes[len(sizes) // 2] + 1)) if sizes else 0)
    probe = _FirstLane(ds) if ds.multi else ds  # a ShardDataset of a list of transforms yields one item per transform
    forward_for = scorer.forward if len(scorers) == 1 else (lambda t: _JointForward(scorers, t))
    # lanes (the forward inside forked DataLoader processes): on the CPU, one model, no embeddings
    # hook, eager torch or ONNX Runtime (a one-thread ORT session starts no threads of its own, so
    # the forked copy runs as the parent's would); OpenVINO's runtime keeps threads a fork does not copy
    lanes = len(scorers) == 1 and scorer.backend in LANE_BACKENDS and scorer.device.type == "cpu" and scorer.tap is None
    return autotune.shard_split(probe, forward_for, scorer.threads, inf.num_workers, inf.batch_size, key, scorer.device,
                                can_fork=loader_workers(1) > 0, lanes=lanes)


class _FirstLane:
    """A ``ShardDataset`` of several transforms seen as one model's, for the split's measurement:
    item ``i`` decoded and transformed for every model (the cost), the first transform's sample returned."""

    def __init__(self, ds: ShardDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i][0]


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

    def __init__(self, fn: Forward, max_batch: int, wanted: frozenset[int] | None = None, in_list: bool = False):
        self.fn, self.max_batch, self.wanted, self.in_list = fn, max_batch, wanted, in_list

    def __call__(self, items: list) -> Batch | list[Batch]:
        if self.in_list:  # a one-model list of scorers: items are 1-tuples, the batch a 1-list (collate_lanes)
            return [self.scored_batch([item[0] for item in items])] if items else []
        return self.scored_batch(items)

    def scored_batch(self, items: list) -> Batch:
        """One spec's items → their :class:`Batch`, forwarded here."""
        b = collate_samples(items)
        if b.tensor is None:
            return b
        keep = [i for i, p in enumerate(b.positions) if self.wanted is None or p in self.wanted]
        x = b.tensor if len(keep) == len(b.positions) else b.tensor[keep]
        if self.fn.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        iso = _Isolation(max_batch=self.max_batch)
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


def build_loader(entries: list[ImageEntry], input_root: str, scorer: Scorer | list[Scorer], input_cfg: InputConfig,
                 split: autotune.Split | None = None) -> tuple[DataLoader, autotune.Split]:
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
    ds = ShardDataset(input_root, entries, transform_specs(scorers)[0], opts) if isinstance(scorer, list) \
        else ShardDataset(input_root, entries, scorer.lm.preprocess, opts)
    split = split or loader_split(ds, entries, scorer)
    nw = loader_workers(split.workers)
    collate = collate_lanes if isinstance(scorer, list) else collate_samples
    if split.lanes and nw > 0 and len(scorers) == 1:
        name = scorers[0].name
        wanted = None if all(e.wants(name) for e in entries) else frozenset(i for i, e in enumerate(entries) if e.wants(name))
        collate = LaneCollate(scorers[0].forward(1), split.batch, wanted, in_list=isinstance(scorer, list))
    elif split.lanes:
        split = dc_replace(split, lanes=False)  # no DataLoader processes here: the forward stays in this one
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


def loader_batches(loader: DataLoader, shard_id: int, stop: Callable[[], bool] | None = None) -> Iterator[Batch]:
    """The loader's batches; what the DataLoader itself raises becomes :class:`ShardError`.
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


@dataclass
class Lane:
    """One model's share of a several-model pass: its scorer, its rows' context, which of the
    loader's batches (one per distinct transform) it reads, its forward and its isolation state."""

    scorer: Scorer
    ctx: RowContext
    spec: int = 0
    fn: Forward | None = None
    iso: _Isolation | None = None


def score_batches(batches: Iterator[Batch], entries: list[ImageEntry], scorer: Scorer, ctx: RowContext,
                  forward: Forward | None = None, max_batch: int | None = None) -> ShardRows:
    """Forward every batch with per-image isolation and turn each image into one row: one
    model's :func:`score_lanes`. ``forward``: the backend's forward (default: the scorer's with
    its thread share); ``max_batch``: the largest forward (default ``inference.batch_size``)."""
    return score_lanes(([b] for b in batches), entries, [Lane(scorer, ctx, 0, forward)], max_batch)


def score_lanes(batches: Iterator[list[Batch]], entries: list[ImageEntry], lanes: list[Lane], max_batch: int | None = None) -> ShardRows:
    """Forward every batch through every model (lane) with per-image isolation; each (image,
    model) pair becomes one row.

    ``batches`` yields, per DataLoader batch, one :class:`Batch` per distinct transform;
    ``lane.spec`` picks a lane's. Decode failures (per image, recorded once per model: each
    pair failed), inference failures isolated by :func:`score_isolated` and non-finite outputs
    become errors rows; every other pair a predictions row with its model's top-k — the same
    code for every backend. Rows come out batch by batch, model by model within a batch, in
    image order within each; Pillow warnings are counted once per decoded image.
    """
    for lane in lanes:
        inf = lane.scorer.inference
        lane.fn = lane.fn or lane.scorer.forward(lane.scorer.threads)
        lane.iso = _Isolation(max_batch=max_batch or (inf.batch_size if isinstance(inf.batch_size, int) else autotune.MIN_BATCH))
    rows = ShardRows(forward=lanes[0].fn)

    with torch.inference_mode():
        for batch_id, group in enumerate(batches):
            if batch_id == 0:
                rows.setup_s = time.perf_counter()  # made relative to the shard's start by score_entries
            for b in group:
                rows.warnings.update(b.warnings)
            for lane in lanes:
                _score_lane_batch(rows, lane, group[lane.spec], batch_id, entries)
    rows.oom_events = sum(lane.iso.oom_events for lane in lanes)
    return rows


def _score_lane_batch(rows: ShardRows, lane: Lane, batch: Batch, batch_id: int, entries: list[ImageEntry]) -> None:
    """One model's rows for one batch, appended to ``rows``."""
    scorer, ctx, fn, iso = lane.scorer, lane.ctx, lane.fn, lane.iso
    for f in batch.failures:
        if entries[f.pos].wants(ctx.model_name):
            rows.errors.append(error_row(ctx, entries[f.pos], batch_id, f.stage, f.error_type, f.message))
    n_classes = len(ctx.classes)
    if batch.scored is not None:  # a lane: the forward ran in the DataLoader process (LaneCollate)
        for pos, etype, msg in batch.forward_failures:
            rows.errors.append(error_row(ctx, entries[pos], batch_id, "inference", etype, msg))
        positions, out = batch.scored
        if not positions:
            return
    else:
        if batch.tensor is None:
            return
        mine = [i for i, p in enumerate(batch.positions) if entries[p].wants(ctx.model_name)]  # run.skip_scored: images it scored before are not its
        if not mine:
            return
        if len(mine) < len(batch.positions):
            batch = Batch(batch.tensor[mine], [batch.positions[i] for i in mine], [], [], batch.file_stats)
        device = scorer.device
        run_fn = emb.with_embeddings(fn, scorer.tap) if scorer.tap is not None else fn  # probs, then features
        memory_format = torch.channels_last if (fn.channels_last and batch.tensor.ndim == 4) else torch.contiguous_format
        x = batch.tensor.to(device, non_blocking=device.type == "cuda", memory_format=memory_format)
        n_before = len(iso.failures)
        scored = score_isolated(run_fn, x, batch.positions, iso)
        for pos, etype, msg in iso.failures[n_before:]:
            rows.errors.append(error_row(ctx, entries[pos], batch_id, "inference", etype, msg))
        if not scored:
            return
        positions, out = [p for p, _ in scored], torch.stack([p for _, p in scored])
    probs = out[:, :n_classes]
    if scorer.tap is not None:
        rows.embeddings.extend(out[:, n_classes:].numpy())
    top_s, top_i = torch.topk(probs, ctx.topk, dim=1)
    now = datetime.now(UTC)
    for row, pos in enumerate(positions):
        rows.predictions.append(
            prediction_row(ctx, entries[pos], batch_id, [int(v) for v in top_i[row]], [float(v) for v in top_s[row]], now,
                           batch.file_stats.get(pos))
        )


def score_entries(entries: list[ImageEntry], input_root: str, scorer: Scorer | list[Scorer], input_cfg: InputConfig,
                  ctx: RowContext | list[RowContext], t0: float | None = None, stop: Callable[[], bool] | None = None) -> ShardRows:
    """Steps 1 and 2 for any list of images: loader, then rows (the rerun's entry point too).

    ``scorer``/``ctx``: one model, or one per model (same order): each image is then decoded
    once and scored by every model (:func:`score_lanes`). ``t0``: ``time.perf_counter()`` when
    the shard started; the time until the first batch is recorded as ``setup_s``. ``stop``: asked
    before each batch (:func:`loader_batches`).

    Raises:
        ShardError: the DataLoader failed (:func:`loader_batches`).
        ShardStopped: ``stop`` said the run is stopping.
    """
    t0 = time.perf_counter() if t0 is None else t0
    scorers = scorer if isinstance(scorer, list) else [scorer]
    ctxs = ctx if isinstance(ctx, list) else [ctx]
    loader, split = build_loader(entries, input_root, scorers, input_cfg)
    first = scorers[0]
    threads = configure_threads(split.threads, 1) if split.threads != first.threads else first.threads
    _, spec_of = transform_specs(scorers)
    lanes = [Lane(sc, cx, spec_of[i], sc.forward(threads)) for i, (sc, cx) in enumerate(zip(scorers, ctxs, strict=True))]
    rows = score_lanes(loader_batches(loader, ctxs[0].shard_id, stop), entries, lanes, split.batch)
    rows.loader_workers, rows.split = loader.num_workers, split
    rows.setup_s = round(rows.setup_s - t0, 4) if rows.setup_s else None
    if rows.warnings:
        log.debug("shard %d: Pillow warnings (counted, not printed per image): %s", ctxs[0].shard_id, dict(rows.warnings))
    return rows


def commit_shard(ref: ShardRef, out_root: AnyPath, predictions: pa.Table, errors: pa.Table, result: ShardResult,
                 embeddings: pa.Table | None = None, replace: bool = False) -> ShardResult:
    """Write the shard's predictions and errors part files (empty ones too), then its commit record.

    ``embeddings`` (``output.embeddings``): the shard's embeddings part file, written first, one
    row per predictions row; a shard is done only once its commit record exists, so a reader
    that joins on the predictions never sees vectors without their predictions.

    ``result`` is completed from the tables: ``state`` (``complete`` when there are no error
    rows, else ``partial``; ``failed`` stays), ``scored``/``failed`` (their row counts), ``failed_images``,
    ``files`` and ``finished_at``. A writer killed before the commit record leaves the shard
    not done (a rerun redoes it); killed after, the record is adopted.

    Exactly once without a rename (object stores have none): the part files go to their final,
    deterministic keys (a rewrite replaces them, never adds a file), and the commit record is
    created last and exclusively (:func:`~imgscore.runstate.manifest.create_commit_record`). When
    another writer of the same shard committed first, its record is returned as long as the part
    files now there match its counts (both writers wrote the whole shard); otherwise, or with
    ``replace`` (``imgscore rerun``, which holds the run's lock), this writer's record replaces it.

    Returns:
        The shard's commit record.

    Raises:
        UnsafePathError: a folder it writes into resolves outside ``out_root`` (a planted symlink).
        ShardStopped: the run is stopping (``runstate.request_stop``): nothing is written, so the
            manifest the interrupted run ends with counts every shard on disk.
    """
    if stop_requested(ref.run_dir):
        raise ShardStopped(f"shard {ref.shard_id}: not committed, the run is stopping")
    pred_dir, err_dir = (inside(out_root, part_dir(out_root, t, ref.run_date, ref.run_id), "part-file folder") for t in ("predictions", "errors"))
    inside(out_root, storage.parent_of(commit_record_path(ref.run_dir, ref.shard_id)), "commit-record folder")  # no planted link out
    if embeddings is not None:
        write_table_atomic(embeddings, embeddings_part(out_root, ref))
    pred_file = write_table_atomic(predictions, storage.path(pred_dir, part_name(ref.shard_id)))
    err_file = write_table_atomic(errors, storage.path(err_dir, part_name(ref.shard_id)))
    failed_images = sorted({p for p in errors["image_path"].to_pylist() if p is not None})
    result = result.model_copy(update={
        "state": "failed" if result.state == "failed" else ("complete" if errors.num_rows == 0 else "partial"),
        "scored": predictions.num_rows,
        "failed": errors.num_rows,
        "failed_images": failed_images,
        "files": [str(pred_file), str(err_file)],
        "finished_at": datetime.now(UTC).isoformat(),
    })
    if replace or not create_commit_record(ref.run_dir, result):
        winner = None if replace else read_commit_record(ref.run_dir, ref.shard_id)
        if winner is not None and winner.fingerprint == result.fingerprint and winner.state in ("complete", "partial", "failed") \
                and check_shard(out_root, ref.run_date, ref.run_id, winner) is None:
            log.info("shard %d: another writer committed it first; its record stands", ref.shard_id)
            return winner.model_copy(update={"files": result.files})
        write_commit_record(ref.run_dir, result)
    return result


def embeddings_part(out_root: AnyPath, ref: ShardRef) -> UPath:
    """``OUT/embeddings/<the run's partition>/part-SSSSS.parquet``, checked to stay inside ``out_root``."""
    return storage.path(inside(out_root, part_dir(out_root, "embeddings", ref.run_date, ref.run_id), "part-file folder"), part_name(ref.shard_id))


def embeddings_of(rows: ShardRows, scorer: Scorer | list[Scorer], out_cfg: OutputConfig, metadata: dict[str, str]) -> pa.Table | None:
    """The embeddings part for ``rows`` (keys from their predictions rows), or None when off.
    Several models write one table: their vectors have one length (checked when the run is planned)."""
    scorer = scorer[0] if isinstance(scorer, list) else scorer
    if scorer.tap is None or not out_cfg.embeddings:
        return None
    return emb.embeddings_table(rows.predictions, rows.embeddings, scorer.embedding_dim, out_cfg.embedding_dtype, metadata)


def row_context(ref: ShardRef, scorer: Scorer, attempt: int, topk: int) -> RowContext:
    lm = scorer.lm
    return RowContext(ref.run_id, ref.input_root, ref.shard_id, attempt, lm.model_id, list(lm.classes), str(scorer.device), scorer.worker,
                      min(topk, lm.num_classes), scorer.name or lm.arch)


def models_metadata(scorers: list[Scorer], metadata: dict | None) -> dict:
    """``metadata`` plus, with several models, ``models``: each one's name and description
    (``LoadedModel.info()``), for every part file of the shard."""
    if len(scorers) == 1:
        return dict(metadata or {})
    return {**(metadata or {}), "models": [{"name": sc.name, **sc.lm.info()} for sc in scorers]}


def score_shard(ref: ShardRef, cfg: Config, attempt: int = 1, workers_on_host: int = 1, rank: int | None = None,
                metadata: dict | None = None) -> ShardResult:
    """Score one shard of a run's index with every model of ``cfg`` and commit it; return its commit record.

    Each image is decoded once (per distinct decode setting) and scored by every model; every
    (image, model) pair ends in exactly one place: a predictions row, or an errors row with its
    stage (scan, decode, preprocess, inference), each carrying ``model_name`` and ``model_id``.
    One part file per table holds all models' rows. Uses ``cfg``'s input, model(s),
    preprocess, inference and output sections; ``metadata`` goes on every part file (the flow
    passes the resolved config).

    Raises:
        ShardError: the DataLoader failed (worker crash, timeout); Prefect retries the shard.
        ModelError: a model cannot be loaded on this worker; Prefect retries the shard.
        ShardStopped: the run is stopping (SIGINT/SIGTERM): abandoned between batches, nothing committed.
    """
    t0 = time.perf_counter()
    storage.configure(cfg.storage.settings())  # this worker (and its DataLoader processes) open stores with the run's settings
    scorers = load_scorers(cfg, workers_on_host, rank)
    entries = read_shard_entries(ref)
    ctxs = [row_context(ref, sc, attempt, cfg.output.topk) for sc in scorers]
    rows = score_entries(entries, ref.input_root, scorers, cfg.input, ctxs, t0, stop=stop_check(ref.run_dir))
    meta = file_metadata(scorers[0].lm.info(), ref.run_id, models_metadata(scorers, metadata))
    result = ShardResult(
        shard_id=ref.shard_id, state="complete", images=len(entries), fingerprint=ref.fingerprint,
        model_id=models_id([sc.lm.model_id for sc in scorers]), device=ctxs[0].device, worker=scorers[0].worker,
        loader_workers=rows.loader_workers, attempt=attempt, warnings=dict(rows.warnings.most_common(20)), oom_events=rows.oom_events,
        **rows.facts(),
    )
    result.seconds = round(time.perf_counter() - t0, 4)
    return commit_shard(ref, cfg.output.root, make_table(rows.predictions, PREDICTIONS_SCHEMA, meta), make_table(rows.errors, ERRORS_SCHEMA, meta), result,
                        embeddings_of(rows, scorers, cfg.output, meta))


def commit_failed_shard(ref: ShardRef, entries: list[ImageEntry], out_root: AnyPath, model_info: dict, reason: str,
                        attempts: int, metadata: dict | None = None, models: list[dict] | None = None) -> ShardResult:
    """A shard that could not run after its retries: one errors row per (image, model) (stage
    ``inference``, type ``ShardFailed``, the reason as message), an empty predictions part, and
    state ``failed`` with the reason. ``models``: the run's models (manifest ``models``: ``name``,
    ``model_id``), default the one ``model_info`` describes."""
    models = models or [{"name": model_info.get("name") or model_info.get("arch") or "", "model_id": model_info.get("model_id") or ""}]
    now = datetime.now(UTC)
    errors = []
    for e in entries:
        for m in models:
            if not e.wants(m.get("name") or ""):
                continue
            ctx = RowContext(ref.run_id, ref.input_root, ref.shard_id, attempts, m.get("model_id") or "", [], "", None, 1, m.get("name") or "")
            errors.append(error_row(ctx, e, None, "inference", "ShardFailed", reason[:2000], now))
    meta = file_metadata(model_info, ref.run_id, metadata)
    embeddings_part(out_root, ref).unlink(missing_ok=True)  # an earlier attempt's vectors: no predictions stand beside them
    return commit_shard(ref, out_root, make_table([], PREDICTIONS_SCHEMA, meta), make_table(errors, ERRORS_SCHEMA, meta),
                        ShardResult(shard_id=ref.shard_id, state="failed", images=len(entries), fingerprint=ref.fingerprint,
                                    attempt=attempts, reason=reason))
