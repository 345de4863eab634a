"""``imgscore serve``: the scoring flow on a cron schedule, from one long-running process.

For teams without a work pool: ``flow.serve`` machinery (``prefect.serve``) registers a
deployment with its schedule on the Prefect API and runs each scheduled run in a subprocess of
this one. With a work pool, use ``prefect.yaml`` and ``prefect deploy`` instead (README.md).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from tasks.config import Config, load_config
from tasks.errors import ConfigError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment


def check_schedule(cron: str, timezone: str) -> None:
    """Validate a cron expression and an IANA timezone name the way Prefect's API will.

    Raises:
        ConfigError: naming the bad value and an example of a good one.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        which = f"--timezone {timezone!r}" if "timezone" in msg.lower() else f"--cron {cron!r}"
        raise ConfigError(
            f"{which} is not a valid schedule ({msg}); example: --cron '0 2 * * *' --timezone Europe/Berlin"
        ) from None


def build_deployment(cfg: Config, cron: str, timezone: str, name: str = "nightly-scoring") -> RunnerDeployment:
    """The served deployment: flow ``score-images``, ``config`` parameter, one cron schedule.

    Args:
        cfg: the validated config every scheduled run receives (``Config.to_dict()``).
        cron: five-field cron expression, e.g. ``"0 2 * * *"`` (02:00 daily).
        timezone: IANA zone the cron expression is read in, e.g. ``"UTC"``, ``"Europe/Berlin"``.
        name: deployment name; runs show as ``score-images/<name>``.

    Raises:
        ConfigError: bad cron or timezone; ``input.root`` unset; ``run.run_id`` set (every
            night would reuse, and be refused, the same run id).
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.score_images import score_images

    check_schedule(cron, timezone)
    if cfg.input.root is None:
        raise ConfigError("input.root is not set; a scheduled run needs it: --set input.root=/data/images or set it in --config")
    if cfg.run.run_id is not None:
        raise ConfigError(
            f"run.run_id={cfg.run.run_id!r} is fixed, so the second night would be refused as a duplicate; "
            "leave run.run_id unset for a schedule (each run gets a new id)"
        )
    return score_images.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"config": cfg.to_dict()},
        description=f"imgscore: score {cfg.input.root} with {cfg.model.arch} on '{cron}' ({timezone})",
        tags=["imgscore", "served"],
        # The runner loads the flow by module path, so any working directory with the package installed works.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_deployments(*deployments: RunnerDeployment) -> None:
    """Register ``deployments`` and poll for their scheduled runs until interrupted (blocks)."""
    from prefect import serve

    serve(*deployments, pause_on_shutdown=True)


def main(args) -> int:
    """``imgscore serve [--config FILE] [--set K=V] [--cron EXPR] [--timezone TZ] [--name NAME]``.

    Returns 0 after Ctrl-C (the schedule is paused while nothing serves it); raises
    :class:`ConfigError` (exit 2) for a bad config or schedule before anything is registered.
    """
    from prefect.settings import PREFECT_API_URL

    cfg = load_config(args.config, args.overrides)
    deployment = build_deployment(cfg, args.cron, args.timezone, args.name)
    if cfg.input.root is not None and not cfg.input.root.is_dir():  # may be a share mounted later: warn, serve
        print(f"imgscore: warning: input.root {str(cfg.input.root)!r} is not a folder on this machine now; "
              "scheduled runs will exit 2 until it is", file=sys.stderr)
    api = PREFECT_API_URL.value()
    where = api or "a temporary local Prefect server (set PREFECT_API_URL, e.g. from `prefect server start`, to see runs in the UI)"
    print(f"imgscore: serving score-images/{args.name} on '{args.cron}' ({args.timezone}) via {where}; Ctrl-C stops", file=sys.stderr)
    serve_deployments(deployment)
    return 0
