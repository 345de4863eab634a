"""Finishing runs: ``imgscore rerun`` after kill -9, fixed images, corrupt footers; Prefect
flow-run retries that skip completed shards; the run lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from imgscore.errors import RunLockedError
from imgscore.flows.cli import main as cli_main
from imgscore.io import storage
from imgscore.runstate import lock as run_lock
from tests.conftest import assert_same_answers, base_overrides, make_variants

REPO = Path(__file__).resolve().parent.parent


def flat_folder(root: Path, photos: dict, n: int, size: int = 40) -> Path:
    """``n`` distinct small JPEGs in a flat folder, named img_000.jpg …"""
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(photos)
    for i in range(n):
        v = make_variants(photos[names[i % len(names)]], i // len(names) + 1, size=size)[-1]
        v.save(root / f"img_{i:03d}.jpg", quality=85)
    return root


def run_cli(*argv: str) -> int:
    return cli_main(list(argv))


# Readers of an output root, local or on an object store (``out`` is a path or a URL).


def only_run(out) -> str:
    runs = storage.list_names(storage.path(out, "runs"))
    assert len(runs) == 1, runs
    return runs[0]


def manifest(out, run_id: str) -> dict:
    return json.loads(storage.read_bytes(storage.path(out, "runs", run_id, "manifest.json")))


def _table(out, table: str, run_id: str):
    files = storage.glob(storage.join(out, table, "run_date=*", run_id, "*.parquet"))
    if not files:
        return None
    fs, paths = storage.arrow_files(files)
    return ds.dataset(paths, format="parquet", filesystem=fs).to_table()


def predictions(out, run_id: str):
    t = _table(out, "predictions", run_id)
    assert t is not None, f"no predictions of {run_id} under {out}"
    return t


def errors(out, run_id: str, table: str = "errors"):
    return _table(out, table, run_id)


@pytest.mark.slow
def test_kill9_mid_run_then_rerun_gives_every_image_once(prefect_server, photos, tiny_checkpoint, tmp_path):
    from prefect.settings import PREFECT_API_URL

    root = flat_folder(tmp_path / "images", photos, 200)
    out = tmp_path / "out"
    sets = base_overrides(
        root,
        tiny_checkpoint,
        out,
        **{
            "run.shard_size": 10,
            "inference.batch_size": 5,
            "inference.num_threads": 1,
            "preprocess.resize": 320,
            "preprocess.crop": 320,
            "run.run_id": "killed",
        },
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect_home")}
    cmd = [sys.executable, "-m", "imgscore.flows.cli", "run", *sum((["--set", s] for s in sets), []), "--quiet"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    pred_dir = out / "predictions"
    deadline = time.time() + 90
    n_parts = 0
    while time.time() < deadline and proc.poll() is None:
        n_parts = len(list(pred_dir.glob("run_date=*/killed/part-*.parquet")))
        if n_parts >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert 3 <= n_parts < 20
    before = manifest(out, "killed")
    assert before["status"] == "running"
    assert sum(s["state"] == "complete" for s in before["shards"]) < 20
    # a temp file as a killed writer leaves it, and the dead run's lock
    leftover = next(pred_dir.glob("run_date=*/killed")) / ".part-00019.parquet.99999.tmp"
    leftover.write_bytes(b"PAR1 half a file")
    assert run_lock.read_lock(out / "runs" / "killed")["pid"] == proc.pid
    # nothing could write an ending, so readers report the run abandoned, with the fix
    from imgscore.flows import notify
    from imgscore.report.build import build_report

    r = build_report(out, "killed")
    assert (r.status, r.rerun) == ("abandoned", f"imgscore rerun killed --set output.root={out}")
    assert r.outputs["report"] is None
    assert "its process is gone" in r.reason
    assert notify.run_payload(out, "killed", "Crashed", "score-images", None, None)["status"] == "abandoned"

    assert run_cli("rerun", "killed", "--set", f"output.root={out}", "--set", "inference.num_threads=2", "--quiet") == 0

    t = predictions(out, "killed")
    paths = t["image_path"].to_pylist()
    assert len(paths) == 200 and len(set(paths)) == 200
    assert set(paths) == {f"img_{i:03d}.jpg" for i in range(200)}
    assert not leftover.exists()
    glob = str(out / "predictions" / "**" / "*.parquet")
    n, distinct = duckdb.sql(
        f"SELECT count(*), count(DISTINCT image_path) FROM read_parquet('{glob}', hive_partitioning=true) WHERE "
        "run_id='killed'"
    ).fetchall()[0]
    assert (n, distinct) == (200, 200)
    m = manifest(out, "killed")
    assert m["status"] == "complete"
    assert m["counts"]["scored"] == 200 and m["counts"]["failed"] == 0 and m["counts"]["pending"] == 0
    assert all(s["state"] == "complete" for s in m["shards"])
    assert len(m["reruns"]) == 1 and m["reruns"][0]["temp_files_removed"] >= 1
    assert not (out / "runs" / "killed" / ".lock").exists()
    assert not (out / "runs" / "killed" / "_rerun").exists()


def truncate_jpeg(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_fixed_image_is_rescored_alone(prefect_server, photos, tiny_checkpoint, tmp_path, capsys, out_root):
    """A run with one truncated image, then ``imgscore rerun`` once it is fixed: that image alone
    is rescored, its old error row kept in errors_history; a rerun killed after its commit is
    adopted by the next. Into a local folder or a bucket."""
    root = flat_folder(tmp_path / "images", photos, 12, size=64)
    bad = root / "img_005.jpg"
    truncate_jpeg(bad)
    out = out_root
    sets = base_overrides(root, tiny_checkpoint, out, **{"run.max_error_rate": 0.5})
    assert run_cli("run", *sum((["--set", s] for s in sets), []), "--quiet") == 0
    rid = only_run(out)
    m = manifest(out, rid)
    assert m["counts"]["failed"] == 1 and m["counts"]["scored"] == 11
    assert m["shards"][1]["state"] == "partial" and m["shards"][1]["failed_images"] == ["img_005.jpg"]
    first = predictions(out, rid).to_pandas().set_index("image_path")
    err = errors(out, rid)
    assert err["image_path"].to_pylist() == ["img_005.jpg"] and err["attempt"].to_pylist() == [1]

    photos["rocket"].resize((64, 64)).save(bad, quality=90)  # fixed
    assert run_cli("rerun", rid, "--set", f"output.root={out}", "--quiet") == 0

    after = predictions(out, rid).to_pandas()
    assert after["image_path"].is_unique and len(after) == 12
    assert (after["image_path"] == "img_005.jpg").sum() == 1
    fixed = after.set_index("image_path").loc["img_005.jpg"]
    assert fixed["file_size"] == bad.stat().st_size and fixed["file_mtime_ns"] == bad.stat().st_mtime_ns
    others = after[after["image_path"] != "img_005.jpg"].set_index("image_path").sort_index()
    cols = ["score", "pred_index", "scored_at", "worker", "batch_id", "shard_id"]
    assert "img_005.jpg" not in first.index
    assert others[cols].equals(first.sort_index()[cols])  # untouched
    assert errors(out, rid).num_rows == 0
    hist = errors(out, rid, "errors_history")
    assert hist["image_path"].to_pylist() == ["img_005.jpg"] and hist["attempt"].to_pylist() == [1]
    m = manifest(out, rid)
    assert m["counts"]["failed"] == 0 and m["counts"]["scored"] == 12 and m["status"] == "complete"
    assert m["shards"][1]["state"] == "complete" and m["shards"][1]["attempts"] == 2
    assert m["reruns"][0]["shards"] == [{"shard_id": 1, "images": 1, "reason": "1 failed image(s)"}]
    # only the one shard's predictions file was rewritten
    fs, where = storage.arrow_filesystem(storage.path(out, "runs", rid, "index.parquet"))
    idx = pq.read_table(where, filesystem=fs).to_pandas().set_index("image_path")
    assert idx.loc["img_005.jpg", "size"] == bad.stat().st_size

    # as if that rerun had been killed after its commit, before the manifest update: the next
    # rerun adopts the committed shard from its commit record instead of rescoring it
    done = manifest(out, rid)
    stale = json.loads(json.dumps(done))
    stale["shards"][1].update(state="partial", attempts=1, scored=4, failed=1, failed_images=["img_005.jpg"])
    stale["status"] = "running"
    storage.path(out, "runs", rid, "manifest.json").write_text(json.dumps(stale))
    capsys.readouterr()
    assert run_cli("rerun", rid, "--set", f"output.root={out}", "--quiet") == 0
    said = capsys.readouterr().out
    assert (
        "0 shard(s) to rescore" in said and "rescored 0 image(s) in 0 shard(s)" in said
    )  # the adopted shard is not announced
    m = manifest(out, rid)
    assert (
        m["reruns"][-1]["adopted_shards"] == [1]
        and m["reruns"][-1]["shards"] == []
        and m["reruns"][-1]["images_rescored"] == 0
    )
    assert m["status"] == "complete" and m["shards"][1]["attempts"] == 2 and m["counts"]["scored"] == 12
    assert (
        predictions(out, rid)
        .to_pandas()
        .sort_values("image_path")
        .reset_index(drop=True)
        .equals(after.sort_values("image_path").reset_index(drop=True))
    )


def test_rerun_publishes_and_updates_its_own_progress_artifact(
    prefect_server, photos, tiny_checkpoint, tmp_path, monkeypatch
):
    """As `score-images` does: a progress artifact created at 0 % and updated per finished shard,
    here over the images the rerun rescores (one failed image in each of two shards)."""
    import prefect.artifacts
    from prefect.artifacts import Artifact

    root = flat_folder(tmp_path / "images", photos, 10, size=40)
    bad = [root / "img_001.jpg", root / "img_007.jpg"]  # shard 0 and shard 1 (run.shard_size=5)
    for b in bad:
        truncate_jpeg(b)
    out = tmp_path / "out"
    assert (
        run_cli(
            "run",
            *sum((["--set", s] for s in base_overrides(root, tiny_checkpoint, out, **{"run.max_error_rate": 0.5})), []),
            "--quiet",
        )
        == 0
    )
    rid = only_run(out)
    assert manifest(out, rid)["counts"]["failed"] == 2
    first_progress = Artifact.get("score-images-progress")
    for i, b in enumerate(bad):
        photos["rocket"].resize((40 + i, 40)).save(b, quality=90)  # fixed

    created, updated = [], []
    real_create, real_update = prefect.artifacts.create_progress_artifact, prefect.artifacts.update_progress_artifact
    monkeypatch.setattr(
        prefect.artifacts, "create_progress_artifact", lambda p, **kw: created.append((p, kw)) or real_create(p, **kw)
    )
    monkeypatch.setattr(
        prefect.artifacts,
        "update_progress_artifact",
        lambda aid, p, **kw: updated.append(p) or real_update(aid, p, **kw),
    )
    assert run_cli("rerun", rid, "--set", f"output.root={out}", "--quiet") == 0

    assert [(p, kw["key"]) for p, kw in created] == [(0.0, "rerun-failed-progress")]
    assert created[0][1]["description"] == f"imgscore rerun of {rid}: 0/2 images"
    assert updated == [50.0, 100.0]  # one update per finished shard (1 of 2 images, then 2 of 2)
    art = Artifact.get("rerun-failed-progress")
    assert art.type == "progress" and float(art.data) == 100.0
    assert art.description == f"imgscore rerun of {rid}: 2/2 images, 0 errors"
    assert art.flow_run_id == Artifact.get("rerun-failed-summary").flow_run_id  # the rerun's own flow run
    assert art.flow_run_id != first_progress.flow_run_id
    assert (
        float(Artifact.get("score-images-progress").data) == 100.0
        and Artifact.get("score-images-progress").id == first_progress.id
    )


def test_corrupt_footer_is_detected_and_rewritten(prefect_server, photos, tiny_checkpoint, tmp_path, capsys):
    """The rewritten part holds the same images with the same answers: compared as probabilities
    within 1e-5 (a rerun may batch differently: rounding apart), near-ties may swap. The rerun's
    images_per_s is its own 5 images over its own wall time (not all 10 of the run)."""
    root = flat_folder(tmp_path / "images", photos, 10, size=48)
    out = tmp_path / "out"
    assert run_cli("run", *sum((["--set", s] for s in base_overrides(root, tiny_checkpoint, out)), []), "--quiet") == 0
    rid = only_run(out)
    part = next((out / "predictions").glob(f"run_date=*/{rid}")) / "part-00001.parquet"
    other = part.with_name("part-00000.parquet")
    other_bytes = other.read_bytes()
    good = pq.read_table(part)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # truncated after the fact
    with pytest.raises(Exception, match="(?i)magic|footer|parquet"):
        pq.read_table(part)

    capsys.readouterr()
    assert run_cli("rerun", rid, "--set", f"output.root={out}", "--quiet") == 0
    printed = dict(
        line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.startswith("images_per_s ")
    )
    wall_s = manifest(out, rid)["reruns"][0]["wall_s"]  # the rerun's own, seconds to the ms
    assert abs(float(printed["images_per_s"]) * wall_s - 5) < 0.05
    fixed = pq.read_table(part)
    assert sorted(fixed["image_path"].to_pylist()) == sorted(good["image_path"].to_pylist())
    for a, b in zip(good.to_pylist(), fixed.to_pylist(), strict=True):  # same model, same images
        assert a["image_path"] == b["image_path"]
        assert_same_answers(a, b, atol=1e-5, what=a["image_path"])  # batches may differ: rounding apart
    assert other.read_bytes() == other_bytes  # the good shard was not touched
    m = manifest(out, rid)
    assert m["reruns"][0]["shards"][0]["shard_id"] == 1 and "unreadable" in m["reruns"][0]["shards"][0]["reason"]
    assert predictions(out, rid).num_rows == 10 and m["status"] == "complete"


def test_rerun_refuses_other_config_and_unknown_run(prefect_server, photos, tiny_checkpoint, tmp_path, capsys):
    root = flat_folder(tmp_path / "images", photos, 5, size=48)
    out = tmp_path / "out"
    assert run_cli("run", *sum((["--set", s] for s in base_overrides(root, tiny_checkpoint, out)), []), "--quiet") == 0
    rid = only_run(out)
    capsys.readouterr()
    assert run_cli("rerun", rid, "--set", f"output.root={out}", "--set", "run.shard_size=2") == 2
    assert "only output.root, runner.*, inference.* and notify.*" in capsys.readouterr().err
    assert run_cli("rerun", "no-such-run", "--set", f"output.root={out}") == 2
    assert "not found" in capsys.readouterr().err
    # allowed overrides, nothing to do: exit 0 and the files are unchanged
    before = predictions(out, rid)
    assert run_cli("rerun", rid, "--set", f"output.root={out}", "--set", "inference.batch_size=2", "--quiet") == 0
    assert predictions(out, rid).equals(before)


def test_run_lock_refuses_live_owner_and_breaks_stale(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_lock.lock_path(run_dir).write_text(
            json.dumps(
                {"pid": sleeper.pid, "host": os.uname().nodename, "purpose": "imgscore rerun", "acquired_at": "t"}
            )
        )
        with pytest.raises(RunLockedError, match=rf"pid {sleeper.pid}.*stop it \(kill {sleeper.pid}\)") as err:
            run_lock.acquire(run_dir, "imgscore rerun")
        assert "delete" not in str(err.value)  # alive on this host: deleting its lock would let a second writer in
    finally:
        sleeper.kill()
        sleeper.wait()
    rec = run_lock.acquire(run_dir, "imgscore rerun")  # owner gone: stale, broken, taken
    assert rec["pid"] == os.getpid() and run_lock.read_lock(run_dir)["pid"] == os.getpid()
    with pytest.raises(RunLockedError):  # a second taker in this very process is refused too
        run_lock.acquire(run_dir, "imgscore rerun")
    assert run_lock.release(run_dir) and run_lock.read_lock(run_dir) is None


def test_concurrent_rerun_is_refused(prefect_server, photos, tiny_checkpoint, tmp_path, capsys):
    root = flat_folder(tmp_path / "images", photos, 5, size=48)
    out = tmp_path / "out"
    assert run_cli("run", *sum((["--set", s] for s in base_overrides(root, tiny_checkpoint, out)), []), "--quiet") == 0
    rid = only_run(out)
    # another `imgscore rerun` of the same run, alive in another process
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from imgscore.runstate import lock; lock.acquire({str(out / 'runs' / rid)!r}, 'imgscore "
            "rerun'); print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    try:
        assert other.stdout.readline().strip() == b"held"
        capsys.readouterr()
        assert run_cli("rerun", rid, "--set", f"output.root={out}") == 2
        err = capsys.readouterr().err
        assert f"pid {other.pid}" in err and "imgscore rerun" in err
    finally:
        other.kill()
        other.wait()
    assert run_cli("rerun", rid, "--set", f"output.root={out}", "--quiet") == 0  # stale now


def test_flow_retry_skips_completed_shards(prefect_server, photos, tiny_checkpoint, tmp_path, monkeypatch):
    """A retry of the failed flow run (what the UI's Retry and `prefect flow-run retry` do) finds
    the completed shards' commit records, checks them against their part files, returns them as
    `Cached` task runs without scoring them, and scores only the shard that failed. Prefect
    persists no task result: nothing is written under OUT/_prefect to be read back."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    import imgscore.flows.score_images as si
    import imgscore.tasks.score_shard as shard_tasks
    from imgscore.config.loading import load_config
    from imgscore.errors import ShardError

    root = flat_folder(tmp_path / "images", photos, 15, size=48)
    out = tmp_path / "out"
    cfg = load_config(
        None, base_overrides(root, tiny_checkpoint, out, **{"run.shard_retries": 0, "run.run_id": "retried"})
    )
    calls: list[int] = []
    real = shard_tasks.score_shard

    def flaky(ref, *a, **kw):
        calls.append(ref.shard_id)
        if ref.shard_id == 1 and calls.count(1) == 1:
            raise ShardError("shard 1: DataLoader failed: bus error (simulated)")
        return real(ref, *a, **kw)

    monkeypatch.setattr(shard_tasks, "score_shard", flaky)
    state = si.score_images.with_options(retries=1, retry_delay_seconds=0)(cfg.to_dict(), return_state=True)
    assert state.is_completed(), state
    assert sorted(calls) == [0, 1, 1, 2]  # shards 0 and 2 scored once; shard 1 failed, then scored on the retry
    m = manifest(out, "retried")
    assert m["status"] == "complete" and m["counts"]["scored"] == 15
    assert predictions(out, "retried").num_rows == 15 and errors(out, "retried").num_rows == 0

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.run_count == 2
    shard_states = sorted(r.state.name for r in runs if r.task_key.startswith("score_shard") or "score_shard" in r.name)
    assert shard_states.count("Cached") == 2, shard_states
    assert not (out / "_prefect").exists()


@pytest.mark.slow
def test_prefect_cli_flow_run_retry_skips_completed_shards(
    prefect_server, photos, tiny_checkpoint, tmp_path, monkeypatch
):
    """The documented (docs/reruns.md) `prefect flow-run retry ID --entrypoint imgscore.flows.score_images:score_images`
    on a failed `imgscore run`-style flow run: the completed shards are Cached (from their commit
    records), the run completes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL

    import imgscore.flows.score_images as si
    import imgscore.tasks.score_shard as shard_tasks
    from imgscore.config.loading import load_config
    from imgscore.errors import ShardError

    root = flat_folder(tmp_path / "images", photos, 15, size=48)
    out = tmp_path / "out"
    cfg = load_config(
        None, base_overrides(root, tiny_checkpoint, out, **{"run.shard_retries": 0, "run.run_id": "cli-retry"})
    )
    real = shard_tasks.score_shard

    def broken(ref, *a, **kw):
        if ref.shard_id == 2:
            raise ShardError("shard 2: DataLoader failed: bus error (simulated)")
        return real(ref, *a, **kw)

    monkeypatch.setattr(shard_tasks, "score_shard", broken)
    state = si.score_images(cfg.to_dict(), return_state=True)
    assert state.is_failed()
    assert manifest(out, "cli-retry")["shards"][2]["state"] == "failed"
    fr_id = str(state.state_details.flow_run_id)
    monkeypatch.undo()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "ph")}
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("prefect")),
            "flow-run",
            "retry",
            fr_id,
            "--entrypoint",
            "imgscore.flows.score_images:score_images",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = manifest(out, "cli-retry")
    assert m["status"] == "complete" and m["counts"]["scored"] == 15 and m["flow_run_id"] == fr_id
    assert predictions(out, "cli-retry").num_rows == 15 and errors(out, "cli-retry").num_rows == 0
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    names = [r.state.name for r in runs if "score_shard" in r.name]
    assert names.count("Cached") == 2, names


def test_a_relative_output_root_reads_its_own_run_state_back(
    prefect_server, photos, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    """``make demo`` writes to the relative ``outputs``: the run's recorded part files are then
    relative to the working directory. The report must be written (it checks them against the
    derived paths) and a rerun of a fixed image must accept the run state."""
    root = flat_folder(tmp_path / "images", photos, 5, size=48)
    truncate_jpeg(root / "img_002.jpg")
    monkeypatch.chdir(tmp_path)
    sets = sum((["--set", s] for s in base_overrides(root, tiny_checkpoint, Path("outputs"))), [])
    run_cli("run", *sets, "--quiet")
    out = tmp_path / "outputs"
    rid = only_run(out)
    assert (out / "runs" / rid / "report.html").stat().st_size > 1000
    shutil.copy(root / "img_001.jpg", root / "img_002.jpg")  # fixed
    assert run_cli("rerun", rid, "--set", "output.root=outputs", "--quiet") == 0, capsys.readouterr().err
    assert sorted(predictions(out, rid).column("image_path").to_pylist()) == [f"img_{i:03d}.jpg" for i in range(5)]
