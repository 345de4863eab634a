"""``imgscore serve``: the scoring flow on a cron schedule, from one long-running process.

For teams without a work pool: ``flow.serve`` machinery (``prefect.serve``) registers a
deployment with its schedule on the Prefect API and runs each scheduled run in a subprocess of
this one. With a work pool, use ``prefect.yaml`` and ``prefect deploy`` instead (docs/deployments.md).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from imgscore.config.loading import load_config
from imgscore.config.schema import Config
from imgscore.errors import ConfigError
from imgscore.io import storage

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

    from imgscore.flows.score_images import score_images

    check_schedule(cron, timezone)
    if cfg.input.root is None:
        raise ConfigError(
            "input.root is not set; a scheduled run needs it: --set input.root=/data/images or set it in --config"
        )
    if cfg.run.run_id is not None:
        raise ConfigError(
            f"run.run_id={cfg.run.run_id!r} is fixed, so the second night would be refused as a duplicate; "
            "leave run.run_id unset for a schedule (each run gets a new id)"
        )
    # prefect types to_deployment as possibly a coroutine (it dispatches on the caller); called from
    # sync code it is the deployment
    return score_images.to_deployment(  # type: ignore[return-value]
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"config": cfg.to_dict()},
        description=f"imgscore: score {cfg.input.root} with {', '.join(m.resolved_name for m in cfg.scored_models())} "
        f"on '{cron}' ({timezone})",
        tags=["imgscore", "served"],
        # The runner loads the flow by module path, so any working directory with the package installed works.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_deployments(*deployments: RunnerDeployment, prefect_hint: bool = True) -> None:
    """Register ``deployments`` and poll for their scheduled runs until interrupted (blocks).

    ``prefect_hint``: let Prefect print its start message ("To trigger any of these deployments
    ... prefect deployment run"), via ``prefect.serve``'s ``print_starting_message``. Pass False
    when that command cannot reach the API this process serves on (a temporary server).
    """
    from prefect import serve

    serve(*deployments, pause_on_shutdown=True, print_starting_message=prefect_hint)


def temporary_server_hint(name: str) -> str:
    """The line printed instead of Prefect's "prefect deployment run" hint when no
    ``PREFECT_API_URL`` is set: the temporary server lives only inside this process, so no
    other shell can reach it."""
    return (
        f"imgscore: no PREFECT_API_URL: the schedule runs inside this process, on a temporary Prefect server that "
        f"no other shell can reach; to trigger runs from another shell (prefect deployment run 'score-images/{name}') "
        "start a real server with `prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api` "
        "in both shells and restart `imgscore serve`"
    )


def main(args, temporary_url: str | None = None) -> int:
    """``imgscore serve [--config FILE] [--set K=V] [--cron EXPR] [--timezone TZ] [--name NAME]``.

    Returns 0 after Ctrl-C (the schedule is paused while nothing serves it); raises
    :class:`ConfigError` (exit 2) for a bad config or schedule before anything is registered.
    ``temporary_url``: the API URL of the temporary server the CLI started for this process
    (``imgscore.runtime.startup.Session.temporary_api_url``), which counts as no server. Without
    ``PREFECT_API_URL`` Prefect's start message is replaced by :func:`temporary_server_hint`
    (its ``prefect deployment run`` could not reach this process's temporary server); with it,
    Prefect's message is printed as usual.
    """
    from prefect.settings import PREFECT_API_URL

    cfg = load_config(args.config, args.overrides)
    deployment = build_deployment(cfg, args.cron, args.timezone, args.name)
    root = cfg.input.root  # an object-store URL is listed when each run starts
    local = storage.local_path(root) if root is not None else None
    if local is not None and not local.is_dir():  # may be a share mounted later: warn, serve
        print(
            f"imgscore: warning: input.root {str(cfg.input.root)!r} is not a folder on this machine now; "
            "scheduled runs will exit 2 until it is",
            file=sys.stderr,
        )
    api = PREFECT_API_URL.value()
    if api and api == temporary_url:  # the CLI exported its own temporary server's URL
        api = None
    print(
        f"imgscore: serving score-images/{args.name} on '{args.cron}' ({args.timezone}) via "
        f"{api or 'a temporary Prefect server'}; "
        "Ctrl-C stops",
        file=sys.stderr,
    )
    if not api:  # Prefect's own "prefect deployment run" hint would point at a server no other shell can reach
        print(temporary_server_hint(args.name), file=sys.stderr)
    serve_deployments(deployment, prefect_hint=bool(api))
    return 0
