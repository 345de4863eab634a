"""Failure notifications, through Prefect's own flow-run state hooks.

Both flows name :func:`notify_hook` as their state hooks: Prefect calls it when the flow run
enters Failed (``on_failure``: over the error budget, a write that failed, bad input), Crashed
(``on_crashed``: Ctrl-C, SIGTERM, an infrastructure failure) or Completed (``on_completion``; it
notifies only with ``notify.on_success``, or when the run drifted from recent nights — a
``drift.max_*`` threshold crossed, ``imgscore.report.drift``). The hook runs in the flow-run process — ``imgscore
run``, ``imgscore serve`` and a work pool's process worker alike — and reads the run's manifest:

- ``notify.webhook_url``: POST :func:`run_payload` as JSON (``Content-Type: application/json``);
- ``notify.block``: ``Block.load("slug/name").notify(body, subject)`` of any Prefect notification
  block (Slack, Microsoft Teams, email via SendGrid, PagerDuty, a custom webhook, …) with
  :func:`run_text` as the body.

A notification that cannot be sent (the endpoint is down, answers 4xx/5xx, times out after
``notify.timeout_s``, the block is missing) is one warning line in the flow run's log; the run's
status and exit code stand. Prefect Automations (UI: Automations → flow run state Failed or
Crashed → "Send a notification") are the alternative that needs no config here (docs/deployments.md).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from upath import UPath

from imgscore.config.flow_params import raw_flow_config
from imgscore.config.running import NotifyConfig
from imgscore.io import storage
from imgscore.io.parquet import ERRORS_SCHEMA, run_part_files
from imgscore.io.storage import AnyPath
from imgscore.report.model import REPORT_FILE
from imgscore.report.text import one_line
from imgscore.runstate.manifest import MANIFEST, observed_status
from imgscore.runstate.state import load_manifest

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import State

TOP_ERRORS = 5  # error types listed in a notification
_RUNS: dict[str, tuple[str, str]] = {}  # flow run id → (imgscore run id, output root): the hook's lookup
_RUNS_LOCK = threading.Lock()
_ENDINGS: dict[str, tuple[str, str | None]] = {}  # imgscore run id → (status, reason) this process ended it with


def remember_ending(run_id: str, status: str, reason: str | None) -> None:
    """Note how this process ended run ``run_id`` (``interrupted``, ``crashed``) — the hook's
    answer when the manifest could not say so (the disk that failed the run), instead of the
    ``abandoned`` that a reader infers once the lock is released."""
    with _RUNS_LOCK:
        _ENDINGS[run_id] = (status, reason)


def remember_run(run_id: str, out_root: AnyPath) -> None:
    """Note which imgscore run the current flow run writes (the flow chooses its run id inside the
    flow run, so a hook cannot read it from the parameters)."""
    from prefect.runtime import flow_run

    fid = flow_run.get_id()
    if fid:
        with _RUNS_LOCK:
            _RUNS[str(fid)] = (run_id, str(out_root))


def _logger(flow_run=None, flow=None):
    try:
        from prefect.logging.loggers import flow_run_logger

        return flow_run_logger(flow_run, flow) if flow_run is not None else logging.getLogger("imgscore")
    except Exception:
        return logging.getLogger("imgscore")


def top_error_types(out_root: AnyPath, run_date: str | None, run_id: str, n: int = TOP_ERRORS) -> list[dict[str, Any]]:
    """The run's ``n`` most frequent (stage, error_type) in its errors part files, most first:
    ``[{stage, error_type, count}]``. Empty when it has none or they cannot be read."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    files = [str(p) for p in run_part_files(out_root, "errors", run_date, run_id)]
    if not files:
        return []
    try:
        t = ds.dataset(files, format="parquet", schema=ERRORS_SCHEMA).to_table(columns=["stage", "error_type"])
    except (pa.ArrowException, OSError):
        return []
    if t.num_rows == 0:
        return []
    g = t.group_by(["stage", "error_type"]).aggregate([([], "count_all")]).to_pylist()
    g.sort(key=lambda r: (-r["count_all"], r["stage"], r["error_type"]))
    return [{"stage": r["stage"], "error_type": r["error_type"], "count": r["count_all"]} for r in g[:n]]


