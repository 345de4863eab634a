"""Prefect's cost per task run, as the scoring flow uses it (docs/scaling.md).

Runs one flow of ``--tasks`` no-op tasks (submitted and collected with ``as_completed``, like
``score_all``) against a temporary test server (SQLite), counting the HTTP requests the flow
process sends and the events it emits, and timing the whole flow.

    python -m benchmarks.prefect_overhead --tasks 200
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


class Counts:
    """HTTP requests (``METHOD /path`` with ids as ``{id}``) and events (task-run events by their prefix)."""

    def __init__(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self.events: collections.Counter[str] = collections.Counter()

    def request(self, request: Any) -> None:
        parts = [("{id}" if len(s) == 36 and s.count("-") == 4 else s) for s in request.url.path.split("/")]
        self.requests[f"{request.method} {'/'.join(parts)}"] += 1

    def event(self, name: str) -> None:
        self.events[name.rsplit(".", 1)[0] if name.startswith("prefect.task-run") else name] += 1


@contextlib.contextmanager
def counting(counts: Counts) -> Iterator[Counts]:
    """Count every request httpx sends and every event Prefect emits in this process, for the block."""
    import httpx
    from prefect.events.clients import PrefectEventsClient

    send, asend, emit = httpx.Client.send, httpx.AsyncClient.send, PrefectEventsClient._emit

    def sync_send(self, request, *a, **k):
        counts.request(request)
        return send(self, request, *a, **k)

    async def async_send(self, request, *a, **k):
        counts.request(request)
        return await asend(self, request, *a, **k)

    async def counted_emit(self, event):
        counts.event(event.event)
        return await emit(self, event)

    httpx.Client.send, httpx.AsyncClient.send, PrefectEventsClient._emit = sync_send, async_send, counted_emit
    try:
        yield counts
    finally:
        httpx.Client.send, httpx.AsyncClient.send, PrefectEventsClient._emit = send, asend, emit


def timed_flow(n_tasks: int, counts: Counts) -> float:
    """Wall seconds of one flow of ``n_tasks`` no-op task runs (after a warm-up flow of 2), counted."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed
    from prefect.testing.utilities import prefect_test_harness

    @task(cache_policy=NO_CACHE)
    def noop(i: int) -> dict:
        return {"shard_id": i, "scored": 1000}

    @flow
    def many(n: int) -> int:
        futures = [noop.submit(i) for i in range(n)]
        return sum(f.result()["scored"] for f in as_completed(futures))

    with prefect_test_harness(server_startup_timeout=180):
        many(2)  # warm-up: imports, flow registration
        with counting(counts):
            t0 = time.perf_counter()
            assert many(n_tasks) == 1000 * n_tasks
            return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=200)
    args = p.parse_args(argv)
    counts = Counts()
    wall = timed_flow(args.tasks, counts)
    requests, events = counts.requests, counts.events
    out = {
        "tasks": args.tasks,
        "flow_wall_s": round(wall, 2),
        "ms_per_task_run": round(wall / args.tasks * 1000, 1),
        "http_requests": sum(requests.values()),
        "http_requests_per_task_run": round(sum(requests.values()) / args.tasks, 2),
        "events_per_task_run": round(sum(events.values()) / args.tasks, 2),
        "top_requests": requests.most_common(8),
        "events": dict(events),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
