"""What a run leaves for people at its end: report.html and Prefect artifacts.

Called from the flow's finish step. Nothing here may fail a run: a report or artifact that
cannot be written is logged as a warning (with the reason) and the run's status stands.

Artifact keys are stable per flow (``imgscore.report.markdown.artifact_key``), so Prefect's Artifacts page
shows each one's history night over night:

- ``<flow>-summary``: table artifact, one row of counts for the run;
- ``<flow>-report``: markdown artifact, per-class table, error summary, the report's path;
- ``<flow>-drift``: table artifact, the run against recent nights (PSI, largest class shift,
  confidence, error rate, embedding distance, warnings), when there were earlier nights to compare;
- ``<flow>-progress``: progress artifact (percent of images done), updated as shards finish;
  for ``score-images`` the run's images, for ``rerun-failed`` the images that rerun rescores.
"""

from __future__ import annotations

import logging
import time

from imgscore.io.storage import AnyPath
from imgscore.report import build, html, markdown
from imgscore.report.drift_result import DriftComparison
from imgscore.report.text import one_line

DEFAULT_FLOW = "score-images"


def _logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run (plain function call, tests)
        return logging.getLogger("imgscore")


def _flow_name(default: str = DEFAULT_FLOW) -> str:
    try:
        from prefect.runtime import flow_run

        return flow_run.flow_name or default
    except Exception:
        return default


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publish_run_report(
    out_root: AnyPath, run_id: str, flow_name: str | None = None, artifacts: bool = True
) -> str | None:
    """Write ``runs/RUN_ID/report.html`` and, inside a flow run, the summary and markdown artifacts.

    Returns:
        The report's path as a string, or None when it could not be written (logged as a
        warning; never raises).
    """
    log = _logger()
    flow_name = flow_name or _flow_name()
    try:
        report = build.build_report(out_root, run_id)
    except Exception as exc:
        log.warning("run report for %s not written: %s", run_id, one_line(exc))
        log.debug("run report for %s", run_id, exc_info=True)
        return None
    path: str | None = None
    try:
        path = str(html.write_html_report(report, out_root))
    except Exception as exc:
        log.warning("report.html for %s not written: %s", run_id, one_line(exc))
        log.debug("report.html for %s", run_id, exc_info=True)
    if artifacts and _in_run():
        try:
            from prefect.artifacts import create_markdown_artifact, create_table_artifact

            create_table_artifact(
                markdown.summary_row(report),
                key=markdown.artifact_key(flow_name, "summary"),
                description=f"imgscore run {run_id}: counts",
            )
            create_markdown_artifact(
                markdown.markdown_summary(report, path),
                key=markdown.artifact_key(flow_name, "report"),
                description=f"imgscore run {run_id}",
            )
            drift_row = markdown.drift_row(report)
            if drift_row and isinstance(report.drift, DriftComparison):
                warned = len(report.drift.warnings)
                create_table_artifact(
                    drift_row,
                    key=markdown.artifact_key(flow_name, "drift"),
                    description=f"imgscore run {run_id} against recent nights: {warned} warning(s)",
                )
        except Exception as exc:
            log.warning("Prefect artifacts for %s not created: %s", run_id, one_line(exc))
    return path


class RunProgressArtifact:
    """A Prefect progress artifact (percent of the run's images done) updated as shards finish.

    Created by :meth:`start` at 0 % (at 100 % when there is nothing to do); :meth:`update` is
    cheap to call per shard (at most one API call per ``min_interval_s``, plus the final 100 %).
    Outside a flow run, or when the API call fails, it logs once and does nothing.
    """

    def __init__(self, artifact_id=None, total: int = 0, min_interval_s: float = 1.0, title: str | None = None):
        self.artifact_id = artifact_id
        self.total = total
        self.min_interval_s = min_interval_s
        self.title = title
        self._last = 0.0
        self.last_progress: float | None = (100.0 if total == 0 else 0.0) if artifact_id else None

    @classmethod
    def start(
        cls,
        manifest: dict,
        flow_name: str | None = None,
        min_interval_s: float = 1.0,
        total: int | None = None,
        title: str | None = None,
    ) -> RunProgressArtifact:
        """Create the artifact ``<flow>-progress`` for ``manifest``'s run; never raises.

        Args:
            manifest: the run's manifest (``run_id``, ``shards[].images``).
            flow_name: for the key; default the current flow run's name (``score-images``).
            min_interval_s: least seconds between two API updates below 100 %.
            total: images this flow will finish; default every image in the run's shards (a
                rerun passes only the images it rescores, with ``done`` to :meth:`update`).
            title: description prefix; default ``imgscore run RUN_ID``.
        """
        total = sum(s.get("images", 0) for s in manifest.get("shards", [])) if total is None else total
        title = title or f"imgscore run {manifest['run_id']}"
        if not _in_run():
            return cls(None, total, min_interval_s, title)
        try:
            from prefect.artifacts import create_progress_artifact

            aid = create_progress_artifact(
                100.0 if total == 0 else 0.0,
                key=markdown.artifact_key(flow_name or _flow_name(), "progress"),
                description=f"{title}: 0/{total} images",
            )
        except Exception as exc:
            _logger().warning("progress artifact not created: %s: %s", type(exc).__name__, exc)
            aid = None
        return cls(aid, total, min_interval_s, title)

    def update(self, manifest: dict, done: int | None = None) -> float | None:
        """Set progress to done / total in percent; return the value sent, or None (throttled,
        outside a run, or the API call failed: logged, never raises).

        ``done`` defaults to the manifest's scored + failed images (right for ``score-images``);
        a rerun passes the images of the work it has finished.
        """
        if self.artifact_id is None:
            return None
        c = manifest["counts"]
        done = c.get("scored", 0) + c.get("failed", 0) if done is None else done
        pct = round(100.0 * min(done, self.total) / self.total, 2) if self.total else 100.0
        now = time.monotonic()
        if pct < 100.0 and now - self._last < self.min_interval_s:
            return None
        self._last = now
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(
                self.artifact_id,
                pct,
                description=f"{self.title or 'imgscore run ' + manifest['run_id']}: {done}/{self.total} images, "
                f"{c.get('failed', 0)} errors",
            )
        except Exception as exc:
            _logger().warning("progress artifact not updated: %s: %s", type(exc).__name__, exc)
            self.artifact_id = None
            return None
        self.last_progress = pct
        return pct
