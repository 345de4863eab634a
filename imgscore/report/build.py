"""The run report built from a run's files: ``runs/RUN_ID/manifest.json`` and the run's part files.

:func:`build_report` returns the typed :class:`imgscore.report.model.Report`; the renderers
(terminal, HTML, the Prefect artifacts) read it, and ``imgscore report --format json`` dumps it.
Everything here is a plain function of files under ``output.root``: no Prefect, no model, no GPU.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from upath import UPath

from imgscore.errors import UsageError
from imgscore.io import storage
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    run_part_files,
)
from imgscore.io.storage import AnyPath
from imgscore.report import drift as drift_mod
from imgscore.report.evaluate import confusion, read_run
from imgscore.report.model import (
    REPORT_FILE,
    Counts,
    Drift,
    InputInfo,
    KnownBad,
    ModelInfo,
    ModelTally,
    NotCompared,
    Report,
    Rows,
    Timing,
)
from imgscore.report.stats import (
    LOWEST_N,
    class_counts,
    classes_left_out,
    error_summary,
    lowest_confidence,
    score_stats,
    skipped_summary,
)
from imgscore.report.text import one_line
from imgscore.runstate.commits import check_run_state, manifest_path, run_dir_of
from imgscore.runstate.manifest import ABANDONED, Manifest, observed_status
from imgscore.runstate.state import load_manifest

_PRED_COLS = [
    "image_path",
    "label",
    "label_name",
    "pred_index",
    "pred_label",
    "score",
    "topk_indices",
    "topk_scores",
    "device",
    "worker",
    "model_id",
]
_ERR_COLS = ["image_path", "shard_id", "batch_id", "stage", "error_type", "message", "attempt", "model_id"]


def load_run_manifest(out_root: AnyPath, run_id: str) -> Manifest:
    """The run's state (summary + ledger), checked to name nothing outside ``out_root``.

    Raises:
        UsageError: no such run under ``out_root`` (the message lists the latest runs there);
            UnsafePathError: the run state names a path outside ``out_root``.
    """
    path = manifest_path(out_root, run_id)
    if not storage.is_file(path):
        runs_dir = storage.path(out_root, "runs")
        known = sorted(
            (n for n in storage.list_names(runs_dir) if storage.is_file(storage.path(runs_dir, n, "manifest.json"))),
            reverse=True,
        )
        hint = f"latest runs there: {', '.join(known[:5])}" if known else "no runs there yet"
        raise UsageError(
            f"run {run_id!r} not found in {str(runs_dir)!r} ({hint}); check RUN_ID or set output.root "
            "(--set output.root=DIR)"
        )
    run_dir = run_dir_of(out_root, run_id)
    m = load_manifest(run_dir)
    check_run_state(m, out_root, run_dir)
    return m


def _read(out_root: UPath, m: Manifest, table: str, columns: list[str], schema: pa.Schema) -> pa.Table:
    """The run's rows of ``table``, read from its own part-file folder only (not every run's files;
    a run not yet moved from the layout before is read where it is)."""
    files = [str(f) for f in run_part_files(out_root, table, m.run_date, m.run_id)]
    if not files:
        # planned before manifests recorded run_date (local roots only: object stores came later): the hive folders
        if m.run_date is None and m.shards and (out_root / table).is_dir():
            return read_run(out_root, m.run_id, table, columns=columns)
        return schema.empty_table().select(columns)
    fs, paths = storage.arrow_files(files)
    return ds.dataset(paths, format="parquet", schema=schema, filesystem=fs).to_table(columns=columns)


def _of_model(t: pa.Table, model_id: str | None) -> pa.Table:
    """Rows of ``model_id`` (rows of files written before errors carried one count as its)."""
    if model_id is None or not t.num_rows:
        return t
    return t.filter(pc.fill_null(pc.equal(t["model_id"], model_id), True))


def models_summary(m: Manifest, preds: pa.Table, errs: pa.Table) -> list[ModelTally]:
    """Each model of a several-model run: name, arch, model_id, its predictions and errors rows
    (its (image, model) pairs); [] for a run of one model."""
    if len(m.models) < 2:
        return []
    return [
        ModelTally(
            name=x.get("name"),
            arch=x.get("arch"),
            model_id=x.get("model_id"),
            scored=_of_model(preds, x.get("model_id")).num_rows,
            failed=_of_model(errs, x.get("model_id")).num_rows,
        )
        for x in m.models
    ]


def _chosen_model(m: Manifest, model_name: str | None) -> dict[str, Any]:
    """The model the per-image sections describe: ``model_name``, default the run's first.

    Raises:
        UsageError: ``model_name`` is not one of the run's models.
    """
    model, several = m.model, m.models
    if len(several) <= 1 and model_name is None:
        return model
    names = [x.get("name") for x in several] or [model.get("name") or model.get("arch")]
    if model_name is not None and model_name not in names:
        raise UsageError(
            f"run {m.run_id} scored no model named {model_name!r}; its models: {', '.join(map(str, names))}"
        )
    return next((x for x in several if x.get("name") == model_name), several[0] if several else model)


def run_drift(out_root: UPath, m: dict, model: dict | None = None) -> Drift | None:
    """The run compared with recent nights (:func:`imgscore.report.drift.compare`, with the
    ``drift`` settings the run recorded); None when ``drift.enabled`` is off. A comparison that
    cannot be made (an unreadable earlier run) is :class:`NotCompared` (one line), never an exception."""
    cfg = drift_mod.drift_config(m)
    if not cfg.enabled:
        return None
    try:
        return drift_mod.compare(out_root, m, cfg, model)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return NotCompared(error=one_line(exc))


def live_writer(run_dir: AnyPath) -> str | None:
    """The live process writing the run (its lock's owner: purpose, pid, host, since when), or
    None when no live process holds the run's lock, or this process does (a run writing its own
    report.html at its end)."""
    import socket

    from imgscore.runstate import lock as run_lock

    rec = run_lock.read_lock(run_dir)
    if (
        rec is None
        or run_lock.is_stale(rec)
        or (rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname())
    ):
        return None
    return run_lock.owner(rec)


def rerun_command(run_id: str, out_root: AnyPath) -> str:
    """The command that finishes a run: ``imgscore rerun RUN --set output.root=OUT``."""
    return f"imgscore rerun {run_id} --set output.root={out_root}"


def _known_bad(m: Manifest, run_dir: UPath) -> KnownBad | None:
    """The images carried by the failure ledger (None when there are none)."""
    if not m.counts.already_failed:
        return None
    carried = m.incremental.get("carried") or {}
    return KnownBad(
        count=m.counts.already_failed,
        file=str(run_dir / carried.get("file", "already_failed.parquet")),
        by_error_type=carried.get("by_error_type") or {},
        by_run=carried.get("by_run") or {},
    )


def build_report(out_root: AnyPath, run_id: str, lowest_n: int = LOWEST_N, model_name: str | None = None) -> Report:
    """The report of the run ``run_id`` under ``out_root`` (:class:`~imgscore.report.model.Report`
    says where each part comes from), with the ``lowest_n`` least confident predictions.

    A run of several models: the counts are (image, model) pairs, ``models`` lists each model;
    the per-image sections (classes, scores, accuracy, errors, lowest confidence, drift) describe
    ``model_name`` (default the first model), named in ``model``.

    Raises:
        UsageError: the run is not under ``out_root``, or ``model_name`` is not one of its models.
        UnsafePathError: the run state names a path outside ``out_root``.
    """
    out_root = storage.path(out_root)
    m = load_run_manifest(out_root, run_id)
    all_preds = _read(out_root, m, "predictions", _PRED_COLS, PREDICTIONS_SCHEMA)
    all_errs = _read(out_root, m, "errors", _ERR_COLS, ERRORS_SCHEMA)
    model = _chosen_model(m, model_name)
    mid = model.get("model_id") if len(m.models) > 1 else None  # several models: the chosen one's rows
    preds, errs = _of_model(all_preds, mid), _of_model(all_errs, mid)
    model_classes = list(model.get("classes") or [])
    folder_classes = m.input.get("classes") or None
    pred_index = preds["pred_index"].to_numpy() if preds.num_rows else np.zeros(0, np.int64)
    listed = class_counts(pred_index, model_classes)
    labelled = preds.num_rows > 0 and pc.any(pc.is_valid(preds["label"])).as_py()
    run_dir = run_dir_of(out_root, run_id)
    status, reason, rerun, writer = _ending(m, out_root, run_dir)
    return Report(
        run_id=m.run_id,
        run_date=m.run_date,
        status=status,
        reason=reason,
        rerun=rerun,
        writer=writer,
        created_at=m.created_at,
        updated_at=m.updated_at,
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        input=_input_info(m),
        model=ModelInfo(**{k: model.get(k) for k in ModelInfo.model_fields}),
        models=models_summary(m, all_preds, all_errs),
        counts=Counts(**{k: getattr(m.counts, k) for k in Counts.model_fields}),
        known_bad=_known_bad(m, run_dir),
        error_rate=round(m.counts.failed / m.total_pairs, 6) if m.total_pairs else 0.0,  # of (image, model) pairs
        rows=Rows(predictions=all_preds.num_rows, errors=all_errs.num_rows),
        timing=Timing(**{k: m.timings.get(k) for k in Timing.model_fields}),
        devices=sorted({s.device for s in m.shards if s.device} | set(preds["device"].unique().to_pylist())),
        workers=sorted({s.worker for s in m.shards if s.worker} | set(preds["worker"].unique().to_pylist())),
        shards=_shard_states(m),
        classes=listed,
        classes_left_out=classes_left_out(listed, pred_index, model_classes),
        scores=score_stats(preds["score"].to_numpy() if preds.num_rows else np.zeros(0, np.float32)),
        accuracy=confusion(preds, folder_classes, model_classes) if labelled else None,
        errors=error_summary(errs),
        skipped=skipped_summary(m.skipped),
        lowest_confidence=lowest_confidence(preds, lowest_n),
        drift=run_drift(out_root, m.to_dict(), model),
        outputs=_outputs(m, out_root, run_dir),
    )


def _input_info(m: Manifest) -> InputInfo:
    """The scanned folder as the manifest recorded it: root, layout, folder classes, formats."""
    return InputInfo(
        root=m.input.get("root"),
        layout=m.input.get("layout"),
        classes=m.input.get("classes") or None,
        formats=(m.config.get("input") or {}).get("formats"),
    )


def _outputs(m: Manifest, out_root: UPath, run_dir: UPath) -> dict[str, str | None]:
    """The manifest's outputs, the manifest's path, and report.html's (None: not written yet)."""
    report_file = storage.path(run_dir, REPORT_FILE)
    return {
        **m.outputs,
        "manifest": str(manifest_path(out_root, m.run_id)),
        "report": str(report_file) if storage.is_file(report_file) else None,
    }


def _ending(m: Manifest, out_root: UPath, run_dir: UPath) -> tuple[str, str | None, str | None, str | None]:
    """(status as observed, why it ended so, the command that finishes it, the live writer)."""
    status = observed_status(m.status, run_dir)
    writer = live_writer(run_dir)  # a live run (or rerun): `imgscore rerun` would be refused, so it is not offered
    reason = m.reason
    if status == ABANDONED:
        reason = "its process is gone (killed, out of memory, or the machine restarted) without recording an ending"
    rerun = rerun_command(m.run_id, out_root) if status not in ("complete", "planned") and writer is None else None
    return status, reason, rerun, writer


def _shard_states(m: Manifest) -> dict[str, int]:
    """``{"total": N, state: count, …}``, states in alphabetical order."""
    states: dict[str, int] = {}
    for s in m.shards:
        states[s.state] = states.get(s.state, 0) + 1
    return {"total": len(m.shards), **dict(sorted(states.items()))}
