"""CLI contract: exit codes 0/1/2, one clear line, no traceback, nothing written on refusal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import base_overrides

IMGSCORE = str(Path(sys.executable).parent / "imgscore")


def run_cli(*args, cwd=None, timeout=300, prefect_home=None):
    """Run the console script CPU-only; ``prefect_home`` isolates its temporary server's SQLite DB."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    return subprocess.run([IMGSCORE, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _assert_refused(proc, pattern, out: Path):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("imgscore: error: ")
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not (out / "predictions").exists() and not (out / "runs").exists()


def test_missing_input_root(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    proc = run_cli("run", *_sets(base_overrides(tmp_path / "no_such_dir", tiny_checkpoint, out)))
    _assert_refused(proc, r"input.root '.*no_such_dir' does not exist; set input.root", out)


def test_unknown_arch(tmp_path, image_folder, tiny_checkpoint):
    out = tmp_path / "out"
    proc = run_cli("run", *_sets(base_overrides(image_folder, tiny_checkpoint, out, arch="resnet5")))
    _assert_refused(proc, r"unknown model.arch 'resnet5'; did you mean resnet50", out)


def test_bad_set_key(tmp_path, image_folder, tiny_checkpoint):
    out = tmp_path / "out"
    proc = run_cli("run", *_sets(base_overrides(image_folder, tiny_checkpoint, out)), "--set", "inference.batchsize=8")
    _assert_refused(proc, r"unknown config key 'inference.batchsize'; did you mean inference.batch_size\?", out)


def test_pickled_module_refused_and_nothing_written(tmp_path, image_folder, tiny_model):
    out = tmp_path / "out"
    ckpt = tmp_path / "module.pt"
    torch.save(tiny_model, ckpt)
    proc = run_cli("run", *_sets(base_overrides(image_folder, ckpt, out)))
    _assert_refused(
        proc,
        r"pickled Python objects .*Set model.trust_checkpoint=true if you trust this file, or save a form that loads "
        r"without it: the weights, torch.save\(model.state_dict\(\), path\) .* TorchScript, "
        r"torch.jit.save\(torch.jit.script\(model\), path\); from MLflow, mlflow.pytorch.log_state_dict",
        out,
    )


def test_torch_export_program_untrusted_or_exported_at_another_size_is_one_line(tmp_path, image_folder, tiny_model):
    """A .pt2 is refused without model.trust_checkpoint; trusted, a program exported for 64x64
    inputs is refused before scoring when the preprocessing crops 224x224, naming both and the fix."""
    out = tmp_path / "out"
    ckpt = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(tiny_model.eval(), (torch.zeros(1, 3, 64, 64),)), str(ckpt))
    proc = run_cli("run", *_sets(base_overrides(image_folder, ckpt, out)))
    _assert_refused(proc, r"is a torch.export archive .*Set model.trust_checkpoint=true if you trust this file", out)
    proc = run_cli("run", *_sets(base_overrides(image_folder, ckpt, out, **{"model.trust_checkpoint": "true"})))
    _assert_refused(
        proc,
        r"program taking float32 \[1, 3, 64, 64\]\): it was exported for 64x64 images but the preprocessing crops "
        r"224x224\. Set preprocess.crop=64 and preprocess.resize=73 .* or export it again at the crop you score at",
        out,
    )