def run_payload(
    out_root: AnyPath,
    run_id: str | None,
    prefect_state: str,
    flow_name: str,
    flow_run_id: str | None,
    message: str | None,
) -> dict[str, Any]:
    """The JSON a webhook receives (docs/deployments.md, "Failure notifications"): ``run_id``, ``status`` (the
    manifest's, or ``abandoned``; the Prefect state's name lowercased when the run never
    planned), ``prefect_state``, ``flow_name``, ``flow_run_id``, ``message`` (one line), ``reason``,
    ``counts`` (scanned, scored, failed, skipped, already_scored, already_failed, pending),
    ``error_rate`` (failed / scanned), ``max_error_rate``, ``min_errors``, ``top_error_types``,
    ``input_root``, ``output_root``, ``manifest``, ``report``, ``known_bad`` (paths, null when
    absent) and ``drift`` (the run against recent nights: ``baseline_runs``, ``psi``, ``warnings``;
    null when not compared)."""
    out = storage.path(out_root)
    payload: dict[str, Any] = {
        "run_id": run_id,
        "status": prefect_state.lower(),
        "prefect_state": prefect_state,
        "flow_name": flow_name,
        "flow_run_id": flow_run_id,
        "message": message,
        "reason": None,
        "counts": None,
        "error_rate": None,
        "max_error_rate": None,
        "min_errors": None,
        "top_error_types": [],
        "input_root": None,
        "output_root": str(out),
        "manifest": None,
        "report": None,
        "known_bad": None,
        "drift": None,
    }
    if not run_id:
        return payload
    run_dir = storage.path(out, "runs", run_id)
    if not storage.is_file(storage.path(run_dir, MANIFEST)):
        return payload
    payload.update(_manifest_fields(out, run_dir, run_id))
    return payload


def _manifest_fields(out: UPath, run_dir: UPath, run_id: str) -> dict[str, Any]:
    """The fields of :func:`run_payload` the run's manifest in ``run_dir`` gives: its status
    (or how this process ended it, while the manifest still says running), reason, counts, error
    budget, top error types, roots, file paths and drift."""
    m = load_manifest(run_dir)
    c = m.counts
    run_cfg = (m.config or {}).get("run") or {}
    status, reason = observed_status(m.status, run_dir), m.reason
    if m.status in ("running", "planned"):  # not written: how this process ended it, if it did
        with _RUNS_LOCK:
            status, reason = _ENDINGS.get(run_id, (status, reason))
    return {
        "status": status,
        "reason": reason,
        "counts": {
            k: getattr(c, k)
            for k in ("scanned", "scored", "failed", "skipped", "already_scored", "already_failed", "pending")
        },
        "error_rate": round(c.failed / m.total_pairs, 6) if m.total_pairs else 0.0,  # of (image, model) pairs
        "max_error_rate": run_cfg.get("max_error_rate"),
        "min_errors": run_cfg.get("min_errors"),
        "top_error_types": top_error_types(out, m.run_date, m.run_id),
        "input_root": (m.input or {}).get("root"),
        "manifest": str(storage.path(run_dir, MANIFEST)),
        "report": str(storage.path(run_dir, REPORT_FILE))
        if storage.is_file(storage.path(run_dir, REPORT_FILE))
        else None,
        "known_bad": str(storage.path(run_dir, "already_failed.parquet")) if c.already_failed else None,
        "drift": m.drift or None,
    }


def refusal_payload(out_root: AnyPath, message: str, flow_name: str = "score-images") -> dict[str, Any]:
    """The payload of a run refused before it planned (no flow run, nothing written): the fields
    of :func:`run_payload`, ``status`` ``refused``, ``message`` the refusal's first line."""
    p = run_payload(
        out_root, None, "refused", flow_name, None, (message or "").splitlines()[0][:500] if message else None
    )
    p["prefect_state"] = None
    return p


def run_text(p: dict[str, Any]) -> tuple[str, str]:
    """(subject, body) for a notification block: one line of outcome, then the numbers and paths."""
    subject = f"imgscore {p['flow_name']} {p['run_id'] or '(not planned)'}: {p['status']}"
    lines = [subject]
    c = p.get("counts")
    if c:
        rate = f"{p['error_rate']:.2%}" if p.get("error_rate") is not None else "-"
        lines.append(
            f"scanned {c['scanned']}, scored {c['scored']}, failed {c['failed']} ({rate}), "
            f"already scored {c['already_scored']}, already failed {c['already_failed']}"
        )
    if p.get("reason") or p.get("message"):
        lines.append(f"why: {p.get('reason') or p.get('message')}")
    lines += [f"drift: {w}" for w in (p.get("drift") or {}).get("warnings") or []]
    if p.get("top_error_types"):
        lines.append(
            "top errors: " + ", ".join(f"{e['stage']}/{e['error_type']} {e['count']}" for e in p["top_error_types"])
        )
    lines += [f"{k}: {p[k]}" for k in ("report", "manifest", "known_bad") if p.get(k)]
    return subject, "\n".join(lines)


