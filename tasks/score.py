"""Score one shard: DataLoader over its images, forward pass with per-image isolation, part files.

This is the body of the ``score_shard`` task run. It receives references (run folder, shard id,
row range) and config sections, never images, tensors or models; it loads the model through the
per-process cache, and it writes its own part files and its shard state file, returning only
counts.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import torch
from pydantic import BaseModel
from torch.utils.data import DataLoader

from imgscore.tasks.config import (
    InferenceConfig,
    InputConfig,
    ModelConfig,
    OutputConfig,
    PreprocessConfig,
)
from imgscore.tasks.dataset import Batch, Failure, ShardDataset, collate_samples
from imgscore.tasks.device import (
    configure_threads,
    loader_context,
    loader_workers,
    resolve_device,
    worker_name,
)
from imgscore.tasks.model import LoadedModel, load_model
from imgscore.tasks.parquet_io import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    file_metadata,
    make_table,
    part_dir,
    part_name,
    write_json_atomic,
    write_table_atomic,
)
from imgscore.tasks.preprocess import DecodeOptions
from imgscore.tasks.scan import entries_from_table

log = logging.getLogger("imgscore")


class ShardRef(BaseModel):
    """What a ``score_shard`` task run is given: where the run lives and which rows are its own."""

    run_id: str
    run_date: str  # YYYY-MM-DD (UTC), the hive partition
    run_dir: str  # OUT/runs/RUN: holds index.parquet and shards/
    input_root: str
    shard_id: int
    start: int  # first row of the index (inclusive)
    stop: int  # last row (exclusive)
    fingerprint: str  # sha256 of the shard's (path, size, mtime) rows
    model_key: str = ""  # sha256 of model_id + resolved preprocessing (imgscore.tasks.incremental.model_key)


class ShardError(RuntimeError):
    """The shard could not run at all (model load, DataLoader crash or timeout): retry it."""


def shard_state_path(run_dir: str | Path, shard_id: int) -> Path:
    return Path(run_dir) / "shards" / f"{shard_id:05d}.json"


def read_shard_entries(run_dir: str | Path, shard_id: int):
    """The shard's entries: row group ``shard_id`` of ``index.parquet`` (one group per shard)."""
    table = pq.ParquetFile(Path(run_dir) / "index.parquet").read_row_group(shard_id)
    return entries_from_table(table)


@dataclass
class _Isolation:
    """Mutable per-shard forward state: the largest batch that fits (lowered on OOM)."""

    max_batch: int
    oom_events: int = 0
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (pos, error_type, message)


