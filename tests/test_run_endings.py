"""Runs that do not finish say so: a write that fails (disk full) ends the run ``crashed`` with one
line naming the file, the OS error and the rerun command; SIGTERM ends it ``interrupted``.

The disk-full case is real, not simulated: the shard's temp file name is a symlink to
``/dev/full``, on which every write fails with ENOSPC (errno 28) in the kernel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imgscore.flows.cli import main as cli_main
from imgscore.tasks.errors import OutputWriteError
from imgscore.tasks.parquet_io import part_dir, write_bytes_atomic
from tests.conftest import base_overrides, make_image_folder

REPO = Path(__file__).resolve().parent.parent


def test_a_failed_write_names_the_file_and_errno_and_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "manifest.json"
    tmp = tmp_path / f".manifest.json.{os.getpid()}.tmp"
    tmp.symlink_to("/dev/full")
    with pytest.raises(OutputWriteError, match=r"cannot write .*manifest\.json: \[Errno 28\] No space left on device") as err:
        write_bytes_atomic(b"{}" * 10000, target)
    assert (err.value.path, err.value.errno) == (str(target), 28)
    assert not os.path.lexists(tmp) and not target.exists()


@pytest.mark.slow
def test_disk_full_mid_run_is_one_line_the_run_crashed_and_rerun_finishes_it(prefect_server, photos, tiny_checkpoint, tmp_path, capfd):
    """Acceptance (issue 13, part 2): shard 1's predictions file cannot be written. Exit 1 with
    one line on stderr (the path, errno 28, the rerun command) and no traceback; the manifest
    says ``crashed`` with that reason, shard 0 stays committed, no temp file is left, report.html
    shows what was done. Once the disk is fixed, ``imgscore rerun`` completes the run."""
    root = make_image_folder(tmp_path / "images", photos)  # 12 images, 3 shards of 4
    out = tmp_path / "out"
    folder = part_dir(out, "predictions", datetime.now(UTC).strftime("%Y-%m-%d"), "diskfull")
    folder.mkdir(parents=True)
    (folder / f".part-00001.parquet.{os.getpid()}.tmp").symlink_to("/dev/full")
    sets = base_overrides(root, tiny_checkpoint, out, **{"run.run_id": "diskfull", "run.shard_size": 4, "run.shard_retries": 0})
    capfd.readouterr()
    code = cli_main(["run", *sum((["--set", s] for s in sets), []), "--quiet"])
    err = capfd.readouterr().err
    assert code == 1
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert f"cannot write {folder / 'part-00001.parquet'}: [Errno 28] No space left on device" in lines[0]
    assert "nothing is half-written" in lines[0] and f"imgscore rerun diskfull --set output.root={out}" in lines[0]
    run_dir = out / "runs" / "diskfull"
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "crashed" and "[Errno 28]" in m["reason"]
    assert m["shards"][0]["state"] == "complete" and m["shards"][1]["state"] != "complete"
    assert not [p for p in out.rglob(".*.tmp")]
    assert "crashed</span>" in (run_dir / "report.html").read_text()

    assert cli_main(["rerun", "diskfull", "--set", f"output.root={out}", "--quiet"]) == 0
    m = json.loads((run_dir / "manifest.json").read_text())
    assert (m["status"], m["reason"], m["counts"]["scored"]) == ("complete", None, 12)


@pytest.mark.slow
def test_sigterm_ends_the_run_interrupted_with_exit_143(prefect_server, photos, tiny_checkpoint, tmp_path):
    """SIGTERM (systemd, a container stop, `kill`) to the scorer alone: exit 143, the manifest says
    ``interrupted`` with the signal, and the last line names the rerun command."""
    from prefect.settings import PREFECT_API_URL

    root = make_image_folder(tmp_path / "images", photos, per_class=24)
    out = tmp_path / "out"
    sets = base_overrides(root, tiny_checkpoint, out, **{"run.shard_size": 2, "inference.batch_size": 1, "run.run_id": "termed"})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "ph")}
    proc = subprocess.Popen([sys.executable, "-m", "imgscore.flows.cli", "run", *sum((["--set", s] for s in sets), []), "--quiet"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not list(out.glob("runs/termed/shards/*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert f"imgscore rerun termed --set output.root={out}" in stderr.strip().splitlines()[-1]
    m = json.loads((out / "runs" / "termed" / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["reason"].startswith("SIGTERM")
