"""model.checkpoint on object storage (the suite's SeaweedFS) and over http (a real http.server on
loopback): fetched once into the model cache, pinned per night, refused by name when it cannot be read."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from imgscore.inference.model import clear_model_cache
from imgscore.io import fetched
from tests.conftest import assert_same_answers
from tests.s3_server import FaultProxy
from tests.test_object_store import cli, manifest_of, read_table, rows_by_path, sets

pytestmark = pytest.mark.slow


@pytest.fixture
def http_folder(tmp_path):
    """A folder served by a real HTTP server on loopback (in a thread); yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def other_checkpoint(tiny_model, path: Path) -> Path:
    """A checkpoint of the same architecture with other weights (a retrained model)."""
    sd = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in tiny_model.state_dict().items()}
    torch.save(sd, path)
    return path


def items_for(local: Path, out: Path, checkpoint: str, cache: Path, *extra: str) -> list[str]:
    return [
        f"input.root={local}",
        f"output.root={out}",
        "model.arch=mobilenet_v3_small",
        f"model.checkpoint={checkpoint}",
        f"inference.cache_dir={cache}",
        "inference.device=cpu",
        "inference.batch_size=4",
        "run.shard_size=5",
        *extra,
    ]


def cache_entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "models").glob("*/*") if not p.name.startswith(".") and p.suffix != ".sha256")


