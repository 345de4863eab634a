"""Runs whose input and output are on object storage, against a real S3 server (SeaweedFS on
loopback, ``tests/s3_server.py``): the same predictions as on disk with the thread and the Dask
runner, kill -9 + ``imgscore rerun`` exactly once, ``run.skip_scored`` on object versions, a
throttled GET as an errors row, ``imgscore report`` on an ``s3://`` root, and no secret in any
output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from imgscore.flows.cli import main
from imgscore.io import storage
from tests.conftest import assert_same_answers, base_overrides, make_image_folder, make_variants
from tests.s3_server import FaultProxy

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def without_roots(items: list[str]) -> list[str]:
    """``--set`` items less ``input.root`` and ``output.root`` (a URL given as a Path loses its ``//``)."""
    return [o for o in items if not o.startswith(("input.root=", "output.root="))]


def on_store(local, checkpoint, tmp_path, url: str, out: str, *extra: str) -> list[str]:
    """``base_overrides`` for a run that reads ``url`` and writes ``out`` (object-store URLs), plus ``extra``."""
    base = without_roots(base_overrides(local, checkpoint, tmp_path / "x"))
    return [*base, f"input.root={url}", f"output.root={out}", *extra]


def cli(*argv: str) -> int:
    return main(list(argv))


def sets(items: list[str]) -> list[str]:
    return [a for o in items for a in ("--set", o)]


def read_table(root: str, table: str = "predictions", run_id: str | None = None) -> pa.Table:
    """A table of an output root (local or s3://), read through the storage layer."""
    fs, path = storage.arrow_filesystem(storage.join(root, table))
    t = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    return t if run_id is None else t.filter(pa.compute.equal(t["run_id"], run_id))


def rows_by_path(t: pa.Table) -> dict[str, dict]:
    return {r["image_path"]: r for r in t.to_pylist()}


def manifest_of(out: str, run_id: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "runs", run_id, "manifest.json")))


def only_run(out: str) -> str:
    (run_id,) = storage.list_names(storage.join(out, "runs"))
    return run_id


def test_s3_runs_match_the_local_run_with_threads_and_dask(
    prefect_server, s3, photos, tiny_checkpoint, tmp_path, capfd
):
    """The acceptance run: the same ImageFolder scored from disk into a folder, and from a bucket
    into the bucket with the thread runner and with 2 Dask worker processes (each reading the
    bucket itself): the same images, labels and probabilities, everything the run writes in the
    bucket, nothing on local disk.

    By construction on any CPU: the three runs decode the same bytes with the same code and run
    the same model; only torch thread counts differ (float summation order), so every class
    probability agrees within 1e-5 and a top-1 may differ only between classes tied within it
    (``assert_same_answers``)."""
    local = make_image_folder(tmp_path / "images", photos, per_class=4)
    url = s3.upload(local, "images")
    common = base_overrides(local, tiny_checkpoint, tmp_path / "x", **{"run.shard_size": 5, "inference.num_workers": 2})
    common = without_roots(common)
    assert cli("run", "-q", *sets([*common, f"input.root={local}", f"output.root={tmp_path / 'local-out'}"])) == 0
    out_t, out_d = s3.url("out-thread"), s3.url("out-dask")
    assert cli("run", "-q", *sets([*common, f"input.root={url}", f"output.root={out_t}"])) == 0
    capfd.readouterr()
    assert (
        cli(
            "run",
            "-q",
            *sets([*common, f"input.root={url}", f"output.root={out_d}", "runner.type=dask", "runner.n_workers=2"]),
        )
        == 0
    )
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-2000:]

    disk = rows_by_path(read_table(str(tmp_path / "local-out")))
    for out in (out_t, out_d):
        got = rows_by_path(read_table(out))
        assert sorted(got) == sorted(disk) and len(got) == 12
        for path, d in disk.items():
            g = got[path]
            assert_same_answers(d, g, atol=1e-5, what=f"{out} {path}")
            assert (g["label"], g["label_name"], g["file_size"]) == (d["label"], d["label_name"], d["file_size"])
        m = manifest_of(out, only_run(out))
        assert m["status"] == "complete" and m["counts"]["scored"] == 12 and m["input"]["root"] == url
        keys = s3.keys(out.rsplit("/", 1)[1])
        run = m["run_id"]
        assert f"{out.rsplit('/', 1)[1]}/runs/{run}/manifest.json" in keys
        assert sum(k.endswith(".parquet") and "/predictions/" in k for k in keys) == 3  # 3 shards of 5, 5, 2
        assert any(k.endswith(f"runs/{run}/report.html") for k in keys)
        assert not any(".lock" in k or k.endswith(".tmp") for k in keys)  # lock released, no temp objects
    workers = {r["worker"] for r in read_table(out_d).to_pylist()}
    assert len(workers) >= 2, workers  # scored in the Dask worker processes, reading the bucket themselves
    assert not (REPO / "s3:").exists() and not Path("s3:").exists()  # no URL ever taken for a local path