def forward_probs(lm: LoadedModel, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Softmax probabilities float32 [B, C] on CPU for an input float32 [B, 3, H, W] on ``lm.device``.

    ``precision`` bf16/fp16 runs the forward under ``torch.autocast``; the softmax is always fp32.
    """
    if precision != "fp32" and lm.device.type in ("cuda", "cpu"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device_type=lm.device.type, dtype=dtype):
            out = lm.module(x)
    else:
        out = lm.module(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return torch.softmax(out.float(), dim=1).cpu()


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


def score_shard(
    ref: ShardRef,
    input_cfg: InputConfig,
    model_cfg: ModelConfig,
    pre_cfg: PreprocessConfig,
    inf_cfg: InferenceConfig,
    out_cfg: OutputConfig,
    attempt: int = 1,
    workers_on_host: int = 1,
    rank: int | None = None,
    metadata: dict[str, str] | None = None,
) -> dict:
    """Score one shard and commit its part files; return its state record.

    Every image of the shard ends in exactly one place: a predictions row, or an errors row with
    its stage (scan, decode, preprocess, inference). Both part files are written (empty ones too)
    before the shard state file, which is the commit record.

    Returns:
        A JSON-ready dict: ``shard_id``, ``state`` (``complete`` or ``partial``), ``scored``,
        ``failed``, ``failed_images``, ``seconds``, ``device``, ``worker``, ``threads``,
        ``attempt``, ``files``, ``warnings`` (message → count), ``oom_events``.

    Raises:
        ShardError: the shard could not run at all (model load on this worker, DataLoader worker
            crash or timeout); Prefect retries it.
    """
    t0 = time.perf_counter()
    device = resolve_device(inf_cfg.device, rank)
    threads = configure_threads(inf_cfg.num_threads, workers_on_host)
    lm = load_model(model_cfg, pre_cfg, device, channels_last=inf_cfg.channels_last)
    if inf_cfg.fold_bn:
        lm = lm.folded()  # cached per loaded model: folded once per process, not per shard
    entries = read_shard_entries(ref.run_dir, ref.shard_id)
    ds = ShardDataset(ref.input_root, entries, lm.preprocess, DecodeOptions.from_input(input_cfg))
    nw = loader_workers(inf_cfg.num_workers)  # 0 in a daemonic (Dask) process
    loader = DataLoader(
        ds,
        batch_size=inf_cfg.batch_size,
        shuffle=False,
        num_workers=nw,
        collate_fn=collate_samples,
        pin_memory=device.type == "cuda",
        timeout=inf_cfg.timeout_s if nw > 0 else 0,
        multiprocessing_context=loader_context(nw),  # fork, also inside (spawned) Dask workers
    )
    me = worker_name()
    dev_name = str(device)
    k = min(out_cfg.topk, lm.num_classes)
    preds: list[dict] = []
    errors: list[dict] = []
    warn_counts: collections.Counter[str] = collections.Counter()
    iso = _Isolation(max_batch=inf_cfg.batch_size)
    now = lambda: datetime.now(UTC)  # noqa: E731

    def error_row(pos: int | None, batch_id: int | None, stage: str, etype: str, msg: str) -> dict:
        path = entries[pos].image_path if pos is not None else None
        log.debug("shard %d batch %s: %s failed at %s: %s: %s", ref.shard_id, batch_id, path, stage, etype, msg.splitlines()[0] if msg else "")
        return {
            "run_id": ref.run_id,
            "image_path": path,
            "shard_id": ref.shard_id,
            "batch_id": batch_id,
            "stage": stage,
            "error_type": etype,
            "message": msg,
            "attempt": attempt,
            "occurred_at": now(),
            "worker": me,
        }

    def fn(xs: torch.Tensor) -> torch.Tensor:
        return forward_probs(lm, xs, inf_cfg.precision)

    try:
        with torch.inference_mode():
            batch: Batch
            for batch_id, batch in enumerate(loader):
                warn_counts.update(batch.warnings)
                f: Failure
                for f in batch.failures:
                    errors.append(error_row(f.pos, batch_id, f.stage, f.error_type, f.message))
                if batch.tensor is None:
                    continue
                mf = torch.channels_last if (inf_cfg.channels_last and batch.tensor.ndim == 4) else torch.contiguous_format
                x = batch.tensor.to(device, non_blocking=device.type == "cuda", memory_format=mf)
                n_fail_before = len(iso.failures)
                scored = score_isolated(fn, x, batch.positions, iso)
                for pos, etype, msg in iso.failures[n_fail_before:]:
                    errors.append(error_row(pos, batch_id, "inference", etype, msg))
                if not scored:
                    continue
                probs = torch.stack([p for _, p in scored])
                top_s, top_i = torch.topk(probs, k, dim=1)
                ts = now()
                for row, (pos, _) in enumerate(scored):
                    e = entries[pos]
                    idx = [int(v) for v in top_i[row]]
                    preds.append(
                        {
                            "run_id": ref.run_id,
                            "image_path": e.image_path,
                            "label": e.label,
                            "label_name": e.label_name,
                            "pred_index": idx[0],
                            "pred_label": lm.classes[idx[0]],
                            "score": float(top_s[row, 0]),
                            "topk_indices": idx,
                            "topk_scores": [float(v) for v in top_s[row]],
                            "model_id": lm.model_id,
                            "device": dev_name,
                            "worker": me,
                            "shard_id": ref.shard_id,
                            "batch_id": batch_id,
                            "scored_at": ts,
                            # the bytes actually decoded: a file replaced after the scan is described as read
                            "file_size": batch.file_stats[pos][0],
                            "file_mtime_ns": batch.file_stats[pos][1],
                        }
                    )
    except RuntimeError as exc:
        # DataLoader worker killed (bus error from shared memory), timeout, pin-memory thread death:
        # the shard cannot be trusted as a whole; nothing is committed and Prefect retries it.
        raise ShardError(f"shard {ref.shard_id}: DataLoader failed: {exc}") from exc

    if warn_counts:
        log.debug("shard %d: Pillow warnings (counted, not printed per image): %s", ref.shard_id, dict(warn_counts))
    meta = file_metadata(lm.info(), ref.run_id, metadata)
    pred_file = write_table_atomic(
        make_table(preds, PREDICTIONS_SCHEMA, meta),
        part_dir(out_cfg.root, "predictions", ref.run_date, ref.run_id) / part_name(ref.shard_id),
    )
    err_file = write_table_atomic(
        make_table(errors, ERRORS_SCHEMA, meta),
        part_dir(out_cfg.root, "errors", ref.run_date, ref.run_id) / part_name(ref.shard_id),
    )
    failed_images = sorted({r["image_path"] for r in errors if r["image_path"] is not None})
    state = {
        "shard_id": ref.shard_id,
        "state": "complete" if not errors else "partial",
        "images": len(entries),
        "scored": len(preds),
        "failed": len(errors),
        "failed_images": failed_images,
        "fingerprint": ref.fingerprint,
        "model_id": lm.model_id,
        "seconds": round(time.perf_counter() - t0, 4),
        "device": dev_name,
        "worker": me,
        "threads": threads,
        "loader_workers": nw,  # DataLoader processes actually used (0: decoded in this process)
        "attempt": attempt,
        "files": [str(pred_file), str(err_file)],
        "warnings": dict(warn_counts.most_common(20)),
        "oom_events": iso.oom_events,
        "finished_at": now().isoformat(),
    }
    write_json_atomic(state, shard_state_path(ref.run_dir, ref.shard_id))
    return state
