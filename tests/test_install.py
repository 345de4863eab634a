"""Installed like a package: the wheel, built offline and installed into a fresh virtual
environment, runs ``imgscore config`` and a scoring run from a folder outside the source tree —
the configs it ships are package data, nothing is found through the checkout."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import base_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "imgscore", "flows", "tasks", "configs")  # what the wheel is built from


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def _setuptools_with_bdist_wheel() -> str | None:
    """The folder of an installed setuptools that builds wheels by itself (70.1+: bdist_wheel built
    in; older ones need the ``wheel`` package). A virtual environment may hold an old one first on
    its path (the one ``python -m venv`` bundles) and a newer one further on."""
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower() == "setuptools" and _version(dist.version) >= (70, 1):
            return str(dist.locate_file(""))
    return None


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)
    assert proc.returncode == 0, f"{cmd[:4]} exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no network, no build isolation); the test
    interpreter's site-packages are on its path through a .pth file (torch & co. are not copied),
    after its own site-packages, so the installed imgscore is the one imported."""
    setuptools_dir = _setuptools_with_bdist_wheel()
    if setuptools_dir is None:
        pytest.skip("building the wheel offline needs setuptools>=70.1 (in the dev extra: pip install -e '.[dev]')")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy: setuptools builds in place (build/, *.egg-info), never in the checkout
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    wheels = tmp / "wheels"
    env = {**os.environ, "PYTHONPATH": setuptools_dir, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(wheels),
            str(src),
        ],
        env=env,
    )
    (wheel,) = wheels.glob("imgscore-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    assert sysconfig.get_paths()["purelib"] in ours
    Path(site, "zz_test_env.pth").write_text("".join(f"{p}\n" for p in ours))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
        env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return venv


def _clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {
        **env,
        "CUDA_VISIBLE_DEVICES": "",
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def test_the_installed_package_is_imported_and_ships_its_configs(installed, tmp_path):
    py = str(installed / "bin" / "python")
    probe = (
        "import json, imgscore, imgscore.flows.cli as cli, imgscore.config.loading as c; "
        "print(json.dumps([imgscore.__file__, str(cli.DEMO_CONFIG), cli.DEMO_CONFIG.is_file(), "
        "str(c.shipped_config('nightly.yaml')), c.load_config(cli.DEMO_CONFIG).model.arch]))"
    )
    found = json.loads(_run([py, "-c", probe], cwd=tmp_path, env=_clean_env(tmp_path)).stdout)
    venv = str(installed.resolve())
    assert found[0].startswith(venv) and found[1].startswith(venv) and found[3].startswith(venv), found
    assert found[2] is True and found[4] == "resnet18"
    assert str(REPO) not in found[0]


def test_the_installed_cli_lists_its_keys_and_scores_a_folder_from_elsewhere(
    installed, tmp_path, image_folder, tiny_checkpoint
):
    imgscore = str(installed / "bin" / "imgscore")
    work = tmp_path / "work"  # any folder: not the checkout
    work.mkdir()
    env = _clean_env(tmp_path)
    conf = _run([imgscore, "config"], cwd=work, env=env).stdout
    assert "output.root" in conf and "model.classes" in conf and "run.shard_size" in conf

    sets = [a for item in base_overrides(image_folder, tiny_checkpoint, Path("scores")) for a in ("--set", item)]
    proc = _run([imgscore, "run", "-q", *sets], cwd=work, env=env, timeout=420)
    assert "Traceback" not in proc.stdout + proc.stderr
    table = ds.dataset(
        work / "scores" / "predictions", format="parquet", partitioning="hive"
    ).to_table()  # relative to the cwd
    rows = table.to_pylist()
    assert len(rows) == 12 and {r["label_name"] for r in rows} == {"chelsea", "coffee", "rocket"}
    assert {r["label"] for r in rows if r["label_name"] == "rocket"} == {2}
    assert all(0.0 <= r["score"] <= 1.0 and r["pred_label"] in {"0", "1", "2"} for r in rows)
    # report.html is rendered from the template shipped as package data
    (page,) = (work / "scores" / "runs").glob("*/report.html")
    assert "rocket" in page.read_text(encoding="utf-8") and "<table" in page.read_text(encoding="utf-8")
