"""A planned run taken up again: a Prefect retry of the same flow run finds the run its earlier
attempt planned and resumes it; a rerun loads an existing run's plan to write on. Planning a new
run is :mod:`imgscore.runstate.plan`.
"""

from __future__ import annotations

import json

from imgscore.errors import UsageError
from imgscore.io import file_ops, storage
from imgscore.io.containment import UnsafePathError
from imgscore.io.parquet import part_dir
from imgscore.io.storage import AnyPath
from imgscore.runstate import lock as run_lock
from imgscore.runstate.commits import check_run_state, run_dir_of, run_folders
from imgscore.runstate.manifest import MANIFEST, clear_stop
from imgscore.runstate.plan import RunPlan, shard_refs
from imgscore.runstate.state import RunState, load_manifest


def load_plan(run_dir: AnyPath) -> RunPlan:
    """An existing run's plan and state (summary + ledger), to write on: a retry or a rerun.
    ``run_dir`` is ``OUT/runs/RUN_ID`` (:func:`run_dir_of`); every path the run state names is
    checked to stay inside ``OUT`` first (``imgscore.runstate.commits.check_run_state``).

    Raises:
        FileNotFoundError: no manifest.json in ``run_dir``.
        UnsafePathError: the run state names a path outside ``OUT`` (exit 2).
    """
    run_dir = storage.path(run_dir)
    clear_stop(run_dir)  # an interrupted run taken up again: its shards may start and commit
    state = RunState.open(run_dir)
    m = state.manifest
    check_run_state(m, storage.parent_of(storage.parent_of(run_dir)), run_dir)
    return RunPlan(m.run_id, m.run_date or "", run_dir, shard_refs(m, run_dir), state)


def find_retried_run(out_root: AnyPath, flow_run_id: str | None, run_id: str | None, run_count: int) -> str | None:
    """The run id an earlier attempt of this same Prefect flow run planned, or None.

    A retry of a flow run (Prefect UI "Retry", ``prefect flow-run retry``, ``retries=``) calls
    the flow again with the same parameters and the same flow run id: with ``run.run_id`` set we
    look at that run only; without it, at every manifest in ``out_root`` (newest first) — but
    only when ``run_count`` (Prefect's count of this flow run's attempts) says this is a retry.
    """
    if not flow_run_id or (run_id is None and run_count <= 1):
        return None
    runs = storage.join(out_root, "runs")
    if run_id:
        urls = [storage.join(runs, run_id, MANIFEST)]
    else:
        urls = sorted(storage.glob(storage.join(runs, "*", MANIFEST)), reverse=True)
    for url in urls:
        if storage.relative_within(runs, url) is None:
            continue  # a link out of the output root: not a manifest of this root
        try:
            if str(flow_run_id).encode() not in file_ops.read_head(url, 65536):
                continue  # the id sits near the top of a manifest: most files are never read whole nor parsed
            if json.loads(storage.read_bytes(url)).get("flow_run_id") == str(flow_run_id):
                return storage.name_of(storage.parent_of(url))
        except (OSError, ValueError):
            continue
    return None


def resume_plan(
    out_root: AnyPath, run_id: str, flow_run_id: str | None, input_root: AnyPath | None = None
) -> RunPlan | None:
    """The plan of ``run_id`` when this same flow run wrote it (a retry), with the temp files its
    killed attempt left removed; None when the run does not exist yet. Shards whose commit
    records match their part files are not scored again (``imgscore.runstate.commits.committed``).

    ``input_root``: the flow run's ``input.root``; the manifest must name the same folder (the
    manifest is read back from the output root, the flow run's parameters are not).

    Raises:
        UsageError: the run exists but belongs to another flow run (or to none), or its manifest
            names another input folder; UnsafePathError: its run state names a path outside
            ``out_root``.
    """
    run_dir = run_dir_of(out_root, run_id)
    if not storage.exists(storage.path(run_dir, MANIFEST)):
        return None
    m = load_manifest(run_dir)
    if not flow_run_id or m.flow_run_id != str(flow_run_id):
        raise UsageError(
            f"run {run_id!r} already exists in {out_root}; use `imgscore rerun {run_id}` or another run.run_id"
        )
    recorded = m.input.get("root")
    if input_root is not None and (not recorded or not storage.same_root(recorded, input_root)):
        raise UnsafePathError(
            f"run {run_id}: manifest.json input.root {recorded!r} is not the flow run's input.root "
            f"{str(input_root)!r}; the run state was edited — restore it, or start a new run"
        )
    plan = load_plan(run_dir)
    run_lock.clean_run_temp_files(run_folders(out_root, plan.run_date, run_id))
    plan.manifest.outputs = {t: str(part_dir(out_root, t, plan.run_date, run_id)) for t in ("predictions", "errors")}
    return plan
