"""Prefect's temporary API server for one ``imgscore`` command: started early, stopped always.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server (uvicorn on SQLite) as a child
process the first time a flow runs, waits for it, and stops it from an ``atexit`` handler. Two
things about that did not suit a command-line tool:

- **Start-up time.** Prefect starts it only when the flow starts, after the scorer has imported
  torch, torchvision and Prefect and loaded the model; the server then needs seconds of its own
  (importing Prefect's server, opening SQLite) while the scorer waits.
  :meth:`TemporaryServer.launch` starts it at the top of the command instead, so the two run side
  by side; by the time the model is loaded the server is usually up (benchmarks/NOTES.md,
  "Start-up and exit").
- **kill -9.** A process killed with SIGKILL never runs its exit handlers, and the server lived
  on. A watchdog process (:mod:`imgscore.runtime.server_watchdog`) stops this process's servers as
  soon as this process is gone.

The server is Prefect's own, launched by :mod:`imgscore.runtime.server_launcher`, which reads
Prefect's settings first. This process learns the server's URL before it imports Prefect and
exports it as ``PREFECT_API_URL``, so Prefect (and Dask workers, imgscore.runtime.runner) simply
talk to it. The order of all this is :mod:`imgscore.runtime.startup`'s.
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


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not come up (its log tail is in the message)."""


def start_watchdog(pid: int | None = None) -> subprocess.Popen:
    """Start :mod:`imgscore.runtime.server_watchdog` for ``pid`` (default: this process)."""
    return subprocess.Popen(
        [sys.executable, "-m", "imgscore.runtime.server_watchdog", str(pid or os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,  # survives the Ctrl-C that ends this process
    )


class TemporaryServer:
    """A launched temporary server: its helper process, URL, health check and stop.

    ``launch`` returns at once; ``read_url`` blocks until the launcher has read Prefect's
    settings (usually done by then); ``wait_ready`` until ``/health`` answers.
    ``url`` is None when Prefect's settings name a server (nothing was started).
    """

    def __init__(self, verbose: bool) -> None:
        self.log = "-"  # --verbose: the server writes to this terminal
        if not verbose:
            fd, self.log = tempfile.mkstemp(prefix="imgscore-prefect-server-", suffix=".log")
            os.close(fd)  # the server opens it itself
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgscore.runtime.server_launcher", self.log],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            close_fds=True,
            # Its own session: a terminal's Ctrl-C signals the whole foreground process group, and
            # a server killed by it would leave the interrupted flow unable to report its crash
            # (Prefect retries, then exit 1 without a rerun hint). This process stops it at exit;
            # the watchdog after kill -9.
            start_new_session=True,
        )
        self.url: str | None = None
        self.known = False
        atexit.register(self.stop)

    @classmethod
    def launch(cls, verbose: bool = False) -> TemporaryServer:
        """Start the watchdog, then the launcher (a kill during the server's start-up is covered)."""
        start_watchdog()
        return cls(verbose)

    def read_url(self, timeout: float) -> str | None:
        """The server's API URL, or None when Prefect's settings name a server of their own."""
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
        """Block until ``/health`` answers 200.

        Raises:
            ServerStartError: the server exited, or did not answer within ``timeout`` seconds.
        """
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
        """Stop the server and raise :class:`ServerStartError` quoting the end of its log."""
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
            f"Prefect's temporary API server did not start: {why}"
            + (f"; its log ends: {tail}" if tail else "")
            + f". Start a server (`prefect server start`) and export PREFECT_API_URL{', ' + also if also else ''}"
        )

    def stop(self) -> None:
        """Drain this process's Prefect logs and events, then SIGTERM the server and wait at most
        1 s: uvicorn sometimes waits out its graceful-shutdown timeout for this process's own
        open connections (benchmarks/NOTES.md, "Start-up and exit"). Whatever is still running when this
        process is gone gets SIGTERM and then SIGKILL from the watchdog. Idempotent."""
        if self.proc.poll() is None:
            if "prefect.logging.handlers" in sys.modules:
                from imgscore.runtime.compat import drain_prefect_services

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