def post_json(url: str, payload: dict[str, Any], timeout_s: float) -> None:
    """POST ``payload`` as JSON to ``url``.

    Raises:
        httpx.HTTPError: connection refused, timeout after ``timeout_s`` seconds, a 4xx/5xx answer.
    """
    import httpx

    resp = httpx.post(
        url,
        content=json.dumps(payload, default=str).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "imgscore"},
        timeout=timeout_s,
    )
    resp.raise_for_status()


def send(cfg: NotifyConfig, payload: dict[str, Any], log=None) -> list[str]:
    """Send ``payload`` to the configured webhook and block; return what was sent to
    (``["webhook", "block"]``). Never raises: a failure is one warning line on ``log``."""
    log = log or logging.getLogger("imgscore")
    sent = []
    if cfg.webhook_url:
        try:
            post_json(cfg.webhook_url, payload, cfg.timeout_s)
            sent.append("webhook")
        except Exception as exc:
            log.warning(
                "notification not sent: notify.webhook_url POST failed (%s); the run's status stands", one_line(exc)
            )
    if cfg.block:
        try:
            from prefect.blocks.core import Block

            subject, body = run_text(payload)
            # prefect types Block.load as possibly a coroutine (it dispatches on the caller); called from
            # sync code it is the block
            Block.load(cfg.block).notify(body, subject=subject)  # type: ignore[union-attr]
            sent.append("block")
        except Exception as exc:
            log.warning(
                "notification not sent: notify.block %r failed (%s); the run's status stands", cfg.block, one_line(exc)
            )
    return sent


def state_message(text: str | None) -> str | None:
    """A flow run's state message as a notification's one-line ``message``: Prefect's
    "Flow run encountered an exception: " and the type name of one of imgscore's own errors are
    dropped (``run … over its error budget: …``); another exception keeps its type. At most 500
    characters."""
    from imgscore.errors import ImgscoreError, type_names
    from imgscore.runtime.compat import PREFECT_FLOW_EXCEPTION_MESSAGE

    if not text:
        return None
    line = text.splitlines()[0].removeprefix(PREFECT_FLOW_EXCEPTION_MESSAGE).strip()
    name, sep, rest = line.partition(": ")
    if sep and name in type_names(ImgscoreError):
        line = rest
    return line[:500]


def notify_hook(flow: Flow[Any, Any], flow_run: FlowRun, state: State[Any]) -> None:
    """Prefect state hook (``on_failure``, ``on_crashed``, ``on_completion``) of both flows: send
    the run's summary as ``notify.*`` says. Never raises (a failure is one warning line)."""
    log = _logger(flow_run, flow)
    try:
        params = flow_run.parameters or {}
        raw = raw_flow_config(params) if params.get("config_file") else (params.get("config") or {})
        cfg = NotifyConfig.model_validate(raw.get("notify") or {})  # a config that failed elsewhere still notifies
        if not (cfg.webhook_url or cfg.block):
            return
        with _RUNS_LOCK:
            run_id, out_root = _RUNS.get(
                str(flow_run.id), (params.get("run_id"), str((raw.get("output") or {}).get("root") or "outputs"))
            )
        message = state_message(state.message)
        state_name = state.name or ""  # prefect names every state (by default after its type)
        try:
            payload = run_payload(out_root, run_id, state_name, flow.name, str(flow_run.id), message)
        except Exception as exc:  # the manifest cannot be read: still say that the run ended so
            payload = run_payload(
                out_root,
                None,
                state_name,
                flow.name,
                str(flow_run.id),
                f"{message} (manifest unreadable: {one_line(exc)})",
            )
            payload["run_id"] = run_id
    except Exception as exc:
        log.warning("notification not sent: %s", one_line(exc))
        return
    if state.is_completed() and not cfg.on_success and not (payload.get("drift") or {}).get("warnings"):
        return  # a quiet night: completed, nothing drifted
    send(cfg, payload, log)