@pytest.mark.slow
def test_full_run_exit_0_prints_summary_without_noise(tmp_path, image_folder, tiny_model):
    out = tmp_path / "out"
    ckpt = tmp_path / "module.pt"
    torch.save(tiny_model, ckpt)  # trusted pickled module: loads when the user says so
    proc = run_cli(
        "run",
        *_sets(base_overrides(image_folder, ckpt, out)),
        "--set",
        "model.trust_checkpoint=true",
        prefect_home=tmp_path / "prefect",
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "CancelledError" not in text and "telemetry" not in text.lower()
    assert "scanned" in proc.stdout and "12" in proc.stdout
    assert len(list((out / "predictions").rglob("part-*.parquet"))) == 3


def test_folder_without_images_refused_before_prefect(tmp_path, tiny_checkpoint):
    empty = tmp_path / "empty" / "cls"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    out = tmp_path / "out"
    proc = run_cli("run", *_sets(base_overrides(tmp_path / "empty", tiny_checkpoint, out)))
    _assert_refused(proc, r"input.root '.*empty' holds no image files", out)


def test_unwritable_output_root(tmp_path, image_folder, tiny_checkpoint):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_cli("run", *_sets(base_overrides(image_folder, tiny_checkpoint, blocker)))
    _assert_refused(proc, r"output.root '.*a_file' is not a writable folder .*set output.root", blocker)


@pytest.mark.slow
def test_kill_9_does_not_leave_the_temporary_prefect_server_running(tmp_path, image_folder, tiny_checkpoint):
    import signal
    import time

    import psutil

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.Popen(
        [IMGSCORE, "run", *_sets(base_overrides(image_folder, tiny_checkpoint, tmp_path / "out"))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = None
    deadline = time.time() + 240
    while server is None and time.time() < deadline and proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "prefect.server.api.server" in " ".join(child.cmdline()):
                    server = child
            except psutil.Error:
                pass
        time.sleep(0.2)
    assert server is not None, "the run never started its temporary server"
    time.sleep(1.5)  # the watchdog notes the parent's servers every 0.5 s
    os.kill(proc.pid, signal.SIGKILL)  # what the OOM killer does: no atexit handlers run
    proc.wait()
    gone, alive = psutil.wait_procs([server], timeout=20)
    for p in alive:
        p.kill()
    assert gone and not alive, "temporary Prefect server outlived its killed parent"


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_exits_130_with_the_rerun_command(tmp_path, photos, tiny_checkpoint):
    """A terminal's Ctrl-C signals the whole foreground process group — the scorer, its DataLoader
    workers and (unless it has its own session) the temporary Prefect server. Once the server died
    with the scorer, the interrupted flow could not report its crash: 70 s of retries, exit 1,
    no rerun command. Now: exit 130 within seconds, one line naming `imgscore rerun RUN_ID`, no
    Prefect "Crash detected!" or traceback, no server left, and the rerun finishes the run."""
    import signal
    import time

    import psutil

    from tests.conftest import make_image_folder

    images = make_image_folder(tmp_path / "images", photos, per_class=24)  # 72 images, 36 shards
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PREFECT_HOME": str(tmp_path / "prefect")}
    sets = _sets(base_overrides(images, tiny_checkpoint, out, **{"run.shard_size": 2, "inference.batch_size": 1}))
    proc = subprocess.Popen(
        [IMGSCORE, "run", "-q", *sets],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not list(out.glob("runs/*/shards/*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)  # scoring has started: at least one shard is committed
    assert proc.poll() is None, "the run ended before it could be interrupted"
    servers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "create_app" in " ".join(c.cmdline())]
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    took = time.time() - t0
    assert proc.returncode == 130, stderr
    assert took < 30, f"exit took {took:.0f} s after Ctrl-C"
    (run_dir,) = out.glob("runs/*")
    assert f"imgscore rerun {run_dir.name} --set output.root={out}" in stderr
    assert "Crash detected" not in stdout + stderr and "Traceback" not in stdout + stderr
    gone, alive = psutil.wait_procs(servers, timeout=20)
    assert not alive, "temporary Prefect server outlived the interrupted run"
    import json

    # the run says so: manifest status, reason, report.html of what was done so far
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["reason"].startswith("SIGINT")
    assert 0 < m["counts"]["scored"] < 72 and m["counts"]["pending"] > 0
    assert "interrupted</span>" in (run_dir / "report.html").read_text()
    report = run_cli("report", run_dir.name, "--set", f"output.root={out}", prefect_home=tmp_path / "prefect")
    assert report.returncode == 0 and "interrupted: SIGINT" in report.stdout
    assert f"imgscore rerun {run_dir.name} --set output.root={out}" in report.stdout
    rerun = run_cli("rerun", run_dir.name, "--set", f"output.root={out}", prefect_home=tmp_path / "prefect")
    assert rerun.returncode == 0, rerun.stderr
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete" and m["counts"]["scored"] == 72 and m["reason"] is None


@pytest.mark.slow
def test_a_temporary_server_that_cannot_start_is_one_line_with_its_reason(tmp_path, image_folder, tiny_checkpoint):
    """The server is launched by imgscore.runtime.server (imgscore.runtime.server_launcher); when it
    dies at start-up (here: its SQLite database cannot be created) the run ends with exit 1 and one
    line that quotes the server's own error and names the fix — not a 40-line traceback, not a hang
    until the start-up timeout."""
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/prefect.db",
    }
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [IMGSCORE, "run", *_sets(base_overrides(image_folder, tiny_checkpoint, tmp_path / "out"))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "temporary API server did not start" in lines[0] and "unable to open database file" in lines[0]
    assert "prefect server start" in lines[0] and "PREFECT_API_URL" in lines[0]
    assert not list((tmp_path / "out").glob("runs/*")), "nothing is planned without a Prefect API"


def test_output_root_that_is_the_input_root_is_refused(tmp_path, image_folder, tiny_checkpoint):
    proc = run_cli("run", *_sets(base_overrides(image_folder, tiny_checkpoint, image_folder)))
    _assert_refused(
        proc, r"output.root '.*images' is input.root: .*set output.root to a folder outside input.root", image_folder
    )


def test_a_config_file_with_a_key_given_twice_is_refused(tmp_path, image_folder, tiny_checkpoint):
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output:\n  root: {out}\ninference:\n  device: cpu\noutput:\n  topk: 3\n")
    proc = run_cli(
        "run",
        "--config",
        str(cfg),
        "--set",
        f"input.root={image_folder}",
        "--set",
        f"model.checkpoint={tiny_checkpoint}",
        "--set",
        "model.arch=mobilenet_v3_small",
        cwd=tmp_path,
    )
    _assert_refused(proc, r"c.yaml' line 5: key 'output' is given twice \(first at line 1\)", out)
    assert not (tmp_path / "outputs").exists()  # the run did not go to ./outputs instead


def test_nan_weights_model_refused_before_scoring_not_blamed_on_each_image(tmp_path, image_folder, tiny_model):
    out = tmp_path / "out"
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["classifier.3.bias"].fill_(float("nan"))
    ckpt = tmp_path / "diverged.pt"
    torch.save(sd, ckpt)
    proc = run_cli("run", *_sets(base_overrides(image_folder, ckpt, out)))
    _assert_refused(
        proc,
        r"model mobilenet_v3_small \(model.checkpoint '.*diverged.pt'\) has non-finite weights: 1 of its \d+ "
        r"weight tensors hold NaN or Inf \(e.g. classifier.3.bias: 3 NaN of 3\)",
        out,
    )


def test_the_run_banner_shows_the_input_root_normalised_and_urls_unchanged(tmp_path, tiny_checkpoint, monkeypatch):
    import io

    from rich.console import Console

    from imgscore.config.loading import build_config
    from imgscore.flows.cli import banner

    def shown(root: str) -> str:
        cfg = build_config(
            {
                "input": {"root": root},
                "model": {"arch": "mobilenet_v3_small", "checkpoint": str(tiny_checkpoint)},
                "run": {"run_id": "r1"},
            }
        )
        buf = io.StringIO()
        Console(file=buf, width=400).print(banner(cfg), soft_wrap=True)
        return buf.getvalue().strip()

    (tmp_path / "imgscore").mkdir()
    monkeypatch.chdir(tmp_path / "imgscore")
    assert (
        shown("../scratch/big") == f"run r1: scoring {tmp_path}/scratch/big with mobilenet_v3_small (thread runner) …"
    )
    assert (
        shown(f"{tmp_path}/imgscore/../scratch/./big/")
        == f"run r1: scoring {tmp_path}/scratch/big with mobilenet_v3_small (thread runner) …"
    )
    assert shown("s3://bucket/a/../b") == "run r1: scoring s3://bucket/a/../b with mobilenet_v3_small (thread runner) …"
    assert (
        shown(f"{tmp_path}/[red]x") == f"run r1: scoring {tmp_path}/[red]x with mobilenet_v3_small (thread runner) …"
    )  # no markup


def test_an_infinite_timeout_is_refused_before_any_shard_runs(tmp_path, image_folder, tiny_checkpoint):
    """inf passed the check once and then failed every shard (JSON writes it as null): exit 1 and a traceback."""
    out = tmp_path / "out"
    proc = run_cli(
        "run", *_sets(base_overrides(image_folder, tiny_checkpoint, out)), "--set", "input.decode_timeout_s=.inf"
    )
    _assert_refused(proc, r"config input.decode_timeout_s must be a finite number of seconds, got inf", out)
