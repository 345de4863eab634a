"""Score one shard: the loader, the batches into rows, the commit — three steps, one module each.

This is the body of the ``score_shard`` task run, split the way a Beam ``DoFn`` pipeline is:

1. :func:`imgscore.inference.loader.build_loader`: a DataLoader over the shard's images (decode
   in worker processes, failures as records, never as exceptions; when the split chose lanes the
   forward runs there too, :class:`~imgscore.inference.loader.LaneCollate`);
2. :func:`imgscore.inference.rows.score_passes`: forward passes with per-image isolation, every
   (image, model) pair turned into one predictions row or one errors row;
3. :func:`imgscore.inference.commit.commit_shard`: both part files, then the commit record (what
   makes the shard done).

What scores (the models on their devices, the backends) is :mod:`imgscore.inference.scorer`.
:func:`score_shard` composes the steps for a shard of a run's index; ``imgscore rerun`` feeds
:func:`score_entries` the images it chose and commits the merge (``imgscore.runstate.rerun_plan``).
Tasks receive references (run folder, shard id, index location) and config sections, never
images, tensors or models; the model comes from the per-process cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from imgscore.config.running import OutputConfig
from imgscore.config.schema import Config
from imgscore.config.scoring import InputConfig
from imgscore.images.entries import ImageEntry
from imgscore.inference import embeddings as emb
from imgscore.inference.commit import commit_shard
from imgscore.inference.device import configure_threads
from imgscore.inference.loader import build_loader, loader_batches
from imgscore.inference.rows import ModelPass, RowContext, ShardRows, score_passes
from imgscore.inference.scorer import Scorer, load_scorers, transform_specs
from imgscore.io import object_store
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    file_metadata,
    make_table,
)
from imgscore.runstate.index import read_shard_entries as _read_index_entries
from imgscore.runstate.manifest import ShardRef, ShardResult, models_id, stop_check

log = logging.getLogger("imgscore")


def read_shard_entries(ref: ShardRef) -> list[ImageEntry]:
    """The shard's images, in index order: one row group of one index file (``ref.index_file``)."""
    return _read_index_entries(ref.run_dir, ref.index_file, ref.row_group if ref.row_group >= 0 else ref.shard_id)


def score_entries(
    entries: list[ImageEntry],
    input_root: str,
    scorer: Scorer | list[Scorer],
    input_cfg: InputConfig,
    ctx: RowContext | list[RowContext],
    t0: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> ShardRows:
    """Steps 1 and 2 for any list of images: loader, then rows (the rerun's entry point too).

    ``scorer``/``ctx``: one model, or one per model (same order): each image is then decoded
    once and scored by every model (:func:`~imgscore.inference.rows.score_passes`). ``t0``:
    ``time.perf_counter()`` when the shard started; the time until the first batch is recorded
    as ``setup_s``. ``stop``: asked before each batch (:func:`~imgscore.inference.loader.loader_batches`).

    Raises:
        ShardError: the DataLoader failed (:func:`~imgscore.inference.loader.loader_batches`).
        ShardStopped: ``stop`` said the run is stopping.
    """
    t0 = time.perf_counter() if t0 is None else t0
    scorers = scorer if isinstance(scorer, list) else [scorer]
    ctxs = ctx if isinstance(ctx, list) else [ctx]
    loader, split = build_loader(entries, input_root, scorers, input_cfg)
    first = scorers[0]
    threads = configure_threads(split.threads, 1) if split.threads != first.threads else first.threads
    _, spec_of = transform_specs(scorers)
    passes = [
        ModelPass.start(sc, cx, spec_of[i], sc.forward(threads), split.batch)
        for i, (sc, cx) in enumerate(zip(scorers, ctxs, strict=True))
    ]
    rows = score_passes(loader_batches(loader, ctxs[0].shard_id, stop), entries, passes)
    rows.loader_workers, rows.split = loader.num_workers, split
    rows.setup_s = round(rows.setup_s - t0, 4) if rows.setup_s else None
    if rows.warnings:
        log.debug(
            "shard %d: Pillow warnings (counted, not printed per image): %s", ctxs[0].shard_id, dict(rows.warnings)
        )
    return rows


def embeddings_of(
    rows: ShardRows, scorer: Scorer | list[Scorer], out_cfg: OutputConfig, metadata: dict[str, str]
) -> pa.Table | None:
    """The embeddings part for ``rows`` (keys from their predictions rows), or None when off.
    Several models write one table: their vectors have one length (checked when the run is planned)."""
    scorer = scorer[0] if isinstance(scorer, list) else scorer
    if scorer.tap is None or scorer.embedding_dim is None or not out_cfg.embeddings:  # tap and dim go together
        return None
    return emb.embeddings_table(
        rows.predictions, rows.embeddings, scorer.embedding_dim, out_cfg.embedding_dtype, metadata
    )


def row_context(ref: ShardRef, scorer: Scorer, attempt: int, topk: int) -> RowContext:
    """What every row of ``scorer``'s model shares in this attempt at the shard (``topk``:
    ``output.topk``, at most the model's classes)."""
    lm = scorer.lm
    return RowContext(
        ref.run_id,
        ref.input_root,
        ref.shard_id,
        attempt,
        lm.model_id,
        list(lm.classes),
        str(scorer.device),
        scorer.worker,
        min(topk, lm.num_classes),
        scorer.name or lm.arch,
    )


def models_metadata(scorers: list[Scorer], metadata: dict[str, Any] | None) -> dict[str, Any]:
    """``metadata`` plus, with several models, ``models``: each one's name and description
    (``LoadedModel.info()``), for every part file of the shard."""
    if len(scorers) == 1:
        return dict(metadata or {})
    return {**(metadata or {}), "models": [{"name": sc.name, **sc.lm.info()} for sc in scorers]}


def score_shard(
    ref: ShardRef,
    cfg: Config,
    attempt: int = 1,
    workers_on_host: int = 1,
    rank: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> ShardResult:
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
    # this worker (and its DataLoader processes) open stores with the run's settings
    object_store.configure(cfg.storage.settings())
    scorers = load_scorers(cfg, workers_on_host, rank)
    entries = read_shard_entries(ref)
    ctxs = [row_context(ref, sc, attempt, cfg.output.topk) for sc in scorers]
    rows = score_entries(entries, ref.input_root, scorers, cfg.input, ctxs, t0, stop=stop_check(ref.run_dir))
    meta = file_metadata(scorers[0].lm.info(), ref.run_id, models_metadata(scorers, metadata))
    result = ShardResult(
        shard_id=ref.shard_id,
        state="complete",
        images=len(entries),
        fingerprint=ref.fingerprint,
        model_id=models_id([sc.lm.model_id for sc in scorers]),
        device=ctxs[0].device,
        worker=scorers[0].worker,
        loader_workers=rows.loader_workers,
        attempt=attempt,
        warnings=dict(rows.warnings.most_common(20)),
        oom_events=rows.oom_events,
        **rows.facts(),
    )
    result.seconds = round(time.perf_counter() - t0, 4)
    predictions, errors = (
        make_table(rows.predictions, PREDICTIONS_SCHEMA, meta),
        make_table(rows.errors, ERRORS_SCHEMA, meta),
    )
    return commit_shard(
        ref, cfg.output.root, predictions, errors, result, embeddings_of(rows, scorers, cfg.output, meta)
    )
