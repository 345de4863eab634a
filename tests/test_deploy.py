"""prefect.yaml (deployment nightly-scoring) and `imgscore serve`: schedules, parameters, and a
deployment run executed the way a process worker executes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from imgscore.config.loading import load_config
from imgscore.config.schema import Config
from imgscore.flows.cli import main
from tests.conftest import make_image_folder

REPO = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO / "prefect.yaml"


def _nightly() -> dict:
    raw = yaml.safe_load(PREFECT_YAML.read_text())
    (dep,) = [d for d in raw["deployments"] if d["name"] == "nightly-scoring"]
    return dep


def test_prefect_yaml_validates_and_its_entrypoint_is_the_scoring_flow():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import Flow, load_flow_from_entrypoint

    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    (dep,) = [d for d in model.deployments if d.name == "nightly-scoring"]
    (sched,) = dep.schedules
    assert sched.cron == "0 2 * * *"
    assert sched.timezone  # explicit, not Prefect's default
    CronSchedule(cron=sched.cron, timezone=sched.timezone)  # a zone Prefect's API accepts
    assert dep.work_pool.name == "imgscore-process"

    flow = load_flow_from_entrypoint(dep.entrypoint)
    assert isinstance(flow, Flow) and flow.name == "score-images"
    # The parameters are configs/nightly.yaml, and the flow accepts them as they are.
    assert set(dep.parameters) == {"config"}
    assert (
        Config.model_validate(dep.parameters["config"]).to_dict()
        == load_config(REPO / "configs" / "nightly.yaml").to_dict()
    )
    assert flow.validate_parameters(dep.parameters)["config"] == dep.parameters["config"]


def test_serve_help_documents_the_schedule_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--cron", "--timezone", "--name", "--config", "0 2 * * *"):
        assert option in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cron", "61 2 * * *"], "--cron '61 2 * * *' is not a valid schedule"),
        (["--timezone", "Mars/Olympus_Mons"], "--timezone 'Mars/Olympus_Mons' is not a valid schedule"),
        (["--set", "run.run_id=fixed"], "leave run.run_id unset for a schedule"),
        (["--set", "input.root=null"], "input.root is not set"),
    ],
)
def test_serve_refuses_a_bad_schedule_before_registering_anything(capsys, monkeypatch, args, message):
    import imgscore.flows.serve

    monkeypatch.setattr(imgscore.flows.serve, "serve_deployments", lambda *d: pytest.fail("must not serve"))
    assert main(["serve", "--config", str(REPO / "configs" / "nightly.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


class _LaunchedServer:  # stands in for the imgscore.runtime.server.TemporaryServer a session launches
    url = "http://127.0.0.1:45678/api"

    def read_url(self, timeout: float) -> str:
        return self.url

    def wait_ready(self, timeout: float) -> None:
        return None

    def stop(self) -> None:
        return None


@pytest.mark.parametrize("api_url", [None, "http://127.0.0.1:4200/api", _LaunchedServer.url])
def test_serve_replaces_prefects_run_hint_when_the_server_is_temporary(capsys, monkeypatch, tmp_path, api_url):
    """Prefect's start message says "prefect deployment run", which cannot reach the temporary
    server living inside `imgscore serve`; without PREFECT_API_URL our one line replaces it. The
    console script exports its own temporary server's URL as PREFECT_API_URL (imgscore.runtime.startup):
    that URL counts as no server. The real ``prefect.serve`` runs, with a Runner that registers
    nothing and returns at once."""
    import prefect.runner
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from imgscore.runtime import startup

    monkeypatch.setattr(
        startup.Session, "start_server", lambda self: setattr(self, "server", self.server or _LaunchedServer())
    )
    monkeypatch.setenv("PREFECT_API_URL", "")  # restored afterwards: the session exports the URL
    temporary = api_url in (None, _LaunchedServer.url)

    added, runners = [], []

    class FakeRunner:
        def __init__(self, **kwargs):
            runners.append(kwargs)

        def add_deployment(self, deployment):
            added.append(deployment)

        async def start(self):
            return None

    monkeypatch.setattr(prefect.runner, "Runner", FakeRunner)
    settings = {"updates": {PREFECT_API_URL: api_url}} if api_url else {"restore_defaults": [PREFECT_API_URL]}
    with temporary_settings(**settings):
        assert PREFECT_API_URL.value() == api_url
        assert (
            main(
                [
                    "serve",
                    "--config",
                    str(REPO / "configs" / "nightly.yaml"),
                    "--set",
                    f"input.root={tmp_path}",
                    "--name",
                    "t1",
                ]
            )
            == 0
        )
    cap = capsys.readouterr()
    assert [d.name for d in added] == ["t1"] and runners[0]["pause_on_shutdown"] is True
    prefect_message = "To trigger any of these deployments"
    ours = [ln for ln in cap.err.splitlines() if "no PREFECT_API_URL" in ln]
    if temporary:
        assert prefect_message not in cap.out + cap.err and "Your deployments are being served" not in cap.out + cap.err
        (line,) = ours
        assert "runs inside this process" in line and "`prefect server start`" in line
        assert "`export PREFECT_API_URL=http://127.0.0.1:4200/api`" in line and "'score-images/t1'" in line
        assert "via a temporary Prefect server" in cap.err
    else:  # a real server: Prefect's own hint works, and ours is not printed
        assert prefect_message in cap.out and not ours
        assert f"via {api_url}" in cap.err


@pytest.mark.slow
def test_serve_registers_the_cron_schedule_timezone_and_parameters(prefect_server, monkeypatch, tmp_path):
    """`imgscore serve` hands prefect.serve a deployment; applied to the test server it carries
    the schedule (non-default zone, so a dropped timezone shows) and the config parameter."""
    from prefect.client.orchestration import get_client

    import imgscore.flows.serve

    served = []
    monkeypatch.setattr(imgscore.flows.serve, "serve_deployments", lambda *deps, **kw: served.extend(deps))
    argv = [
        "serve",
        "--config",
        str(REPO / "configs" / "nightly.yaml"),
        "--set",
        f"input.root={tmp_path}",
        "--cron",
        "30 1 * * 1-5",
        "--timezone",
        "Europe/Berlin",
        "--name",
        "weekday-scoring",
    ]
    assert main(argv) == 0
    (dep,) = served
    deployment_id = dep.apply()

    with get_client(sync_client=True) as client:
        d = client.read_deployment(deployment_id)
    assert d.name == "weekday-scoring" and d.entrypoint == "imgscore.flows.score_images.score_images"
    (s,) = d.schedules
    assert (s.schedule.cron, s.schedule.timezone, s.active) == ("30 1 * * 1-5", "Europe/Berlin", True)
    assert d.parameters["config"]["input"]["root"] == str(tmp_path)
    assert (
        d.parameters["config"] == load_config(REPO / "configs" / "nightly.yaml", [f"input.root={tmp_path}"]).to_dict()
    )


@pytest.mark.slow
def test_prefect_deploy_then_a_deployment_run_scores_on_dask(prefect_server, tmp_path, photos, tiny_checkpoint):
    """`prefect deploy` against the test server, then one run of the deployment executed as a
    process worker does (`python -m prefect.engine`), with the deployment's parameters and the
    Dask runner they select."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.process import ProcessWorker

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name="imgscore-process", type="process", base_job_template=ProcessWorker.get_default_base_job_template()
            )
        )
    deploy = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--name", "nightly-scoring"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    spec = _nightly()
    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name("score-images/nightly-scoring")
        pool = client.read_work_pool("imgscore-process")
    (s,) = d.schedules
    assert (s.schedule.cron, s.schedule.timezone) == ("0 2 * * *", spec["schedules"][0]["timezone"])
    assert d.parameters == spec["parameters"]
    assert d.work_pool_name == "imgscore-process" and pool.type == "process"
    assert d.entrypoint == "imgscore.flows.score_images:score_images"

    # Tonight's run: the deployment's config with this machine's folder and model, on 2 Dask workers.
    root = make_image_folder(tmp_path / "images", photos, per_class=3)  # 9 real photos
    cfg = Config.model_validate(d.parameters["config"]).model_copy(deep=True)
    cfg.input.root, cfg.output.root = root, tmp_path / "out"
    cfg.model.arch, cfg.model.checkpoint = "mobilenet_v3_small", tiny_checkpoint
    cfg.inference.device, cfg.inference.batch_size, cfg.run.shard_size = "cpu", 4, 3
    cfg.runner.type, cfg.runner.n_workers = "dask", 2
    flow_run = run_deployment("score-images/nightly-scoring", parameters={"config": cfg.to_dict()}, timeout=0)

    run = subprocess.run(
        [sys.executable, "-m", "prefect.engine"],
        cwd=tmp_path,
        env={**env, "PREFECT__FLOW_RUN_ID": str(flow_run.id)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(flow_run.id)
    assert fr.state.is_completed(), fr.state

    rows = ds.dataset(tmp_path / "out" / "predictions", format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(rows) == 9 and {r["image_path"].split("/")[0] for r in rows} == {"chelsea", "coffee", "rocket"}
    assert len({r["worker"] for r in rows}) == 2  # the Dask runner that config.runner selected
    (run_date_dir,) = (tmp_path / "out" / "predictions").iterdir()
    assert run_date_dir.name == f"run_date={fr.start_time:%Y-%m-%d}"

    # An expected failure (over the error budget) in a deployment run: one line in the worker's
    # log, no traceback — the flow modules install the filter when a worker imports them.
    bad = make_image_folder(tmp_path / "bad", photos, per_class=1)
    (bad / "zzz").mkdir()
    for i in range(6):
        (bad / "zzz" / f"broken_{i}.jpg").write_bytes(b"not a jpeg")
    cfg.input.root, cfg.output.root, cfg.runner.type = bad, tmp_path / "out_bad", "thread"
    flow_run = run_deployment("score-images/nightly-scoring", parameters={"config": cfg.to_dict()}, timeout=0)
    worker_env = {k: v for k, v in env.items() if not k.startswith("PREFECT_LOGGING_")}  # a worker's default log levels
    run = subprocess.run(
        [sys.executable, "-m", "prefect.engine"],
        cwd=tmp_path,
        env={**worker_env, "PREFECT__FLOW_RUN_ID": str(flow_run.id)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = run.stdout + run.stderr
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run.id).state.is_failed()
    assert "over its error budget: error rate 66.67%" in logs and "Traceback" not in logs, logs[-3000:]