def test_fetch_once_identity_keyed_and_concurrent_fetches_share_one_file(
    s3, s3_server, tiny_checkpoint, tiny_model, tmp_path, monkeypatch
):
    """One fetch per cache: a second call is a hit; a changed object is a new entry (new sha256);
    eight threads fetching into an empty cache at once all end with the same whole file, GET once."""
    url = s3.url("models/m.pt")
    s3.put("models/m.pt", tiny_checkpoint.read_bytes())
    cache = tmp_path / "cache"
    a = fetched.local_copy(url, cache, "model.checkpoint")
    b = fetched.local_copy(url, cache, "model.checkpoint")
    assert a == b and a.path.read_bytes() == tiny_checkpoint.read_bytes() and a.identity
    s3.put("models/m.pt", other_checkpoint(tiny_model, tmp_path / "o.pt").read_bytes())
    c = fetched.local_copy(url, cache, "model.checkpoint")
    assert c.sha256 != a.sha256 and c.path != a.path and c.identity != a.identity

    shared = tmp_path / "shared"
    got: list = []
    threads = [
        threading.Thread(target=lambda: got.append(fetched.local_copy(url, shared, "model.checkpoint")))
        for _ in range(8)
    ]
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert proxy.gets[f"/{s3.bucket}/{s3.key('models/m.pt')}"] == 1  # the others waited on the entry's lock
    assert len(got) == 8 and len({g.sha256 for g in got}) == 1 and got[0].sha256 == c.sha256
    left = [p.name for p in got[0].path.parent.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert left == []  # no temp file left
    with pytest.raises(Exception, match="sha256"):
        fetched.local_copy(url, shared, "model.checkpoint", fetched.Pin(c.identity or "", "0" * 64))


def test_s3_checkpoint_on_dask_matches_the_local_file_and_each_worker_fetches_once(
    prefect_server, s3, s3_server, image_folder, tiny_checkpoint, tmp_path, monkeypatch, capfd
):
    """Acceptance: a Dask cluster of 2 worker processes, each with its own empty cache folder (as
    on machines without a shared disk: ``~/.cache`` per worker) and no local copy of the
    checkpoint, scores an s3:// checkpoint with the local-file run's answers and model_id. The
    object is GET once per process that loads it (the run start and each worker: 3) and each cache
    holds one entry; the manifest and the Parquet metadata record the URL, identity and sha256."""
    from distributed import Nanny, Scheduler, SpecCluster

    s3.put("models/m.pt", tiny_checkpoint.read_bytes())
    url = s3.url("models/m.pt")
    assert cli("run", "-q", *sets(items_for(image_folder, tmp_path / "a", str(tiny_checkpoint), tmp_path / "c0"))) == 0
    caches = {name: tmp_path / name for name in ("driver", "w0", "w1")}
    monkeypatch.setenv("XDG_CACHE_HOME", str(caches["driver"]))  # no inference.cache_dir: each process's default
    items = [i for i in items_for(image_folder, tmp_path / "b", url, tmp_path / "unused") if "cache_dir" not in i]
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the workers inherit it: every GET is counted
        workers = {
            w: {"cls": Nanny, "options": {"nthreads": 1, "env": {"XDG_CACHE_HOME": str(caches[w])}}}
            for w in ("w0", "w1")
        }
        scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
        with SpecCluster(workers=workers, scheduler=scheduler) as cluster:
            items += ["runner.type=dask", f"runner.address={cluster.scheduler_address}"]
            assert cli("run", "-q", *sets(items)) == 0
    assert "Traceback" not in capfd.readouterr().err
    assert proxy.gets[f"/{s3.bucket}/{s3.key('models/m.pt')}"] == 3
    for name, cache in caches.items():
        assert len(cache_entries(cache / "imgscore")) == 1, name
    local, remote = rows_by_path(read_table(str(tmp_path / "a"))), rows_by_path(read_table(str(tmp_path / "b")))
    (run,) = [p.name for p in (tmp_path / "b" / "runs").iterdir()]
    m = manifest_of(str(tmp_path / "b"), run)
    shard_errors = [s.get("error") for s in m["shards"]]
    assert sorted(local) == sorted(remote), json.dumps([m["counts"], m["status"], shard_errors])
    for p, row in local.items():
        assert_same_answers(row, remote[p], atol=1e-5, what=p)
        assert remote[p]["model_id"] == row["model_id"]
    ck = m["models"][0]["checkpoint"]
    assert ck["url"] == url and ck["identity"] and ck["sha256"] == next(iter(local.values()))["model_id"]
    part = next((tmp_path / "b" / "predictions").rglob("*.parquet"))
    import pyarrow.parquet as pq

    meta = json.dumps({k.decode(): v.decode() for k, v in pq.read_metadata(part).metadata.items()})
    assert ck["identity"] in meta and url in meta


def test_rerun_refuses_a_changed_object_and_night_two_gets_a_new_model_id(
    prefect_server, s3, image_folder, tiny_checkpoint, tiny_model, tmp_path, capsys
):
    """Night 1 leaves a failed image; the object then changes: its rerun (which would score
    with the recorded pin) is refused with one line naming the URL, identity and sha256, since
    the store keeps no older version. Night 2 scores the new bytes under a new model_id."""
    s3.put("models/m.pt", tiny_checkpoint.read_bytes())
    url, out, cache = s3.url("models/m.pt"), tmp_path / "out", tmp_path / "cache"
    first_class = sorted(p for p in image_folder.iterdir() if p.is_dir())[0]
    (first_class / "broken.jpg").write_bytes(b"not a jpeg")
    n1 = items_for(image_folder, out, url, cache, "run.run_id=n1", "run.max_error_rate=0.5")
    assert cli("run", "-q", *sets(n1)) == 0
    was = manifest_of(str(out), "n1")["models"][0]["checkpoint"]
    s3.put("models/m.pt", other_checkpoint(tiny_model, tmp_path / "o.pt").read_bytes())
    capsys.readouterr()
    clear_model_cache()  # a rerun is a new process (here the CLI runs in the test's, which holds the pinned model)
    assert cli("rerun", "n1", "--set", f"output.root={out}", "--set", f"inference.cache_dir={cache}", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(url in line and was["identity"] in line and was["sha256"] in line for line in err), err
    assert (
        cli("run", "-q", *sets(items_for(image_folder, out, url, cache, "run.run_id=n2", "run.max_error_rate=0.5")))
        == 0
    )
    now = manifest_of(str(out), "n2")["models"][0]
    assert now["model_id"] != was["sha256"] and now["checkpoint"]["sha256"] == now["model_id"]


def test_refusals_name_the_fix(prefect_server, s3, http_folder, image_folder, tmp_path, capsys, monkeypatch):
    """Exit 2 before scoring, one line: a missing object, a missing bucket, access denied, an http 404."""
    cache = tmp_path / "cache"
    cases = [
        (s3.url("models/none.pt"), "does not exist"),
        ("s3://no-such-bucket-imgscore/m.pt", "bucket 'no-such-bucket-imgscore' does not exist"),
        (f"{http_folder[1]}/none.pt", "HTTP 404"),
    ]
    for url, said in cases:
        capsys.readouterr()
        assert cli("run", "-q", *sets(items_for(image_folder, tmp_path / "o", url, cache))) == 2, url
        err = capsys.readouterr().err
        assert said in err and url in err, err
    s3.put("models/m.pt", b"x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody-imgscore")  # a key the store does not know: access denied
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    capsys.readouterr()
    assert cli("run", "-q", *sets(items_for(image_folder, tmp_path / "o", s3.url("models/m.pt"), cache))) == 2
    err = capsys.readouterr().err
    assert "cannot be read here" in err and "credentials" in err and "wrong-secret" not in err, err
    assert not (tmp_path / "o" / "predictions").exists()


def test_http_checkpoint_end_to_end(prefect_server, http_folder, image_folder, tiny_checkpoint, tmp_path):
    folder, base = http_folder
    (folder / "m.pt").write_bytes(tiny_checkpoint.read_bytes())
    out = tmp_path / "out"
    assert cli("run", "-q", *sets(items_for(image_folder, out, f"{base}/m.pt", tmp_path / "cache"))) == 0
    (run,) = [p.name for p in (out / "runs").iterdir()]
    m = manifest_of(str(out), run)
    assert m["counts"]["scored"] > 0 and m["models"][0]["checkpoint"]["url"] == f"{base}/m.pt"


def test_rerun_on_a_versioned_bucket_fetches_the_recorded_version(
    prefect_server, s3_server, s3, image_folder, tiny_checkpoint, tiny_model, tmp_path
):
    """On a versioned bucket the pin is ``ETag@VersionId``: after the object is replaced, the rerun
    of night 1 (its failed image repaired) GETs the recorded version and scores with night 1's
    model_id, where an unversioned bucket refuses (the test above)."""
    client, bucket = s3_server.client(), "imgscore-versioned"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket=bucket, Key="m.pt", Body=tiny_checkpoint.read_bytes())
    url, out, cache = f"s3://{bucket}/m.pt", tmp_path / "out", tmp_path / "cache"
    first_class = sorted(p for p in image_folder.iterdir() if p.is_dir())[0]
    good = next(first_class.glob("*.jpg")).read_bytes()
    (first_class / "broken.jpg").write_bytes(b"not a jpeg")
    assert cli("run", "-q", *sets(items_for(image_folder, out, url, cache, "run.run_id=n1"))) == 0
    was = manifest_of(str(out), "n1")["models"][0]
    assert "@" in was["checkpoint"]["identity"]  # ETag@VersionId
    client.put_object(Bucket=bucket, Key="m.pt", Body=other_checkpoint(tiny_model, tmp_path / "o.pt").read_bytes())
    (first_class / "broken.jpg").write_bytes(good)
    clear_model_cache()
    assert cli("rerun", "n1", "--set", f"output.root={out}", "--set", f"inference.cache_dir={cache}", "--quiet") == 0
    rows = [r for r in read_table(str(out), run_id="n1").to_pylist() if r["image_path"].endswith("broken.jpg")]
    assert rows and {r["model_id"] for r in rows} == {was["model_id"]}
