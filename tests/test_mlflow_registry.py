"""model.checkpoint in a real MLflow registry: ``mlflow server`` on loopback with a SQLite backend
store and artifacts in a local folder (served by the server, as a team's registry serves them).
Resolved once per night, pinned, fetched once per cache; refused by name when it cannot be."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from imgscore.inference.model import clear_model_cache, file_sha256
from imgscore.io import fetched
from tests.test_object_store import cli, manifest_of, read_table, sets
from tests.test_remote_checkpoints import other_checkpoint

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow

CLASSES = ["alpha", "beta", "gamma"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on a free loopback port (SQLite store, served artifacts), once it answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")]
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(  # in root: the basic-auth app writes its basic_auth.db into the working folder
            [*cmd, *args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=root
        )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                return proc, uri
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A running ``mlflow server`` (SQLite store, served artifacts); yields its URI."""
    proc, uri = start_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    stop_server(proc)


def register(uri: str, name: str, checkpoint: Path, tmp_path: Path) -> tuple[str, str]:
    """Log ``checkpoint`` plus a classes.txt as a run's ``model/`` folder and register it as a
    new version of ``name`` (how docs/checkpoints.md says to); returns (version, run_id)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    folder = tmp_path / f"reg-{name}-{file_sha256(checkpoint)[:8]}"
    folder.mkdir()
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(checkpoint), artifact_path="model")
        mlflow.log_artifact(str(folder / "classes.txt"), artifact_path="model")
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # registered by an earlier version
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
    return str(mv.version), run.info.run_id


def items(image_folder: Path, out: Path, checkpoint: str, uri: str, cache: Path, *extra: str) -> list[str]:
    return [
        f"input.root={image_folder}",
        f"output.root={out}",
        "model.arch=mobilenet_v3_small",
        f"model.checkpoint={checkpoint}",
        f"model.registry_uri={uri}",
        f"inference.cache_dir={cache}",
        "inference.device=cpu",
        "inference.batch_size=4",
        "run.shard_size=5",
        *extra,
    ]


def test_promoting_champion_changes_the_next_night_and_a_rerun_keeps_its_version(
    prefect_server, registry, image_folder, tiny_checkpoint, tiny_model, tmp_path
):
    """Acceptance: night 1 scores models:/…@champion at version 1 and leaves a failed image; the
    alias moves to version 2; night 2 records version 2 and its new model_id; the rerun of night 1
    (the image repaired) scores with version 1, as recorded, not with the alias's target now. The
    class names are the registered classes.txt."""
    from mlflow import MlflowClient

    name = "promoted"
    v1, _ = register(registry, name, tiny_checkpoint, tmp_path)
    v2, _ = register(registry, name, other_checkpoint(tiny_model, tmp_path / "v2.pt"), tmp_path)
    client = MlflowClient(registry)
    client.set_registered_model_alias(name, "champion", v1)
    out, cache, url = tmp_path / "out", tmp_path / "cache", f"models:/{name}@champion"
    first_class = sorted(p for p in image_folder.iterdir() if p.is_dir())[0]
    broken = first_class / "broken.jpg"
    good = next(first_class.glob("*.jpg")).read_bytes()
    broken.write_bytes(b"not a jpeg")
    assert cli("run", "-q", *sets(items(image_folder, out, url, registry, cache, "run.run_id=n1"))) == 0
    n1 = manifest_of(str(out), "n1")["models"][0]
    assert n1["checkpoint"]["identity"] == f"models:/{name}/{v1}" and n1["checkpoint"]["url"] == url
    assert n1["model_id"] == file_sha256(tiny_checkpoint) and n1["classes"] == CLASSES

    client.set_registered_model_alias(name, "champion", v2)
    assert cli("run", "-q", *sets(items(image_folder, out, url, registry, cache, "run.run_id=n2"))) == 0
    n2 = manifest_of(str(out), "n2")["models"][0]
    assert n2["checkpoint"]["identity"] == f"models:/{name}/{v2}" and n2["model_id"] != n1["model_id"]

    broken.write_bytes(good)  # repaired: the rerun scores it, with night 1's model
    clear_model_cache()  # a rerun is a new process; the CLI here runs in the test's, which holds both models
    assert cli("rerun", "n1", "--set", f"output.root={out}", "--set", f"inference.cache_dir={cache}", "--quiet") == 0
    rows = [r for r in read_table(str(out), run_id="n1").to_pylist() if r["image_path"].endswith("broken.jpg")]
    assert rows and {r["model_id"] for r in rows} == {n1["model_id"]}
    assert all(r["pred_label"] in CLASSES for r in rows)


def test_an_alias_and_its_version_share_one_cache_entry_fetched_once(registry, tiny_checkpoint, tmp_path):
    """models:/NAME@ALIAS and models:/NAME/VERSION are one entry (keyed by the resolved version);
    a second load is a hit; runs:/ names a run's file; a pin loads its version after the alias moved."""
    from mlflow import MlflowClient

    v1, run_id = register(registry, "shared", tiny_checkpoint, tmp_path)
    MlflowClient(registry).set_registered_model_alias("shared", "prod", v1)
    cache = tmp_path / "cache"
    a = fetched.local_copy("models:/shared@prod", cache, "model.checkpoint", registry_uri=registry)
    b = fetched.local_copy(f"models:/shared/{v1}", cache, "model.checkpoint", registry_uri=registry)
    assert a.path == b.path and a.sha256 == b.sha256 == file_sha256(tiny_checkpoint)
    assert a.classes is not None and a.classes.read_text().split() == CLASSES
    assert len(list(cache.glob("*/entry.json"))) == 1
    r = fetched.local_copy(f"runs:/{run_id}/model/{tiny_checkpoint.name}", cache, "model.checkpoint", None, registry)
    assert r.sha256 == a.sha256 and r.path.name == tiny_checkpoint.name
    pinned = fetched.local_copy(
        "models:/shared@prod", cache, "model.checkpoint", fetched.Pin(a.identity or "", a.sha256 or ""), registry
    )
    assert pinned.path == a.path


