"""Tie Prefect's temporary server to the life of the ``imgscore`` process.

Without a ``PREFECT_API_URL``, Prefect starts a temporary API server (uvicorn) as a child
process and stops it from an ``atexit`` handler. A process killed with SIGKILL — ``kill -9``, or
the kernel's OOM killer, which picks the biggest process: the scorer — never runs that handler,
and the server lived on forever, holding its port and SQLite database. :func:`guard` starts the
temporary server up front (the same instance Prefect would start lazily: one per process) and a
tiny watchdog process that notes the temporary servers this process starts and stops them as
soon as this process is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys

_WATCHDOG = r"""
import os, signal, sys, time
parent, me = int(sys.argv[1]), os.getpid()
MARK = b"prefect.server.api" + b".server:create_app"
def is_server(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return MARK in f.read()
    except OSError:
        return False
def servers_of(ppid):
    found = set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                st = f.read()
            if int(st[st.rindex(b")") + 2:].split()[1]) == ppid and is_server(d):
                found.add(int(d))
        except (OSError, ValueError):
            pass
    return found
seen = set()
while os.getppid() == parent:
    seen |= servers_of(parent)
    time.sleep(0.5)
alive = [p for p in seen if is_server(p)]
for p in alive:
    os.kill(p, signal.SIGTERM)
for _ in range(50):
    alive = [p for p in alive if is_server(p)]
    if not alive:
        break
    time.sleep(0.1)
for p in alive:
    os.kill(p, signal.SIGKILL)
"""


def guard() -> str | None:
    """Start Prefect's temporary server now, if this process will use one, and watch it.

    Returns the API URL of the temporary server, or None when ``PREFECT_API_URL`` points at a
    real server (nothing to guard). Linux/macOS only for the watchdog; elsewhere it is skipped.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    if os.path.isdir("/proc"):  # started first: a kill during the server's start-up is covered too
        subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
    server = SubprocessASGIServer()  # the per-process instance that get_client() reuses
    server.start()
    return server.api_url
