"""``python -m imgscore.runtime.server_watchdog PID``: stop the temporary Prefect servers of
process ``PID`` as soon as that process is gone.

A process killed with SIGKILL — or by the kernel's OOM killer, which picks the biggest process:
the scorer — never runs its exit handlers, and its temporary server lived on, holding its port
and SQLite database. This small process (started by :class:`imgscore.runtime.server.TemporaryServer`
before the server, in its own session so a terminal's Ctrl-C does not reach it) notes the
server children of ``PID`` every half second; once ``PID`` is gone it sends them SIGTERM and,
after 5 s, SIGKILL. It uses ``psutil``, so it works where there is no ``/proc`` (macOS).
"""

from __future__ import annotations

import os
import sys
import time

import psutil

SERVER_MARK = "prefect.server.api.server:create_app"  # the server's command line names its app
POLL_S = 0.5


def is_server(p: psutil.Process) -> bool:
    try:
        return any(SERVER_MARK in part for part in p.cmdline())
    except psutil.Error:
        return False


def gone(parent: psutil.Process, parent_pid: int) -> bool:
    """The watched process has exited (or is a zombie waiting to be reaped), or we were orphaned."""
    if os.getppid() != parent_pid:
        return True
    try:
        return not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def watch(parent_pid: int, poll_s: float = POLL_S) -> list[int]:
    """Block until ``parent_pid`` is gone; then stop the servers it had. Returns their pids."""
    try:
        parent = psutil.Process(parent_pid)
    except psutil.Error:
        return []
    seen: dict[int, psutil.Process] = {}
    while not gone(parent, parent_pid):
        try:
            for child in parent.children():
                if child.pid not in seen and is_server(child):
                    seen[child.pid] = child
        except psutil.Error:
            pass
        time.sleep(poll_s)
    alive = [p for p in seen.values() if p.is_running()]  # is_running also rules out a reused pid
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return sorted(seen)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
