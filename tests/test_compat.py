"""Contract tests of ``imgscore.runtime.compat``: each private part of another library we rely on
still behaves as the adapter assumes. A failure here names the adapter to fix when a pinned
version is raised in pyproject.toml; nothing else in the suite should be the first to notice."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

from imgscore.runtime import compat


def test_prefect_starts_its_temporary_server_as_we_do(monkeypatch):
    """Our launcher starts the same uvicorn app with the same private markers as Prefect's
    SubprocessASGIServer (we add only a graceful-shutdown limit)."""
    import prefect
    import prefect.server.api.server as server_mod
    from prefect.settings import get_current_settings

    seen = {}

    def fake_popen(args, env=None, **kw):
        seen["args"], seen["env"] = list(args), dict(env or {})
        return None

    monkeypatch.setattr(server_mod.subprocess, "Popen", fake_popen)
    srv = server_mod.SubprocessASGIServer(port=45999)
    try:
        srv._run_uvicorn_command()
    finally:
        server_mod.SubprocessASGIServer._instances.pop(45999, None)
    ours = compat.prefect_server_command(sys.executable, str(prefect.__module_path__.parent), 45999)
    assert ours[: len(seen["args"])] == seen["args"]
    assert ours[len(seen["args"]) :] == ["--timeout-graceful-shutdown", "3"]
    settings_env = get_current_settings().to_environment_variables(exclude_unset=True)
    assert compat.prefect_server_env({}, settings_env) == {
        k: v for k, v in seen["env"].items() if k in compat.PREFECT_SERVER_ENV or k in settings_env
    }
    for k, v in compat.PREFECT_SERVER_ENV.items():
        assert seen["env"][k] == v


def test_prefect_in_process_api_host():
    import prefect.client.orchestration as orch

    assert f'"http://{compat.PREFECT_IN_PROCESS_API_HOST}/api"' in inspect.getsource(orch)


def test_drain_prefect_services_returns_promptly_outside_a_run():
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for cls in (APILogWorker, EventsWorker):
        assert "timeout" in inspect.signature(cls.drain_all).parameters
    t0 = time.perf_counter()
    compat.drain_prefect_services(timeout=2.0)
    assert time.perf_counter() - t0 < 5


def test_the_log_messages_we_filter_are_still_the_libraries_own():
    import distributed.nanny
    import prefect._internal.states
    import prefect.states
    import prefect.task_engine

    interrupt, cancelled, terminated = compat.PREFECT_INTERRUPT_MESSAGES
    for m in (interrupt, terminated):
        assert m in inspect.getsource(prefect.states) or m in inspect.getsource(prefect._internal.states)
    assert cancelled in inspect.getsource(prefect.task_engine)
    assert compat.PREFECT_TASK_EXCEPTION_MESSAGE in inspect.getsource(prefect.task_engine)
    import prefect.flow_engine

    assert compat.PREFECT_FLOW_EXCEPTION_MESSAGE in inspect.getsource(prefect.flow_engine)
    assert compat.NANNY_KILL_MESSAGE in inspect.getsource(distributed.nanny)
    import distributed.worker

    assert compat.HEARTBEAT_FAILED_MESSAGE in inspect.getsource(distributed.worker.Worker.heartbeat)


def test_run_exit_handlers_runs_each_handler_once():
    code = (
        "import atexit, os\n"
        "from imgscore.runtime.compat import run_exit_handlers\n"
        "atexit.register(lambda: print('handler', flush=True))\n"
        "run_exit_handlers()\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines() == ["handler"], out.stdout + out.stderr


def test_prefect_dask_public_surface_we_build_on():
    """ScoringDaskTaskRunner uses only DaskTaskRunner's constructor, ``address``,
    ``cluster_kwargs``, ``client_kwargs``, ``client``, ``submit``, ``duplicate`` and the context
    manager; a duplicate keeps our API URL and the workers' environment."""
    from prefect_dask import DaskTaskRunner

    from imgscore.runtime.dask_runner import ScoringDaskTaskRunner

    for name in ("client", "submit", "duplicate", "__enter__", "__exit__"):
        assert hasattr(DaskTaskRunner, name)
    r = ScoringDaskTaskRunner(cluster_kwargs={"n_workers": 2}, api_url="http://127.0.0.1:1/api")
    assert r.owns_cluster and r.cluster_kwargs["env"]["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    d = r.duplicate()
    assert type(d) is ScoringDaskTaskRunner and d.api_url == r.api_url and d.cluster_kwargs == r.cluster_kwargs
    remote = ScoringDaskTaskRunner(address="tcp://127.0.0.1:8786", api_url=None)
    assert not remote.owns_cluster and remote.duplicate().address == "tcp://127.0.0.1:8786"
    import dask

    assert dask.config.get("distributed.worker.daemon") is True  # the default our LocalCluster overrides


def test_torch_dataloader_sigchld_flag_we_set_is_still_torchs():
    """torch still installs a SIGCHLD handler when a multi-worker DataLoader is iterated on the
    main thread, and ``no_dataloader_sigchld_handler`` (torch's private ``_SIGCHLD_handler_set``)
    still keeps it from doing so. Each case in a fresh interpreter: the flag is process-wide."""
    import subprocess
    import sys

    probe = (
        "import signal, sys, torch\n"
        "from torch.utils.data import DataLoader\n"
        "from imgscore.runtime.compat import no_dataloader_sigchld_handler\n"
        "if sys.argv[1] == 'off': no_dataloader_sigchld_handler()\n"
        "list(DataLoader(torch.arange(4), batch_size=2, num_workers=1, multiprocessing_context='fork'))\n"
        "print(signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, signal.SIG_IGN, None))\n"
    )
    installed = {
        case: subprocess.run([sys.executable, "-c", probe, case], capture_output=True, text=True, timeout=120)
        for case in ("on", "off")
    }
    assert installed["on"].stdout.strip() == "True", installed["on"].stderr[-2000:]  # the control: torch installs it
    assert installed["off"].stdout.strip() == "False", installed["off"].stderr[-2000:]
