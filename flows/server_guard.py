"""Prefect's temporary API server for one ``imgscore`` process: started early, stopped always.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server (uvicorn on SQLite) as a child
process the first time a flow runs, waits for it, and stops it from an ``atexit`` handler. Two
things about that did not suit a command-line tool:

- **Start-up time.** Prefect starts it only when the flow starts, after the scorer has imported
  torch, torchvision and Prefect and loaded the model; the server then needs about 8 s of its own
  (importing Prefect's server, opening SQLite) on this 2-core machine while the scorer waits.
  :func:`launch` starts it at the top of the command instead, so the two run side by side; by the
  time the model is loaded the server is usually up (benchmarks/NOTES.md, start-up).
- **kill -9.** A process killed with SIGKILL — or by the kernel's OOM killer, which picks the
  biggest process: the scorer — never runs its exit handlers, and the server lived on forever,
  holding its port and SQLite database. :func:`launch` also starts a tiny watchdog process that
  stops this process's servers as soon as this process is gone.

The server is Prefect's own (the same ``uvicorn prefect.server.api.server:create_app`` command,
settings and environment that Prefect's ``SubprocessASGIServer`` uses); it is launched by a small
helper process that reads Prefect's settings — so a ``PREFECT_API_URL`` from a profile, a
``prefect.toml`` or the environment still means "no temporary server" — and then becomes the
server. This process learns the server's URL before it imports Prefect and exports it as
``PREFECT_API_URL``, so Prefect (and Dask workers, imgscore.flows.runner) simply talk to it.
"""

from __future__ import annotations

import atexit
import os
import select
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

_WATCHDOG = r"""
import os, signal, sys, time
parent, me = int(sys.argv[1]), os.getpid()
MARK = b"prefect.server.api" + b".server:" + b"create" + b"_app"  # split: this script is no server
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

# Runs in the helper process: decide from Prefect's own settings, print the URL (or "-" for "no
# temporary server"), then exec the server with the environment Prefect's SubprocessASGIServer
# gives it. Its command line names prefect.server.api.server:create_app, so the watchdog sees it.
_LAUNCHER = r"""
import os, socket, sys
import prefect
from prefect.settings import get_current_settings
s = get_current_settings()
if s.api.url or not s.server.ephemeral.enabled:
    print("-", flush=True)
    sys.exit(0)
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
env = {**os.environ, **s.to_environment_variables(exclude_unset=True),
       "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
print(f"http://127.0.0.1:{port}/api", flush=True)
out = sys.argv[1]
if out == "-":  # --verbose: the server's own output on this terminal's stderr
    os.dup2(2, 1)
else:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
os.execve(sys.executable, [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
          "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
          "--log-level", "error", "--lifespan", "on", "--timeout-graceful-shutdown", "3"], env)
"""


def drain_prefect_services(timeout: float = 30.0) -> None:
    """Send this process's pending Prefect logs and events now.

    Used twice: on each Dask worker before it closes (imgscore.flows.runner) — otherwise it sends them
    from exit handlers while its nanny waits 4 s to close it, and on a busy machine the nanny kills
    it ("Worker process still alive after 4.0 seconds, killing") and the last task-run events are
    lost — and here before the temporary server stops: logging's own exit handler would otherwise
    try to send the last logs to a server already gone, and wait 5 s for it.
    """
    import threading

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    def drain() -> None:  # in a plain thread: drain_all returns an un-awaited coroutine inside a loop
        for service in (APILogWorker, EventsWorker):
            service.drain_all(timeout=timeout)

    t = threading.Thread(target=drain, name="imgscore-drain-prefect", daemon=True)
    t.start()
    t.join(2 * timeout + 5)


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not come up (its log tail is in the message)."""


class _Temporary:
    def __init__(self, verbose: bool):
        self.log = "-"  # --verbose: the server writes to this terminal
        if not verbose:
            fd, self.log = tempfile.mkstemp(prefix="imgscore-prefect-server-", suffix=".log")
            os.close(fd)  # the server opens it itself
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, self.log],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            close_fds=True,
            # Its own session: a terminal's Ctrl-C signals the whole foreground process group, and
            # a server killed by it left the interrupted flow unable to report its crash (70 s of
            # retries, exit 1, no rerun hint). This process stops it at exit; the watchdog after kill -9.
            start_new_session=True,
        )
        self.url: str | None = None
        self.known = False
        atexit.register(self.stop)

    def read_url(self, timeout: float) -> str | None:
        if not self.known:
            assert self.proc.stdout is not None
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                self.fail(f"its helper did not read Prefect's settings within {timeout:.0f} s")
            line = self.proc.stdout.readline().decode(errors="replace").strip()
            self.proc.stdout.close()
            self.known = True
            if line.startswith("http"):
                self.url = line
            elif line != "-":
                self.fail(f"the helper that starts it exited with code {self.proc.wait()}")
        return self.url

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self.fail(f"it exited with code {code}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        self._drop_log()  # needed only to explain a failed start; kill -9 cannot leak it now
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.05)
        self.fail(f"not healthy after {timeout:.0f} s", "or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")

    def fail(self, why: str, also: str = "") -> None:
        tail = ""
        if self.log != "-":
            try:
                with open(self.log, errors="replace") as f:
                    lines = [ln.strip() for ln in f.read().splitlines() if ln.strip().strip("^~ ")]
                tail = " | ".join(lines[-3:]).rstrip(".")  # the exception and uvicorn's last word, not the traceback
            except OSError:
                pass
        self.stop()
        raise ServerStartError(
            f"Prefect's temporary API server did not start: {why}" + (f"; its log ends: {tail}" if tail else "")
            + f". Start a server (`prefect server start`) and export PREFECT_API_URL{', ' + also if also else ''}"
        )

    def stop(self) -> None:
        # SIGTERM, then at most 1 s: uvicorn sometimes waits out its graceful-shutdown timeout for
        # this process's own open connections (measured: 0.3 s or 5 s at random). Whatever is
        # still running when this process is gone gets SIGTERM and then SIGKILL from the watchdog.
        if self.proc.poll() is None:
            if "prefect.logging.handlers" in sys.modules:
                drain_prefect_services(timeout=5.0)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self._drop_log()

    def _drop_log(self) -> None:
        if self.log != "-":
            try:
                os.unlink(self.log)  # the server keeps writing to its open file, now nameless
            except OSError:
                pass
            self.log = "-"


