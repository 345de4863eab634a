"""Prefect's cost per task run, as the scoring flow uses it (docs/scaling.md).

Runs one flow of ``--tasks`` no-op tasks (submitted and collected with ``as_completed``, like
``score_all``) against a temporary test server (SQLite), counting the HTTP requests the flow
process sends and the events it emits, and timing the whole flow.

    python benchmarks/prefect_overhead.py --tasks 200
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=200)
    args = p.parse_args(argv)

    import httpx
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.events.clients import PrefectEventsClient
    from prefect.futures import as_completed
    from prefect.testing.utilities import prefect_test_harness

    requests: collections.Counter[str] = collections.Counter()
    events: collections.Counter[str] = collections.Counter()
    send, asend, emit = httpx.Client.send, httpx.AsyncClient.send, PrefectEventsClient._emit

    def count(request) -> None:
        path = request.url.path
        parts = [("{id}" if len(s) == 36 and s.count("-") == 4 else s) for s in path.split("/")]
        requests[f"{request.method} {'/'.join(parts)}"] += 1

    def sync_send(self, request, *a, **k):
        count(request)
        return send(self, request, *a, **k)

    async def async_send(self, request, *a, **k):
        count(request)
        return await asend(self, request, *a, **k)

    async def counted_emit(self, event):
        events[event.event.rsplit(".", 1)[0] if event.event.startswith("prefect.task-run") else event.event] += 1
        return await emit(self, event)

    @task(cache_policy=NO_CACHE)
    def noop(i: int) -> dict:
        return {"shard_id": i, "scored": 1000}

    @flow
    def many(n: int) -> int:
        futures = [noop.submit(i) for i in range(n)]
        return sum(f.result()["scored"] for f in as_completed(futures))

    with prefect_test_harness(server_startup_timeout=180):
        many(2)  # warm-up: imports, flow registration
        requests.clear()
        events.clear()
        httpx.Client.send, httpx.AsyncClient.send, PrefectEventsClient._emit = sync_send, async_send, counted_emit
        try:
            t0 = time.perf_counter()
            assert many(args.tasks) == 1000 * args.tasks
            wall = time.perf_counter() - t0
        finally:
            httpx.Client.send, httpx.AsyncClient.send, PrefectEventsClient._emit = send, asend, emit
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
