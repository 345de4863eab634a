"""Environment defaults applied before Prefect is imported, so users see none of its noise.

- ``PREFECT_SERVER_ANALYTICS_ENABLED=false``: offline, the temporary server's telemetry only
  prints "Failed to send telemetry" and sqlite "database is locked" tracebacks (CASES.md).
- Prefect's console handler at WARNING: our CLI prints its own progress and summary; the flow
  and task run logs still reach the Prefect API (and the UI of a real server).
Each is a default: a value the user exported wins.
"""

import os


def apply(verbose: bool = False) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