def test_registry_refusals_are_one_line_before_scoring(
    prefect_server, registry, image_folder, tiny_checkpoint, tmp_path, capsys
):
    """Exit 2 before anything is scored, one line naming the fix: an unknown model name, an unknown
    alias, a version that does not exist, a malformed URI, a registry that cannot be reached."""
    v1, _ = register(registry, "refusals", tiny_checkpoint, tmp_path)
    dead = f"http://127.0.0.1:{_free_port()}"
    cases = [
        ("models:/no-such-model@champion", registry, "no registered model named 'no-such-model'"),
        ("models:/refusals@nope", registry, "has no alias 'nope'"),
        ("models:/refusals/99", registry, "has no version 99"),
        ("models:/refusals", registry, "is not an MLflow model URI"),
        (f"models:/refusals/{v1}", dead, "cannot be reached"),
    ]
    for url, uri, said in cases:
        capsys.readouterr()
        started = time.monotonic()
        assert cli("run", "-q", *sets(items(image_folder, tmp_path / "o", url, uri, tmp_path / "c"))) == 2, url
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and said in err[0], (url, err)
        assert time.monotonic() - started < 60, url  # not MLflow's minutes of retries
    assert not (tmp_path / "o" / "predictions").exists()


def test_a_registry_that_denies_access_is_one_line(prefect_server, image_folder, tmp_path, monkeypatch, capsys):
    """MLflow's basic-auth server without credentials on this machine: exit 2, one line saying
    which variables to set; with them, the same URI gets as far as the registry's own answer."""
    admin = "Adm1n-imgscore-test"
    env = {"MLFLOW_AUTH_ADMIN_PASSWORD": admin, "MLFLOW_FLASK_SERVER_SECRET_KEY": "imgscore-test"}
    proc, uri = start_server(tmp_path, "--app-name", "basic-auth", env=env)
    try:
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        run = items(image_folder, tmp_path / "o", "models:/guarded@champion", uri, tmp_path / "c")
        assert cli("run", "-q", *sets(run)) == 2
        (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert "denied access" in line and uri in line and "MLFLOW_TRACKING_USERNAME" in line, line
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin)
        assert cli("run", "-q", *sets(run)) == 2
        (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert "no registered model named 'guarded'" in line and admin not in line, line
    finally:
        stop_server(proc)


def test_a_model_logged_with_mlflow_pytorch_log_model_is_scored_only_when_trusted(
    prefect_server, registry, image_folder, tiny_model, tiny_checkpoint, tmp_path, capsys
):
    """mlflow.pytorch.log_model (MLflow 3's default pt2 format, data/model.pt2 in the model folder)
    registered as a version: refused without model.trust_checkpoint (one line, exit 2); with it,
    the run scores the state_dict's answers."""
    import torch

    from tests.conftest import assert_same_answers
    from tests.test_object_store import rows_by_path

    mlflow.set_tracking_uri(registry)
    example = torch.rand(2, 3, 224, 224)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            tiny_model, name="model", input_example=example.numpy(), registered_model_name="logged"
        )
    assert info.registered_model_version is not None
    url = f"models:/logged/{info.registered_model_version}"
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli("run", "-q", *sets(items(image_folder, out, url, registry, tmp_path / "c"))) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert "trust_checkpoint" in line, line
    trusted = items(image_folder, out, url, registry, tmp_path / "c", "model.trust_checkpoint=true", "run.run_id=t")
    assert cli("run", "-q", *sets(trusted)) == 0
    want = items(image_folder, tmp_path / "want", str(tiny_checkpoint), registry, tmp_path / "c", "run.run_id=w")
    assert cli("run", "-q", *sets(want)) == 0
    got, expected = rows_by_path(read_table(str(out))), rows_by_path(read_table(str(tmp_path / "want")))
    assert sorted(got) == sorted(expected)
    for p, row in expected.items():
        assert_same_answers(row, got[p], atol=1e-4, what=p)
    assert manifest_of(str(out), "t")["models"][0]["source"] == "torch_export"
