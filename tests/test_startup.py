"""Start-up in one place (imgscore.runtime.startup): what importing the CLI costs, the server's
launcher and watchdog as real processes, and the session's order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from imgscore.runtime import server_watchdog, startup


def test_importing_the_cli_imports_neither_prefect_nor_torch():
    """A typo must fail before the heavy imports: importing the CLI module loads neither."""
    code = (
        "import sys, json, imgscore.flows.cli; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('prefect', 'torch', 'torchvision', 'distributed'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_launcher_says_no_server_when_an_api_is_configured():
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    out = subprocess.run(
        [sys.executable, "-m", "imgscore.runtime.server_launcher", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0 and out.stdout.strip() == "-", out.stderr


PARENT = """
import subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
server = subprocess.Popen([*sleep, "prefect.server.api.server:create_app"])
other = subprocess.Popen(sleep)
watchdog = [sys.executable, "-m", "imgscore.runtime.server_watchdog", str(__import__("os").getpid())]
subprocess.Popen(watchdog, start_new_session=True)
print(server.pid, other.pid, flush=True)
time.sleep(120)
"""


def test_watchdog_stops_the_servers_of_a_process_killed_with_sigkill():
    """Real processes: a parent with a child whose command line names Prefect's server app and
    one that does not, and the watchdog. kill -9 of the parent: the server child is stopped
    within seconds, the other child is left alone (psutil, no /proc parsing)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    server_pid, other_pid = map(int, parent.stdout.readline().split())
    server, other = psutil.Process(server_pid), psutil.Process(other_pid)
    time.sleep(1.5)  # the watchdog notes the parent's servers every 0.5 s
    parent.kill()
    parent.wait()
    try:
        gone, alive = psutil.wait_procs([server], timeout=20)
        assert gone and not alive, "the server outlived its killed parent"
        assert other.is_running()
    finally:
        for p in (server, other):
            try:
                p.kill()
            except psutil.Error:
                pass


def test_watchdog_recognises_servers_by_their_command_line():
    me = psutil.Process()
    assert not server_watchdog.is_server(me)
    assert server_watchdog.watch(2**22 + 12345) == []  # no such process: nothing to watch


def test_session_without_a_managed_server_only_imports(monkeypatch):
    s = startup.Session(manage_server=False)
    s.start_server()
    assert s.server is None and s.temporary_api_url is None
    assert s.import_prefect("json") is json


def test_one_startup_timeout(monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    assert startup.startup_timeout() == startup.STARTUP_TIMEOUT_S
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "7")
    assert startup.startup_timeout() == 7.0


def test_session_sets_defaults_without_overriding_the_users(monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "33")
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    with startup.session(verbose=False) as s:
        assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "33"
        assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        assert isinstance(s, startup.Session)


@pytest.mark.parametrize("module", ["imgscore.flows.score_images", "imgscore.flows.rerun"])
def test_both_flows_choose_their_runner_from_their_config(module):
    """One way to choose the task runner: each flow's decorator, reading config.runner of the
    flow run (``ConfiguredTaskRunner``), whoever starts the run (CLI, deployment, retry)."""
    from prefect.flows import load_flow_from_entrypoint

    from imgscore.runtime.runner import ConfiguredTaskRunner

    name = {"imgscore.flows.score_images": "score_images", "imgscore.flows.rerun": "rerun_failed"}[module]
    flow = load_flow_from_entrypoint(f"{module}:{name}")
    assert isinstance(flow.task_runner, ConfiguredTaskRunner)


@pytest.mark.parametrize("through_the_cli", [False, True])
def test_the_cli_sets_prefects_telemetry_default_itself(tmp_path, through_the_cli):
    """On a terminal, importing Prefect prints its anonymous-usage notice and creates
    PREFECT_HOME/.sdk_telemetry/ (shown here without imgscore's session, as the control); inside
    the session (every imgscore command) DO_NOT_TRACK=1 is the default and neither happens."""
    import pty

    env = {k: v for k, v in os.environ.items() if k not in ("DO_NOT_TRACK", "CI", "GITHUB_ACTIONS")}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    body = "import prefect"
    if through_the_cli:
        body = "from imgscore.runtime import startup\nwith startup.session(verbose=False):\n    import prefect"
    primary, secondary = pty.openpty()
    proc = subprocess.run([sys.executable, "-c", body], env=env, stdout=secondary, stderr=secondary, timeout=120)
    os.close(secondary)
    printed = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        printed += chunk
    os.close(primary)
    assert proc.returncode == 0, printed
    made = (tmp_path / "home" / ".sdk_telemetry").exists()
    noticed = b"anonymous usage data" in printed
    assert (made, noticed) == ((False, False) if through_the_cli else (True, True))
