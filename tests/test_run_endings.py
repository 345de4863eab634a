"""Runs that do not finish say so: a write that fails (disk full) ends the run ``crashed`` with one
line naming the file, the OS error and the rerun command; SIGTERM ends it ``interrupted``.

The disk-full cases are real, not simulated: the folder is a small tmpfs filled to the last
page, so every write into it fails with ENOSPC (errno 28) in the kernel. Mounting needs root (or
CAP_SYS_ADMIN); elsewhere those tests are skipped with that reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imgscore.errors import OutputWriteError
from imgscore.flows.cli import main as cli_main
from imgscore.io import storage
from imgscore.io.parquet import part_dir, write_bytes_atomic
from tests.conftest import base_overrides, make_image_folder

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def small_tmpfs(folder: Path):
    """Mount a 64 KiB tmpfs on ``folder`` (skipped where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(
            f"cannot mount a small tmpfs here ({mounted.stderr.strip() or mounted.returncode}); needs root or "
            "CAP_SYS_ADMIN"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> None:
    """Write ``folder/filler`` until the file system has no page left (ENOSPC)."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == 28
    finally:
        os.close(fd)


@contextlib.contextmanager
def full_disk(folder: Path):
    """Mount a 64 KiB tmpfs on ``folder`` and fill it: no space is left for any write."""
    with small_tmpfs(folder):
        fill(folder)
        yield folder


# What a refused write says: the OS error of a full disk, the store's answer to a refused PUT.
REFUSED = {"local": "[Errno 28] No space left on device", "s3": "PermissionError: Access Denied"}


@contextlib.contextmanager
def refusing_writes(root_kind: str, folder, request):
    """``folder`` (a path under the test's output root) where every write fails for real: on
    disk a full 64 KiB tmpfs mounted there; on the S3 server a real proxy in front of it that
    answers every PUT under that prefix ``403 AccessDenied`` (a bucket policy, a quota), with
    this process's ``AWS_ENDPOINT_URL`` pointing at the proxy until the block ends."""
    if root_kind == "local":
        with full_disk(folder):
            yield folder
        return
    from tests.s3_server import FaultProxy

    server, monkeypatch = request.getfixturevalue("s3_server"), request.getfixturevalue("monkeypatch")
    with FaultProxy(server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        proxy.deny_put_prefixes.add("/" + str(folder).split("://", 1)[1].rstrip("/") + "/")
        try:
            yield folder
        finally:
            monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)


def test_a_failed_write_names_the_file_and_errno_and_leaves_nothing_half_written(out_root, root_kind, request):
    with refusing_writes(root_kind, storage.path(out_root, "full"), request) as full:
        target = storage.path(full, "manifest.json")
        with pytest.raises(
            OutputWriteError, match=rf"cannot write .*manifest\.json: {re.escape(REFUSED[root_kind])}"
        ) as err:
            write_bytes_atomic(b"{}" * 10000, target)
        assert (err.value.path, err.value.errno) == (str(target), 28 if root_kind == "local" else None)
        assert [n for n in storage.list_names(full) if n != "filler"] == []  # no temp file, no half a manifest


def test_an_ending_the_full_disk_keeps_out_of_the_manifest_is_in_the_ledger_and_the_notification(tmp_path):
    """The disk fills after a shard committed: manifest.json cannot be rewritten (a new copy
    needs new pages), but the ending appended to the ledger segment fits in that segment's last
    page (by construction: tmpfs allocates 4 KiB pages and the segment holds one short line), so
    readers see ``crashed`` with its reason, not ``abandoned``. Where nothing at all can be
    written, the notification of the process that ended the run still says ``crashed``."""
    from imgscore.flows import notify
    from imgscore.runstate.manifest import Counts, Manifest, ShardRecord, ShardResult
    from imgscore.runstate.state import RunState, load_manifest

    with small_tmpfs(tmp_path / "full") as full:
        run_dir = full / "runs" / "r1"
        shards = [ShardRecord(shard_id=i, start=i * 2, stop=i * 2 + 2, images=2) for i in range(2)]
        state = RunState.create(
            run_dir,
            Manifest(
                run_id="r1", run_date="2026-01-01", status="running", counts=Counts(scanned=4, pending=4), shards=shards
            ),
        )
        state.commit(ShardResult(shard_id=0, state="complete", images=2, scored=2))
        fill(full)
        state.manifest.status, state.manifest.reason = "crashed", "cannot write X: [Errno 28] No space left on device"
        with pytest.raises(OutputWriteError, match="Errno 28"):
            state.save()
        assert state.record_ending("crashed", "cannot write X: [Errno 28] No space left on device")
        state.close()  # the compaction that fails again is not raised over the run's own error
        m = load_manifest(run_dir)
        assert (m.status, m.reason, m.counts.scored, m.counts.pending) == (
            "crashed",
            "cannot write X: [Errno 28] No space left on device",
            2,
            2,
        )
        assert notify.run_payload(full, "r1", "Failed", "score-images", None, None)["status"] == "crashed"
    # nothing written at all: the manifest says running and no one holds the lock, yet the
    # process that ended the run notifies what it knows
    run_dir = tmp_path / "out" / "runs" / "r2"
    RunState.create(run_dir, Manifest(run_id="r2", run_date="2026-01-01", status="running"))
    assert notify.run_payload(tmp_path / "out", "r2", "Failed", "score-images", None, None)["status"] == "abandoned"
    notify.remember_ending("r2", "crashed", "disk full")
    p = notify.run_payload(tmp_path / "out", "r2", "Failed", "score-images", None, None)
    assert (p["status"], p["reason"]) == ("crashed", "disk full")


@pytest.mark.slow
def test_disk_full_mid_run_is_one_line_the_run_crashed_and_rerun_finishes_it(
    prefect_server, photos, tiny_checkpoint, tmp_path, capfd, out_root, root_kind, request
):
    """Acceptance: the run's predictions folder is a full disk (on a bucket:
    a prefix whose PUTs are refused). Exit 1 with one line on stderr (the path, the error, the
    rerun command) and no traceback; the manifest says ``crashed`` with that reason, no shard is
    marked done, no temp file is left, report.html shows what was done. Once writes succeed
    again, ``imgscore rerun`` completes the run."""
    root = make_image_folder(tmp_path / "images", photos)  # 12 images, 3 shards of 4
    out = out_root
    folder = part_dir(out, "predictions", datetime.now(UTC).strftime("%Y-%m-%d"), "diskfull")
    sets = base_overrides(
        root, tiny_checkpoint, out, **{"run.run_id": "diskfull", "run.shard_size": 4, "run.shard_retries": 0}
    )
    with refusing_writes(root_kind, folder, request):
        capfd.readouterr()
        code = cli_main(["run", *sum((["--set", s] for s in sets), []), "--quiet"])
        err = capfd.readouterr().err
        assert [n for n in storage.list_names(folder) if n != "filler"] == []  # no temp file, no half a part file
    assert code == 1
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert re.search(
        rf"cannot write {re.escape(str(folder))}/part-0000\d\.parquet: {re.escape(REFUSED[root_kind])}", lines[0]
    ), lines[0]
    assert "nothing is half-written" in lines[0] and f"imgscore rerun diskfull --set output.root={out}" in lines[0]
    run_dir = out / "runs" / "diskfull"
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "crashed" and REFUSED[root_kind] in m["reason"] and m["counts"]["scored"] == 0
    assert all(s["state"] != "complete" for s in m["shards"])
    assert not list(out.rglob(".*.tmp"))
    assert "crashed</span>" in (run_dir / "report.html").read_text()

    assert cli_main(["rerun", "diskfull", "--set", f"output.root={out}", "--quiet"]) == 0
    m = json.loads((run_dir / "manifest.json").read_text())
    assert (m["status"], m["reason"], m["counts"]["scored"]) == ("complete", None, 12)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_scoring_and_the_manifest_report_and_webhook_count_the_rows_on_disk(
    sig, code, prefect_server, photos, tiny_checkpoint, tmp_path, out_root
):
    """SIGTERM (systemd, a container stop, `kill`) or SIGINT (Ctrl-C) to the scorer alone: exit
    143 / 130, the manifest says ``interrupted`` with the signal, the last line names the rerun
    command — and scoring stops: no shard commits after the run's end is written, so the
    manifest's counts, the webhook's and the commit records equal the rows in the part files.
    By construction: 36 shards of 2 images, batch size 1, the signal sent once the first shard
    committed; the ones in flight are abandoned at their next batch, so shards are left pending."""
    import pyarrow.dataset as ds
    from prefect.settings import PREFECT_API_URL

    from tests.test_notify import Receiver

    root = make_image_folder(tmp_path / "images", photos, per_class=24)
    out = out_root  # a local folder or a bucket (the scorer process finds the same AWS_* variables)

    def commit_records() -> list[str]:
        return storage.glob(storage.join(out, "runs/termed/shards/*.json"))

    def rows_of(table: str) -> int:
        fs, where = storage.arrow_filesystem(storage.path(out, table))
        return ds.dataset(where, filesystem=fs, format="parquet", partitioning="hive").count_rows()

    with Receiver() as rx:
        sets = base_overrides(
            root,
            tiny_checkpoint,
            out,
            **{"run.shard_size": 2, "inference.batch_size": 1, "run.run_id": "termed", "notify.webhook_url": rx.url},
        )
        env = {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": "",
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "PREFECT_HOME": str(tmp_path / "ph"),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgscore.flows.cli", "run", *sum((["--set", s] for s in sets), []), "--quiet"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.time() + 180
        while not commit_records() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be terminated"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "Crash detected" not in stderr
    assert "Task run '" not in stderr and "Flow run '" not in stderr, stderr  # Prefect's own lines only with --verbose
    assert f"imgscore rerun termed --set output.root={out}" in stderr.strip().splitlines()[-1]
    m = json.loads((out / "runs" / "termed" / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["reason"].startswith("SIGTERM" if sig == signal.SIGTERM else "SIGINT")
    rows = {t: rows_of(t) for t in ("predictions", "errors")}
    assert (m["counts"]["scored"], m["counts"]["failed"]) == (rows["predictions"], rows["errors"])
    done = [s for s in m["shards"] if s["state"] in ("complete", "partial")]
    assert len(commit_records()) == len(done) and m["counts"]["pending"] > 0
    time.sleep(1)  # nothing of the run goes on after its process ended
    assert rows_of("predictions") == rows["predictions"]
    (post,) = rx.posts
    sent = post["body"]["counts"]
    assert (
        post["body"]["status"] == "interrupted"
        and sent == {k: m["counts"][k] for k in sent}
        and sent["scored"] == rows["predictions"]
    )