_SERVER: _Temporary | None = None
_WATCHING = False


def _watch() -> None:
    global _WATCHING
    if not _WATCHING and os.path.isdir("/proc"):
        _WATCHING = True
        subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,  # survives the Ctrl-C that ends this process
        )


def launch(verbose: bool = False) -> None:
    """Start Prefect's temporary server in the background now, if this process will need one.

    Returns at once (a few milliseconds): nothing is imported here. Does nothing when
    ``PREFECT_API_URL`` is in the environment, or when Prefect is already imported in this
    process (then :func:`guard` uses Prefect's own ``SubprocessASGIServer``). Idempotent.
    """
    global _SERVER
    if _SERVER is not None or os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return
    _watch()  # started first: a kill during the server's start-up is covered too
    _SERVER = _Temporary(verbose)


def api_url() -> str | None:
    """The temporary server's API URL, exported as ``PREFECT_API_URL``; call before importing Prefect.

    Blocks until the helper has read Prefect's settings (about 2 s after :func:`launch`, usually
    long past). ``None`` when no temporary server is used (a configured server, or none launched).

    Raises:
        ServerStartError: the helper process failed.
    """
    if _SERVER is None:
        return None
    url = _SERVER.read_url(timeout=_startup_timeout())
    if url:
        os.environ["PREFECT_API_URL"] = url
    return url


def temporary_api_url() -> str | None:
    """The API URL of the temporary server :func:`launch` started (and exported as
    ``PREFECT_API_URL``), or None: no temporary server, or not known yet. Lets a caller tell it
    from a configured server that other shells can reach."""
    return _SERVER.url if _SERVER is not None else None


def guard() -> str | None:
    """Make sure the temporary server (if any) is up, and watched, before a flow runs.

    With :func:`launch` called earlier: waits until its ``/health`` answers (up to
    ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``). Without it (Prefect already imported,
    e.g. a library call): starts Prefect's own ``SubprocessASGIServer`` now under the watchdog.
    Returns the temporary server's API URL, or None when ``PREFECT_API_URL`` points at a real
    server (nothing to guard). The watchdog is Linux/macOS only (``/proc``); elsewhere skipped.

    Raises:
        ServerStartError: the temporary server did not come up in time.
    """
    if _SERVER is not None:
        url = api_url()
        if url:
            _SERVER.wait_ready(_startup_timeout())
        return url
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    _watch()
    server = SubprocessASGIServer()  # the per-process instance that get_client() reuses
    server.start()
    return server.api_url


def _startup_timeout() -> float:
    try:
        return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    except ValueError:
        return 180.0