def test_kill9_then_rerun_leaves_exactly_one_row_per_image_on_s3(prefect_server, s3, photos, tiny_checkpoint, tmp_path):
    """kill -9 of a run writing to a bucket after some shards committed, then ``imgscore rerun``:
    every image exactly once in predictions, the run complete, its lock gone. By construction:
    part files have deterministic keys (a rewrite replaces, never adds) and a shard counts only
    with its commit record, which is written last."""
    from prefect.settings import PREFECT_API_URL

    local = tmp_path / "flat"
    local.mkdir()
    names = sorted(photos)
    for i in range(60):
        make_variants(photos[names[i % len(names)]], i // len(names) + 1, size=40)[-1].save(
            local / f"img_{i:03d}.jpg", quality=85
        )
    url, out = s3.upload(local, "flat"), s3.url("out")
    items = base_overrides(
        local,
        tiny_checkpoint,
        tmp_path / "x",
        **{
            "run.shard_size": 4,
            "inference.batch_size": 4,
            "inference.num_threads": 1,
            "inference.num_workers": 0,
            "preprocess.resize": 256,
            "preprocess.crop": 256,
            "run.run_id": "killed",
        },
    )
    items = [*without_roots(items), f"input.root={url}", f"output.root={out}"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect_home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgscore.flows.cli", "run", *sets(items), "--quiet"],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline, commits = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        commits = sum(1 for k in s3.keys("out/runs/killed/shards/") if k.endswith(".json"))
        if commits >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert 2 <= commits < 15
    before = manifest_of(out, "killed")
    assert before["status"] == "running" and sum(s["state"] == "complete" for s in before["shards"]) < 15

    assert cli("rerun", "killed", "--set", f"output.root={out}", "--quiet") == 0
    t = read_table(out, run_id="killed")
    paths = t["image_path"].to_pylist()
    assert len(paths) == 60 and set(paths) == {f"img_{i:03d}.jpg" for i in range(60)}
    m = manifest_of(out, "killed")
    assert m["status"] == "complete" and m["counts"]["scored"] == 60 and m["counts"]["pending"] == 0
    assert not any(k.endswith("runs/killed/.lock") for k in s3.keys("out/"))


def test_skip_scored_on_s3_skips_unchanged_objects_and_rescores_a_replaced_one(
    prefect_server, s3, photos, tiny_checkpoint, tmp_path
):
    """Night 1 scores 12 objects and records one corrupt object as an error; night 2 skips the
    12 and carries the corrupt one (failure ledger); after one object is replaced with other
    bytes and the corrupt one is fixed, night 3 scores exactly those two. By construction: the
    keys are path + size + last-modified + ETag of the listing, and an upload of other bytes has
    another ETag (its MD5)."""
    local = make_image_folder(tmp_path / "images", photos, per_class=4)
    (local / "rocket" / "zz_bad.jpg").write_text("not a jpeg at all")
    url, out = s3.upload(local, "images"), s3.url("out")
    extra = ["run.skip_scored=true", "inference.num_workers=0", "run.max_error_rate=1"]
    items = on_store(local, tiny_checkpoint, tmp_path, url, out, *extra)
    assert cli("run", "-q", *sets([*items, "run.run_id=night1"])) == 0
    (bad,) = read_table(out, "errors", run_id="night1").to_pylist()
    assert (
        bad["image_path"] == "rocket/zz_bad.jpg"
        and bad["file_version"]
        and bad["error_type"].startswith("DecodeError.")
    )
    etags = {r["image_path"]: r["file_version"] for r in read_table(out, run_id="night1").to_pylist()}
    head = s3.client.head_object(Bucket=s3.bucket, Key=s3.key("images/coffee/coffee_0.jpg"))
    assert etags["coffee/coffee_0.jpg"] == head["ETag"].strip('"') and len(etags) == 12
    assert cli("run", "-q", *sets([*items, "run.run_id=night2"])) == 0
    c2 = manifest_of(out, "night2")["counts"]
    assert (c2["already_scored"], c2["already_failed"], c2["scanned"]) == (12, 1, 0)
    make_variants(photos["rocket"], 9)[-1].save(tmp_path / "new.jpg", quality=80)
    s3.put("images/coffee/coffee_0.jpg", (tmp_path / "new.jpg").read_bytes())
    make_variants(photos["rocket"], 3)[-1].save(tmp_path / "fixed.jpg", quality=80)
    s3.put("images/rocket/zz_bad.jpg", (tmp_path / "fixed.jpg").read_bytes())
    assert cli("run", "-q", *sets([*items, "run.run_id=night3"])) == 0
    c3 = manifest_of(out, "night3")["counts"]
    assert (c3["already_scored"], c3["already_failed"], c3["scanned"], c3["scored"]) == (11, 0, 2, 2)
    rows = {r["image_path"]: r for r in read_table(out, run_id="night3").to_pylist()}
    assert sorted(rows) == ["coffee/coffee_0.jpg", "rocket/zz_bad.jpg"]
    assert rows["coffee/coffee_0.jpg"]["file_size"] == (tmp_path / "new.jpg").stat().st_size
    assert rows["coffee/coffee_0.jpg"]["file_version"] != etags["coffee/coffee_0.jpg"]


def test_a_throttled_get_becomes_an_errors_row_after_retries(
    prefect_server, s3, s3_server, photos, tiny_checkpoint, tmp_path, monkeypatch
):
    """Through a real proxy that answers 503 SlowDown for one object every time: that image is
    an errors row (stage decode, ObjectReadError, the store's answer in the message) after
    ``storage.retries`` retries, every other image is scored, and the shard is not hung."""
    local = make_image_folder(tmp_path / "images", photos, per_class=3)
    url, out = s3.upload(local, "images"), s3.url("out")
    extra = ["storage.retries=2", "storage.read_timeout_s=5", "run.max_error_rate=0.5", "inference.num_workers=2"]
    items = on_store(local, tiny_checkpoint, tmp_path, url, out, *extra)
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        bad = f"/{s3.bucket}/{s3.key('images/coffee/coffee_1.png')}"
        proxy.fail_keys.add(bad)
        t0 = time.monotonic()
        assert cli("run", "-q", *sets(items)) == 0
        took = time.monotonic() - t0
    (err,) = read_table(out, "errors").to_pylist()
    assert (err["image_path"], err["stage"], err["error_type"]) == ("coffee/coffee_1.png", "decode", "ObjectReadError")
    assert "SlowDown (503)" in err["message"] and "3 attempts" in err["message"], err["message"]
    assert proxy.gets[bad] == 3
    assert len(read_table(out)) == 8
    assert took < 120, took


def test_report_reads_and_writes_an_s3_output_root(prefect_server, s3, photos, tiny_checkpoint, tmp_path, capsys):
    """``imgscore report RUN --set output.root=s3://…`` prints the run's summary and the JSON
    report reads the bucket's part files."""
    local = make_image_folder(tmp_path / "images", photos, per_class=2)
    url, out = s3.upload(local, "images"), s3.url("out")
    items = on_store(local, tiny_checkpoint, tmp_path, url, out)
    assert cli("run", "-q", *sets([*items, "run.run_id=rep"])) == 0
    capsys.readouterr()
    assert cli("report", "rep", "--format", "json", "--set", f"output.root={out}") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run_id"] == "rep" and report["counts"]["scored"] == 6
    assert storage.is_file(storage.join(out, "runs", "rep", "report.html"))


def test_no_secret_in_any_output(
    prefect_server, s3, s3_server, photos, tiny_checkpoint, tmp_path, capfd, caplog, monkeypatch
):
    """The secret key the run authenticates with (from AWS_SECRET_ACCESS_KEY, and once more
    through a ``${VAR}`` reference in ``storage.options``; images and the checkpoint are both
    read from the bucket) appears in no object the run wrote (nor in the model cache's names)
    (manifest, ledger, commit records, index, part files and their metadata, report.html), in
    nothing it printed or logged, and in no Prefect flow-run parameter or artifact; a secret
    written into the config is refused before anything runs (exit 2)."""
    from prefect.client.orchestration import get_client

    secret = s3_server.secret_key
    monkeypatch.setenv("IMGSCORE_TEST_S3_SECRET", secret)
    local = make_image_folder(tmp_path / "images", photos, per_class=2)
    url, out = s3.upload(local, "images"), s3.url("out")
    s3.put("models/m.pt", tiny_checkpoint.read_bytes())  # the checkpoint is read from the bucket too
    extra = [
        "run.run_id=sec",
        f"inference.cache_dir={tmp_path / 'cache'}",
        "storage.options.secret=${IMGSCORE_TEST_S3_SECRET}",
        "storage.options.key=${AWS_ACCESS_KEY_ID}",
    ]
    items = on_store(local, s3.url("models/m.pt"), tmp_path, url, out, *extra)
    with caplog.at_level("DEBUG", logger="imgscore"):
        assert cli("run", *sets(items)) == 0
    printed = capfd.readouterr()
    assert secret not in printed.out + printed.err and secret not in caplog.text
    written = [k for k in s3.keys("out/")]
    assert any(k.endswith("manifest.json") for k in written) and any(k.endswith(".parquet") for k in written)
    for k in written:
        body = s3.client.get_object(Bucket=s3.bucket, Key=s3.key(k))["Body"].read()
        assert secret.encode() not in body, k
    assert "${IMGSCORE_TEST_S3_SECRET}" in json.dumps(manifest_of(out, "sec")["config"])  # the reference, not the value
    assert manifest_of(out, "sec")["models"][0]["checkpoint"]["url"] == s3.url("models/m.pt")
    assert not any(secret in str(p) for p in (tmp_path / "cache").rglob("*"))

    import asyncio

    async def prefect_side():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            arts = await client.read_artifacts()
            return [json.dumps(r.parameters, default=str) for r in runs], [
                json.dumps(a.data, default=str) for a in arts
            ]

    params, artifacts = asyncio.run(prefect_side())
    assert params and not any(secret in p for p in params) and not any(secret in a for a in artifacts)

    assert cli("run", *sets([*items[:-2], "storage.options.secret=plain-text-secret"])) == 2
    assert "looks like a credential" in capfd.readouterr().err


def test_a_missing_bucket_is_refused_by_name_as_input_or_output_root(
    s3, s3_server, image_folder, tiny_checkpoint, tmp_path, capsys
):
    """``input.root`` or ``output.root`` in a bucket that does not exist: exit 2 before anything
    runs, one line naming the bucket, the endpoint and the fix — not "holds no objects" (what a
    listing of a missing bucket looks like), and no bucket made by the write check's PUT."""
    items = without_roots(base_overrides(image_folder, tiny_checkpoint, tmp_path / "x"))
    assert cli("run", "-q", *sets([*items, "input.root=s3://nosuch/images", f"output.root={s3.url('out')}"])) == 2
    err = capsys.readouterr().err
    assert f"bucket 'nosuch' does not exist at {s3_server.endpoint}; create it or fix input.root" in err, err
    assert "holds no objects" not in err and "Traceback" not in err
    assert cli("run", "-q", *sets([*items, f"input.root={image_folder}", "output.root=s3://nosuch/out"])) == 2
    err = capsys.readouterr().err
    assert f"bucket 'nosuch' does not exist at {s3_server.endpoint}; create it or fix output.root" in err, err
    assert "nosuch" not in {b["Name"] for b in s3.client.list_buckets()["Buckets"]}
    assert s3.keys() == []  # nothing written anywhere
