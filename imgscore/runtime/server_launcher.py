"""``python -m imgscore.runtime.server_launcher LOG``: decide whether imgscore needs a temporary
Prefect server, print its API URL, and become that server.

Run by :class:`imgscore.runtime.server.TemporaryServer` at the top of an ``imgscore`` command, in
its own process, so the server boots while the command imports torch and loads the model. It
reads Prefect's own settings — so a ``PREFECT_API_URL`` from a profile, a ``prefect.toml`` or
the environment still means "no temporary server" — and prints one line on stdout: the URL
(``http://127.0.0.1:PORT/api``), or ``-`` for "none needed". Then it replaces itself (``exec``)
with the server Prefect's ``SubprocessASGIServer`` would start (``imgscore.runtime.compat``), with
its output in ``LOG`` (``-``: this terminal's stderr, for ``--verbose``). Its command line then
names ``prefect.server.api.server:create_app``, which is how the watchdog
(:mod:`imgscore.runtime.server_watchdog`) recognises it.

Why not ``SubprocessASGIServer`` itself: its ``start()`` imports Prefect's whole server stack
in the calling process and blocks until the server answers, which is exactly the wait this
launcher takes off the command's critical path (benchmarks/NOTES.md, start-up).
"""

from __future__ import annotations

import os
import socket
import sys

from imgscore.runtime.compat import prefect_server_command, prefect_server_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str]) -> int:
    import prefect
    from prefect.settings import get_current_settings

    s = get_current_settings()
    if s.api.url or not s.server.ephemeral.enabled:
        print("-", flush=True)
        return 0
    port = free_port()
    env = prefect_server_env(dict(os.environ), s.to_environment_variables(exclude_unset=True))
    print(f"http://127.0.0.1:{port}/api", flush=True)
    log = argv[0] if argv else "-"
    if log == "-":  # --verbose: the server's own output on this terminal's stderr
        os.dup2(2, 1)
    else:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    cmd = prefect_server_command(sys.executable, str(prefect.__module_path__.parent), port)
    os.execve(sys.executable, cmd, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
